"""Gemma, Gemma2, Gemma3 (text): RMSNorm with weight offset 1 computed in fp32, GELU-tanh GLU MLPs,
scaled embeddings (linear: input relevance is unchanged by the scale). Gemma2/3: attention logit softcap
(identity rule on its tanh, in the kernel), sliding-window layers, and Gemma2's final logit softcap
(identity rule applied by explain())."""

from .common import FamilyMap, GLUSpec, RMSNormSpec

GEMMA_NORM = RMSNormSpec(offset=1.0, promote_output=False)

GEMMA = FamilyMap(
    name="gemma",
    model_types=("gemma",),
    rms_norms={"GemmaRMSNorm": GEMMA_NORM},
    glu_mlps={"GemmaMLP": GLUSpec()},
)

GEMMA2 = FamilyMap(
    name="gemma2",
    model_types=("gemma2",),
    rms_norms={"Gemma2RMSNorm": GEMMA_NORM},
    glu_mlps={"Gemma2MLP": GLUSpec()},
    final_logit_softcap="final_logit_softcapping",
)

GEMMA3 = FamilyMap(
    name="gemma3_text",
    model_types=("gemma3_text",),
    rms_norms={"Gemma3RMSNorm": GEMMA_NORM},
    glu_mlps={"Gemma3MLP": GLUSpec()},
    final_logit_softcap="final_logit_softcapping",
)
