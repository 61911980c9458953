"""What one attention module is given, for the attention baseline: its query, key and mask flags, recorded on the
way through the engine's attention without a hook in the engine.

The capture is an attention implementation of its own, registered with transformers (AttentionInterface and
AttentionMaskInterface) as "attnlrp_fast_capture": the engine's attention and mask functions, with the inputs of
the one module that carries a recorder written down on the way. capture_attention() puts the recorder on the
module and switches the model to this implementation for one forward; both are undone after, also when the
forward raises.

    seen = capture_attention(model, attention_modules(model)[-1], lambda: model(input_ids=ids))
    seen.query, seen.key, seen.causal, ...
"""

from dataclasses import dataclass

import torch

from attnlrp_fast.bindings.hf import attnlrp_fast_attention, attnlrp_fast_mask
from attnlrp_fast.patching import Patches

NAME = "attnlrp_fast_capture"
RECORDER_ATTR = "attnlrp_fast_capture"   # on the module being recorded: a callable that takes a CapturedAttention


@dataclass
class CapturedAttention:
    """The inputs of one call of the engine's attention, as its flags mean them (see af.attention)."""

    query: torch.Tensor                     # (B, H, N, D), detached
    key: torch.Tensor                       # (B, Hkv, M, D), detached
    scaling: float | None                   # None: D ** -0.5
    softcap: float | None
    window: int | None                      # sliding window; None or 0: none
    causal: bool
    key_padding_mask: torch.Tensor | None   # (B, M) bool, True = real token; None: nothing padded


def capturing_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                        softcap=None, is_causal=None, **kwargs):
    """The engine's attention function (attn_implementation="attnlrp_fast"), telling the module's recorder, if it
    has one, what it was given."""
    out = attnlrp_fast_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                 sliding_window=sliding_window, softcap=softcap, is_causal=is_causal, **kwargs)
    record = getattr(module, RECORDER_ATTR, None)
    if record is not None:   # the engine took the arguments: the mask is its (B, M) padding mask or None
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        kpm = None if attention_mask is None else attention_mask.to(torch.bool)
        record(CapturedAttention(query.detach(), key.detach(), scaling, softcap, sliding_window, bool(causal), kpm))
    return out


def register():
    """Register the capture with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, capturing_attention)
    AttentionMaskInterface.register(NAME, attnlrp_fast_mask)


def attention_implementations(config):
    """The attention implementation of a config and of its sub-configs, in the form set_attn_implementation
    takes: a name, or {"": name, sub_config: ...} when there are sub-configs."""
    subs = {key: attention_implementations(getattr(config, key)) for key in getattr(config, "sub_configs", {})
            if getattr(config, key, None) is not None}
    return {"": config._attn_implementation, **subs} if subs else config._attn_implementation


def capture_attention(model, module, forward) -> CapturedAttention:
    """Run forward() with the model's attention through the capture; what `module` was given (its last call).
    The model's attention implementations and the module are as before afterwards."""
    register()
    seen = []
    before = attention_implementations(model.config)
    with Patches() as patches:
        patches.set(module, RECORDER_ATTR, seen.append)
        model.set_attn_implementation(NAME)
        try:
            forward()
        finally:
            model.set_attn_implementation(before)
    if not seen:
        raise RuntimeError(f"{type(model).__name__}: its {type(module).__name__} did not run through the engine's "
                           "attention")
    return seen[-1]
