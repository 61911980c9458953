"""Per-family model maps: which module classes get which fused LRP op (see common.py)."""

import torch

from .bert import BERT
from .common import (_NO_MATCH, ACTIVATIONS, ActivationReplacement, FamilyMap, GLUMLPReplacement, GLUSpec,
                     LayerNormReplacement, RMSNormReplacement, RMSNormSpec, UnsupportedModelError, activation_name)
from .gemma import GEMMA, GEMMA2, GEMMA3
from .generic import (AnyActivationReplacement, GatedSplitReplacement, MLPReplacement, MLPSpec, NormReplacement,
                      NormSpec, linear_dims)
from .gpt2 import GPT2
from .llama import LLAMA
from .llava import VLM_TYPES, VisionParts, is_vision_language, llava_family, vision_parts
from .mistral import MISTRAL
from .mixtral import MIXTRAL
from .moe import ExpertsReplacement
from .phi3 import PHI3
from .qwen2 import QWEN2
from .qwen2_vl import QWEN_VL_TYPES, qwen_vl_family
from .qwen3 import QWEN3
from .vit import VIT

FAMILIES = (LLAMA, MISTRAL, MIXTRAL, QWEN2, QWEN3, GEMMA, GEMMA2, GEMMA3, PHI3, GPT2, BERT, VIT)
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def family_for(model) -> FamilyMap:
    """The map for `model`'s config.model_type; for unknown types a generic map built from the module classes
    (RMSNorm-named modules, LayerNorm, Llama-style GLU MLPs), which lrp() then verifies module by module."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in QWEN_VL_TYPES:   # Qwen2-VL / Qwen2.5-VL: their own text and vision maps (models/qwen2_vl.py)
        return qwen_vl_family(config)
    if model_type in VLM_TYPES:   # composed: the language model's map joined with the vision tower's
        text_type = getattr(config.text_config, "model_type", None)
        base = getattr(model, "model", model)
        text_map = _BY_TYPE.get(text_type) or generic_family(getattr(base, "language_model", base), text_type)
        return llava_family(config, text_map)
    if model_type in _BY_TYPE:
        return _BY_TYPE[model_type]
    return generic_family(model, model_type)


def generic_family(model, model_type) -> FamilyMap:
    """RMSNorm-named modules with a weight and Llama-style GLU MLPs (gate_proj, up_proj, down_proj linears and an
    act_fn) go to the fused ops; every other norm, MLP, activation and experts module is recognised by what it
    computes (replacement_for)."""
    rms, glus = {}, {}
    for module in model.modules():
        cls = type(module).__name__
        if cls.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor) \
                and not list(module.children()):
            # Which offset? Gemma-style norms start from zero weights and add 1; tell by the forward's output.
            rms[cls] = None
        elif all(linear_dims(getattr(module, a, None)) is not None for a in ("gate_proj", "up_proj", "down_proj")) \
                and activation_name(getattr(module, "act_fn", None)) in ("silu", "gelu", "gelu_tanh"):
            glus[cls] = GLUSpec()
    return FamilyMap(name=f"generic ({model_type})", model_types=(model_type,), rms_norms=rms, layer_norms=("LayerNorm",),
                     glu_mlps=glus)


# In the order replacement_for tries them on each module: the family map's kinds, then the generic ones.
REPLACEMENTS = (RMSNormReplacement(), LayerNormReplacement(), GLUMLPReplacement(), ExpertsReplacement(),
                MLPReplacement(), NormReplacement(), ActivationReplacement(), GatedSplitReplacement(),
                AnyActivationReplacement())


def replacements_for(module, family):
    """[(Replacement, spec)] of every kind that applies to the module, the family map's first (af.lrp takes the first
    whose check passes)."""
    found = []
    for replacement in REPLACEMENTS:
        spec = replacement.spec_for(module, family)
        if spec is not _NO_MATCH:
            found.append((replacement, spec))
    return found


def replacement_for(module, family):
    """(Replacement, spec) for a module the family map (or the generic rules) covers first, else None."""
    found = replacements_for(module, family)
    return found[0] if found else None


__all__ = ["FAMILIES", "FamilyMap", "GLUSpec", "RMSNormSpec", "UnsupportedModelError", "family_for", "ACTIVATIONS",
           "VisionParts", "is_vision_language", "vision_parts", "MLPSpec", "NormSpec", "replacement_for",
           "replacements_for", "REPLACEMENTS", "linear_dims"]
