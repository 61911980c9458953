"""LLaVA (LlavaForConditionalGeneration) and Gemma 3 (Gemma3ForConditionalGeneration): a CLIP or SigLIP vision tower, a multimodal projector (linear, GELU,
linear) and a language model (Llama, Mistral, ...: any family with a map), explained as one model.

The map is composed per model (llava_family): the language model's own map plus the vision tower's: LayerNorm
(identity rule on the normaliser), the MLP containers (fc1, activation, fc2: linear around the activation),
QuickGELU (CLIP) or GELU-tanh (SigLIP) and the projector's GELU under the identity rule. Attention: the vision
tower's (CLIPAttention / SiglipAttention, is_causal=False: bidirectional) and the language model's go through the
engine; set_attn_implementation on the top model reaches both sub-configs. With gamma=..., the linear layers of the
vision tower's encoder layers (gamma_scope "encoder.layers": not the language model's "layers") take the gamma rule
as ViT's do; the projector and the language model keep the epsilon rule. SigLIP's pooling head (nn.MultiheadAttention,
not on the AttentionInterface) runs but LLaVA never reads its output, so it carries no relevance.

For explain(): vision_parts(model) says where an image enters (the patch-embedding convolution, pixels -> one
embedding per patch on the (h, w) grid, before the CLS token and the position embeddings are added) and where the
image features meet the text (the language model's inputs_embeds, image features scattered over the image
placeholder tokens). Qwen2-VL and Qwen2.5-VL: models/qwen2_vl.py (the same parts, a Conv3d over flattened
patches in spatial-merge windows).
"""

import inspect
from dataclasses import dataclass, replace

import torch

from . import qwen2_vl
from .common import FamilyMap, UnsupportedModelError

VLM_TYPES = ("llava", "gemma3")
# Gemma3ForConditionalGeneration: SigLIP tower, a projector of average pooling, Gemma3RMSNorm (the text map's) and a
# matrix product, the Gemma 3 language model; its image tokens attend to their own image both ways (the engine's
# per-query key limits). Unlike Gemma3ForCausalLM it applies no final logit softcap.
NO_FINAL_SOFTCAP = ("gemma3",)

CLIP_VISION = FamilyMap(name="clip_vision", model_types=("clip_vision_model",), layer_norms=("LayerNorm",),
                        containers=("CLIPMLP",), gamma_scope="encoder.layers")
SIGLIP_VISION = FamilyMap(name="siglip_vision", model_types=("siglip_vision_model",), layer_norms=("LayerNorm",),
                          containers=("SiglipMLP",), gamma_scope="encoder.layers")
VISION_TOWERS = {f.model_types[0]: f for f in (CLIP_VISION, SIGLIP_VISION)}


def llava_family(config, text_map: FamilyMap) -> FamilyMap:
    """The map of one LLaVA model: its language model's map (`text_map`) joined with its vision tower's."""
    vision_type = getattr(config.vision_config, "model_type", None)
    vision = VISION_TOWERS.get(vision_type)
    if vision is None:
        raise UnsupportedModelError(f"{config.model_type}: no map for its vision tower '{vision_type}' "
                                    f"(known: {sorted(VISION_TOWERS)})")
    if config.model_type in NO_FINAL_SOFTCAP:
        text_map = replace(text_map, final_logit_softcap=None)
    if text_map.final_logit_softcap and getattr(config, text_map.final_logit_softcap, None) is None \
            and getattr(config.text_config, text_map.final_logit_softcap, None) is not None:
        raise UnsupportedModelError(f"{config.model_type}: its language model's final logit softcap is not on the "
                                    "top-level config, where explain() reads it")
    return replace(
        text_map, name=f"{config.model_type} ({text_map.name} + {vision.name})", model_types=(config.model_type,),
        rms_norms={**text_map.rms_norms, **vision.rms_norms},
        layer_norms=tuple(dict.fromkeys(text_map.layer_norms + vision.layer_norms)),
        glu_mlps={**text_map.glu_mlps, **vision.glu_mlps},
        experts=tuple(dict.fromkeys(text_map.experts + vision.experts)),
        containers=tuple(dict.fromkeys(text_map.containers + vision.containers)),
        gamma_scope=vision.gamma_scope)


