"""Mistral: Llama's blocks plus sliding-window attention (the window reaches the kernel as a flag)."""

from .common import FamilyMap, GLUSpec, RMSNormSpec

MISTRAL = FamilyMap(
    name="mistral",
    model_types=("mistral",),
    rms_norms={"MistralRMSNorm": RMSNormSpec()},
    glu_mlps={"MistralMLP": GLUSpec()},
)
