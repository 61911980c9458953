"""Qwen2-VL (Qwen2VLForConditionalGeneration) and Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration): a ViT over
flattened (t, h, w) patches, a PatchMerger and a Qwen2 language model with M-RoPE, explained as one model.

Rules (the composed map qwen_vl_family): vision blocks' norms (Qwen2-VL: LayerNorm; Qwen2.5-VL: Qwen2_5_VLRMSNorm)
and the merger's ln_q under the identity rule on the normaliser; Qwen2-VL's VisionMlp (fc1, QuickGELU, fc2) is a
linear container around its activation (identity rule); Qwen2.5-VL's vision MLP is a SiLU GLU (gate * up under the
uniform rule, SiLU under the identity rule); the merger's nn.GELU under the identity rule; the language model's
RMSNorms and Qwen2MLP GLUs as Qwen2's. Rotary embeddings (the vision tower's 2-D, the text's M-RoPE) are linear.
Attention: the vision attention calls transformers' AttentionInterface with is_causal=False and, for any
implementation other than flash attention (the engine's included), one call per image (its cu_seqlens chunk, no
mask); Qwen2.5-VL's windowed layers are the same per window. set_attn_implementation on the top model reaches the
vision and text sub-configs, and lrp().remove() puts each back.

Where an image enters (vision_parts): the patch embedding, an nn.Conv3d over one (temporal_patch_size, patch, patch)
patch per row of pixel_values: (patches, C * T * P * P) -> (patches, D, 1, 1, 1). The image processor lays out each
image's t * h * w patches (image_grid_thw) spatial-merge window by window: row index =
((ti * h/m + bi) * w/m + bj) * m * m + ii * m + jj for the patch at grid cell (bi * m + ii, bj * m + jj) of temporal
slice ti (m = spatial_merge_size). The PatchMerger then turns each window of m * m consecutive rows into one
language-model token, so an image fills t * h * w / m^2 placeholders. image_maps() reads the relevance of every row
(summed over the embedding) back onto the (h, w) patch grid with that order, summing over the temporal patches
(an image has t = 1: its frame repeated over temporal_patch_size).
"""

from dataclasses import replace

import torch

from .common import FamilyMap, GLUSpec, RMSNormSpec, UnsupportedModelError

QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl")

QWEN2_VL_TEXT = FamilyMap(name="qwen2_vl_text", model_types=("qwen2_vl_text",),
                          rms_norms={"Qwen2VLRMSNorm": RMSNormSpec()}, glu_mlps={"Qwen2MLP": GLUSpec()})
QWEN2_5_VL_TEXT = FamilyMap(name="qwen2_5_vl_text", model_types=("qwen2_5_vl_text",),
                            rms_norms={"Qwen2_5_VLRMSNorm": RMSNormSpec()}, glu_mlps={"Qwen2MLP": GLUSpec()})
# vision towers: the blocks' norms and MLPs and the merger's ln_q (its Linear-GELU-Linear is an nn.Sequential:
# linear layers around an nn.GELU the activation rule covers)
QWEN2_VL_VISION = FamilyMap(name="qwen2_vl_vision", model_types=("qwen2_vl_vision",), layer_norms=("LayerNorm",),
                            containers=("VisionMlp",))
QWEN2_5_VL_VISION = FamilyMap(name="qwen2_5_vl_vision", model_types=("qwen2_5_vl_vision",),
                              rms_norms={"Qwen2_5_VLRMSNorm": RMSNormSpec()}, glu_mlps={"Qwen2_5_VLMLP": GLUSpec()})
_PARTS = {"qwen2_vl": (QWEN2_VL_TEXT, QWEN2_VL_VISION), "qwen2_5_vl": (QWEN2_5_VL_TEXT, QWEN2_5_VL_VISION)}


def qwen_vl_family(config) -> FamilyMap:
    """The map of one Qwen2-VL / Qwen2.5-VL model: its language model's map joined with its vision tower's."""
    text, vision = _PARTS[config.model_type]
    return replace(
        text, name=f"{config.model_type} ({text.name} + {vision.name})", model_types=(config.model_type,),
        rms_norms={**text.rms_norms, **vision.rms_norms},
        layer_norms=tuple(dict.fromkeys(text.layer_norms + vision.layer_norms)),
        glu_mlps={**text.glu_mlps, **vision.glu_mlps}, containers=vision.containers)


def patch_order(t: int, h: int, w: int, merge: int, device=None) -> torch.Tensor:
    """(t, h, w) long tensor: the row of pixel_values (within one image's t * h * w patches) holding the patch of
    temporal slice ti at grid cell (i, j), in the image processor's spatial-merge window order (module docstring)."""
    if h % merge or w % merge:
        raise ValueError(f"an image grid of {h} x {w} patches is not made of {merge} x {merge} merge windows")
    rows = torch.arange(t * h * w, device=device).view(t, h // merge, w // merge, merge, merge)
    return rows.permute(0, 1, 3, 2, 4).reshape(t, h, w)


def image_maps(patch_relevance: torch.Tensor, image_grid_thw, merge: int):
    """One (h, w) map per image from the relevance of each row of pixel_values (patches,), and each image's number
    of language-model placeholders (t * h * w / merge^2)."""
    if image_grid_thw is None:
        raise ValueError("a Qwen2-VL model's image relevance needs image_grid_thw (the processor returns it)")
    grids = [tuple(int(v) for v in g) for g in torch.as_tensor(image_grid_thw).reshape(-1, 3).tolist()]
    if sum(t * h * w for t, h, w in grids) != patch_relevance.shape[0]:
        raise ValueError(f"image_grid_thw {grids} describes {sum(t * h * w for t, h, w in grids)} patches, "
                         f"pixel_values holds {patch_relevance.shape[0]}")
    maps, counts, start = [], [], 0
    for t, h, w in grids:
        rows = patch_relevance[start:start + t * h * w]
        maps.append(rows[patch_order(t, h, w, merge, rows.device)].sum(0))
        counts.append(t * h * w // merge ** 2)
        start += t * h * w
    return maps, counts


def check_pixels(pixel_values, image_grid_thw, patch_embedding):
    """Qwen2-VL's pixel_values: (patches, C * T * P * P) flattened patches, with image_grid_thw."""
    conv = patch_embedding
    width = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * conv.kernel_size[2]
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 2 or pixel_values.shape[1] != width:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"pixel_values of this model are (patches, {width}) flattened patches as its image "
                         f"processor returns them, got {shape}")
    if image_grid_thw is None:
        raise ValueError("pass image_grid_thw with pixel_values (the processor returns both)")


def language_and_tower(model):
    base = getattr(model, "model", model)
    language_model, tower = getattr(base, "language_model", None), getattr(base, "visual", None)
    conv = getattr(getattr(tower, "patch_embed", None), "proj", None)
    if language_model is None or not isinstance(conv, torch.nn.Conv3d):
        raise UnsupportedModelError(f"{type(model).__name__}: explain() finds no language model or vision tower with "
                                    "a Conv3d patch embedding where Qwen2-VL has them")
    return language_model, conv
