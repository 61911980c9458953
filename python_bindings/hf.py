"""Registration with transformers: attn_implementation="attnlrp_fast".

The attention function goes into transformers' AttentionInterface and a mask function into its
AttentionMaskInterface, both under the name "attnlrp_fast". The mask function never builds an N x M mask: it
returns the (B, M) padding mask (or None when nothing is padded), like the flash-attention path does, and
the attention function turns the module's flags (is_causal, sliding_window, softcap, scaling) into kernel
arguments. Mask patterns that flags cannot express (packed sequences, bidirectional image-token blocks,
chunked attention, static caches) raise NotImplementedError instead of computing something else.

The rule of a module's backward is read from `module.attnlrp_fast_rule` ("grad" unless af.lrp() set it),
the backend from `module.attnlrp_fast_backend`.
"""

import torch

from .attention import attention

NAME = "attnlrp_fast"
RULE_ATTR = "attnlrp_fast_rule"
BACKEND_ATTR = "attnlrp_fast_backend"

# The mask-function building blocks of transformers.masking_utils that the kernel's flags express.
_EXPRESSIBLE = {
    "causal_mask_function",
    "bidirectional_mask_function",
    "sliding_window_overlay.<locals>.inner_mask",
    "sliding_window_bidirectional_overlay.<locals>.inner_mask",
}


def _mask_parts(fn):
    """The building blocks of a transformers mask function (and_masks nests them in a closure)."""
    name = getattr(fn, "__qualname__", repr(fn))
    if name == "and_masks.<locals>.and_mask" and fn.__closure__:
        parts = []
        for cell in fn.__closure__:
            contents = cell.cell_contents
            if isinstance(contents, (tuple, list)):
                for inner in contents:
                    parts.extend(_mask_parts(inner))
        return parts
    return [name]


def attnlrp_fast_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                      attention_mask=None, **kwargs):
    """transformers mask interface: the (B, kv_length) bool padding mask, or None when nothing is padded."""
    parts = _mask_parts(mask_function) if mask_function is not None else ["causal_mask_function"]
    unsupported = [p for p in parts if p not in _EXPRESSIBLE]
    if unsupported:
        raise NotImplementedError(
            f"attn_implementation='{NAME}' takes causal, sliding-window and padding masks; this input needs "
            f"the mask pattern {unsupported} (packed sequences, image-token blocks or chunked attention), "
            "which it cannot express. Use attn_implementation='sdpa' for it.")
    q_end = int(q_offset) + int(q_length)
    kv_end = int(kv_offset) + int(kv_length)
    positional = any(p != "bidirectional_mask_function" for p in parts)
    if positional and q_end != kv_end:
        raise NotImplementedError(
            f"attn_implementation='{NAME}' aligns queries with the end of the keys; this cache holds keys up to "
            f"position {kv_end} for queries ending at {q_end} (a static cache?). Use a DynamicCache (the default).")
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:].to(torch.bool)
    if attention_mask.shape[1] != kv_length:
        raise ValueError(f"attention_mask covers {attention_mask.shape[1]} keys, the attention sees {kv_length}")
    return None if bool(attention_mask.all()) else attention_mask


def attention_modules(model):
    """The model's attention modules (those the attention interface is called from)."""
    return [m for m in model.modules() if type(m).__name__.endswith("Attention") or hasattr(m, "is_causal")]


def attnlrp_fast_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                           softcap=None, is_causal=None, **kwargs):
    """transformers attention interface: query (B, H, N, D), key/value (B, Hkv, M, D) -> ((B, N, H, D), None)."""
    if dropout:
        raise ValueError(
            f"attn_implementation='{NAME}' has no attention dropout (got p={dropout}): call model.eval(), or set the "
            "config's attention dropout to 0 for training")
    for name in ("s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"attn_implementation='{NAME}' does not support {name}")
    kpm = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(
                f"attn_implementation='{NAME}' got a {attention_mask.dim()}-D attention mask; it takes the (B, M) padding "
                "mask its own mask function makes. Was the mask built for another attn_implementation?")
        kpm = attention_mask.to(torch.bool)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = attention(query, key, value, causal=bool(causal), scale=scaling, window=sliding_window, softcap=softcap,
                    key_padding_mask=kpm, rule=getattr(module, RULE_ATTR, "grad"),
                    backend=getattr(module, BACKEND_ATTR, None))
    return out.transpose(1, 2), None


def register() -> bool:
    """Register with transformers if it is installed; True when registered."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    AttentionInterface.register(NAME, attnlrp_fast_attention)
    AttentionMaskInterface.register(NAME, attnlrp_fast_mask)
    return True
