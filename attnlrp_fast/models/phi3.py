"""Phi3: one fused gate_up projection whose output halves are the GLU's gate and up."""

from .common import FamilyMap, GLUSpec, RMSNormSpec

PHI3 = FamilyMap(
    name="phi3",
    model_types=("phi3",),
    rms_norms={"Phi3RMSNorm": RMSNormSpec()},
    glu_mlps={"Phi3MLP": GLUSpec(fused="gate_up_proj", act="activation_fn")},
)
