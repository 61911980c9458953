"""Mixtral: sparse mixture of experts. Each expert is a SwiGLU (fused op); the routing weight times the
expert's output is a product of two input-dependent factors, so it takes the uniform rule. The router's
softmax keeps its exact gradient (Taylor rule), as in attention."""

from .common import FamilyMap, RMSNormSpec

MIXTRAL = FamilyMap(
    name="mixtral",
    model_types=("mixtral",),
    rms_norms={"MixtralRMSNorm": RMSNormSpec()},
    experts=("MixtralExperts",),
    containers=("MixtralSparseMoeBlock",),
)
