"""Qwen3: Llama's blocks plus QK-norm (RMSNorm over each head's q and k, identity rule like every norm)."""

from .common import FamilyMap, GLUSpec, RMSNormSpec

QWEN3 = FamilyMap(
    name="qwen3",
    model_types=("qwen3",),
    rms_norms={"Qwen3RMSNorm": RMSNormSpec()},
    glu_mlps={"Qwen3MLP": GLUSpec()},
)
