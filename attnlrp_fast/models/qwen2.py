"""Qwen2: Llama's blocks (with q/k/v biases, which need nothing: linear layers keep their gradient)."""

from .common import FamilyMap, GLUSpec, RMSNormSpec

QWEN2 = FamilyMap(
    name="qwen2",
    model_types=("qwen2",),
    rms_norms={"Qwen2RMSNorm": RMSNormSpec()},
    glu_mlps={"Qwen2MLP": GLUSpec()},
)