@dataclass(frozen=True)
class VisionParts:
    """Where a vision-language model's image enters and meets the text."""
    language_model: torch.nn.Module    # called with inputs_embeds: text embeddings with the image features placed
    patch_embedding: torch.nn.Module   # LLaVA, Gemma 3: nn.Conv2d, pixels -> patch embeddings (images, D, h, w);
    #                                    Qwen2-VL: nn.Conv3d, one flattened patch per row (models/qwen2_vl.py)
    image_token_id: int                # the placeholder token the image features replace
    spatial_merge_size: int = 0        # Qwen2-VL: patches come in merge windows of this side; 0: a Conv2d grid

    def image_maps(self, patch_relevance, extra):
        """(one (h, w) map per image, each image's number of placeholders or None for "all the same") from the
        relevance of the patch embedding's output (x * g, the shape the convolution returns); `extra`: the other
        model inputs (image_grid_thw)."""
        if self.spatial_merge_size:
            return qwen2_vl.image_maps(patch_relevance.flatten(1).sum(1), extra.get("image_grid_thw"),
                                       self.spatial_merge_size)
        return list(patch_relevance.sum(1).unbind(0)), None

    def checked_pixels(self, pixel_values, extra):
        """pixel_values as inputs.check_inputs checks them (device, presence): LLaVA's as they are; Qwen2-VL's
        (patches, C*T*P*P) flattened patches, their layout and image_grid_thw checked here, as a 4-D view."""
        if not self.spatial_merge_size or pixel_values is None:
            return pixel_values
        qwen2_vl.check_pixels(pixel_values, extra.get("image_grid_thw"), self.patch_embedding)
        return pixel_values[None, None]

    def model_inputs(self, model, input_ids, extra):
        """Inputs explain() adds for the model (Qwen2-VL: mm_token_type_ids, 1 at image placeholders, as its processor
        returns them; its forward needs them for M-RoPE)."""
        if not self.spatial_merge_size or input_ids is None or "mm_token_type_ids" in extra \
                or "mm_token_type_ids" not in inspect.signature(model.forward).parameters:
            return {}
        return {"mm_token_type_ids": (input_ids == self.image_token_id).int()}


def is_vision_language(model) -> bool:
    """Whether `model` is a vision-language model: a config with a vision and a text sub-config, and image
    features (get_image_features) that go into a language model."""
    config = getattr(model, "config", None)
    return getattr(config, "vision_config", None) is not None and getattr(config, "text_config", None) is not None \
        and hasattr(model, "get_image_features")


def vision_parts(model) -> VisionParts:
    """The VisionParts of a vision-language model (is_vision_language); UnsupportedModelError when its layout is not
    one explain() knows (a language model called with inputs_embeds, a Conv2d patch embedding in the vision tower, or
    Qwen2-VL's Conv3d over flattened patches)."""
    config = model.config
    if getattr(config, "model_type", None) in qwen2_vl.QWEN_VL_TYPES:
        language_model, conv = qwen2_vl.language_and_tower(model)
        return VisionParts(language_model, conv, int(config.image_token_id),
                           int(config.vision_config.spatial_merge_size))
    base = getattr(model, "model", model)
    language_model = getattr(base, "language_model", None)
    tower = getattr(base, "vision_tower", None)
    conv = None if tower is None else next((m for m in tower.modules() if isinstance(m, torch.nn.Conv2d)), None)
    token = getattr(config, "image_token_id", None)
    token = getattr(config, "image_token_index", None) if token is None else token
    if language_model is None or conv is None or token is None:
        raise UnsupportedModelError(
            f"{type(model).__name__}: explain() finds no language model, vision tower with a Conv2d patch embedding, "
            "or image token id where LLaVA has them")
    return VisionParts(language_model, conv, int(token))
