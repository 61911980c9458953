"""Llama: RMSNorm (w * x, promoting), SwiGLU MLP, attention through the engine."""

from .common import FamilyMap, GLUSpec, RMSNormSpec

LLAMA = FamilyMap(
    name="llama",
    model_types=("llama",),
    rms_norms={"LlamaRMSNorm": RMSNormSpec()},
    glu_mlps={"LlamaMLP": GLUSpec()},
)
