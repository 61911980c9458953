"""Registration with transformers: attn_implementation="attnlrp_fast".

The attention function goes into transformers' AttentionInterface and a mask function into its
AttentionMaskInterface, both under the name "attnlrp_fast". The mask function never builds an N x M mask: it
returns the (B, M) padding mask (or None when nothing is padded), like the flash-attention path does, and
the attention function turns the module's flags (is_causal, sliding_window, softcap, scaling) into kernel
arguments. Two patterns beyond those flags go to the kernel as per-token arrays, never as an N x M mask, in a
KernelMask the attention function unpacks: packed sequences (transformers' packed-sequence mask: one segment id
per token, a query sees only its own segment) and bidirectional image-token blocks inside a causal sequence
(transformers' blockwise overlay, Gemma 3: a query in a block sees every key up to the block's end). Patterns that
neither expresses (chunked attention, a model's own mask functions, static caches) raise NotImplementedError
instead of computing something else.

The rule of a module's backward is read from `module.attnlrp_fast_rule` ("grad" unless af.lrp() set it),
the backend from `module.attnlrp_fast_backend`.
"""

import inspect
import threading
from dataclasses import dataclass
from typing import Optional

import torch

from .attention import attention

NAME = "attnlrp_fast"
RULE_ATTR = "attnlrp_fast_rule"
# attention calls served by the engine, counted outside torch.compile: af.lrp's hooks tell from it which attention
# modules computed their attention themselves (and so without the rules)
ENGINE_CALLS = [0]
BACKEND_ATTR = "attnlrp_fast_backend"
# per thread: `attend`, set while a layer runs in sequence chunks, answers its attention call in place of the engine
# call below (attnlrp_fast/seqchunk.py sets it: the layer above registers, this one never imports it)
ATTENTION_HOOK = threading.local()
# on an attention module: a function that answers its attention calls in place of the engine call below, on every
# thread (the backward's recomputation of a checkpointed layer may run on autograd's device thread): the ring
# attention of context parallelism (attnlrp_fast/context_parallel.py sets it on the modules of the model it shards)
ATTEND_ATTR = "attnlrp_fast_attend"

# The mask-function building blocks of transformers.masking_utils that the kernel's flags express (a tuple: torch.compile
# cannot hash the names it reads).
_EXPRESSIBLE = (
    "causal_mask_function",
    "bidirectional_mask_function",
    "sliding_window_overlay.<locals>.inner_mask",
    "sliding_window_bidirectional_overlay.<locals>.inner_mask",
)
_COMBINATIONS = ("and_masks.<locals>.and_mask", "remap_positions_for_packed_sequence.<locals>.inner_mask")
_PACKED = "packed_sequence_mask_function.<locals>.inner_mask"
_UNION = "or_masks.<locals>.or_mask"
_BLOCKS = "blockwise_overlay.<locals>.inner_mask"


@dataclass
class KernelMask:
    """The mask function's answer when flags are not enough: the (B, M) padding mask, (B, M) segment ids of packed
    sequences, (B, N) last key each query may see (image-token blocks). Moves with .to() like a tensor (accelerate
    sends the masks to each layer's device)."""
    key_padding_mask: Optional[torch.Tensor] = None
    segment_ids: Optional[torch.Tensor] = None
    key_limit: Optional[torch.Tensor] = None

    def to(self, *args, **kwargs):
        """The same mask on another device (a dtype asked for is ignored: these are ids and flags)."""
        device = kwargs.get("device", next((a for a in args if isinstance(a, (str, torch.device))), None))
        if device is None:
            return self
        return KernelMask(*(None if t is None else t.to(device) for t in
                            (self.key_padding_mask, self.segment_ids, self.key_limit)))


def _mask_parts(fn):
    """The building blocks of a transformers mask function: names, plus ("segments", ids) for packed sequences and
    ("blocks", ids) for bidirectional image-token blocks. Intersections (and_masks) and the position remapping of
    packed sequences are opened (their closures hold the parts); a packed-sequence mask whose rows each hold one
    sequence is no constraint and drops out (transformers builds one whenever it cannot look at the positions'
    values: when torch.compile traces it); a union is opened only as causal (or sliding-window causal) OR blocks."""
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    cells = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ())]
    inner = [f for contents in cells for f in (contents if isinstance(contents, (tuple, list)) else (contents,))
             if callable(f) and not isinstance(f, torch.Tensor)]
    if name in _COMBINATIONS and cells:
        return [part for f in inner for part in _mask_parts(f)]
    if name == _PACKED and len(cells) == 1 and isinstance(cells[0], torch.Tensor):
        segments = cells[0]
        if segments.dim() == 2 and bool((segments == segments[:, :1]).all()):
            return []
        return [("segments", segments)]
    if name == _BLOCKS and len(cells) == 1 and isinstance(cells[0], torch.Tensor):
        return [("blocks", cells[0])]
    if name == _UNION and len(inner) == 2:
        parts = [_mask_parts(f) for f in inner]
        blocks = [p for p in parts if len(p) == 1 and isinstance(p[0], tuple) and p[0][0] == "blocks"]
        rest = [p for p in parts if p not in blocks]
        causal = ("causal_mask_function", "sliding_window_overlay.<locals>.inner_mask")
        if len(blocks) == 1 and len(rest) == 1 and "causal_mask_function" in rest[0] and \
                all(isinstance(p, str) and p in causal for p in rest[0]):
            return rest[0] + blocks[0]
    return [name]


def _block_key_limit(blocks, q_offset, q_length, kv_offset, kv_length, window):
    """(B, q_length) last key index each query sees under causal OR same-image-block: a block's own last position
    for its tokens, the query's own position for the others. blocks: (B, >= kv_offset + kv_length) block id per
    position, -1 for text. With a sliding window a block longer than the window is refused (causal AND window OR
    block is then not window AND key limit)."""
    total = kv_offset + kv_length
    ids = torch.nn.functional.pad(blocks, (0, max(0, total - blocks.shape[-1])), value=-1)[:, :total]
    positions = torch.arange(total, device=ids.device).expand_as(ids)
    last = torch.ones_like(ids, dtype=torch.bool)
    last[:, :-1] = ids[:, 1:] != ids[:, :-1]
    ends = torch.where(last, positions, torch.full_like(positions, total))
    ends = torch.flip(torch.cummin(torch.flip(ends, [1]), dim=1).values, [1])     # the next block end at or after t
    if window is not None:
        first = torch.ones_like(last)
        first[:, 1:] = last[:, :-1]                                                  # a run starts after a run's end
        starts = torch.cummax(torch.where(first, positions, torch.zeros_like(positions)), dim=1).values
        if bool(((ends - starts + 1 > window) & (ids >= 0)).any()):
            raise NotImplementedError(f"attn_implementation='{NAME}': an image block longer than the sliding window "
                                      f"({window}) cannot be expressed; use attn_implementation='sdpa'")
    q = slice(q_offset, q_offset + q_length)
    limit = torch.where(ids[:, q] >= 0, ends[:, q], positions[:, q]) - kv_offset
    return limit.clamp(max=kv_length - 1).to(torch.int32)


def _traced_mask_parts(fn, use_vmap, config):
    """What _mask_parts says, while torch.compile traces: it cannot read closures, so an intersection's parts are
    hidden. Traced with no cache and no padding mask, transformers always intersects the causal (or sliding-window)
    mask with a packed-sequence mask, as it cannot look at the position ids' values: that intersection is taken as
    the causal one (the window is the module's flag) and the graph asserts from the position ids that no row packs
    several sequences (attnlrp_fast_attention). An intersection with a model's own mask function (use_vmap) or with
    chunked attention stays refused, as do unions (image-token blocks)."""
    name = fn.__name__   # (traced, a nested function has no __qualname__)
    if name == "and_mask" and not use_vmap and getattr(config, "attention_chunk_size", None) is None:
        return ["causal_mask_function"]
    return [name if name in _EXPRESSIBLE else f"{name} (traced)"]


def attnlrp_fast_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                      attention_mask=None, **kwargs):
    """transformers mask interface: the (B, kv_length) bool padding mask, or None when nothing is padded."""
    if mask_function is None:
        parts = ["causal_mask_function"]
    elif torch.compiler.is_compiling():
        parts = _traced_mask_parts(mask_function, kwargs.get("use_vmap", False), kwargs.get("config"))
    else:
        parts = _mask_parts(mask_function)
    extras = dict(p for p in parts if isinstance(p, tuple))
    parts = [p for p in parts if not isinstance(p, tuple)]
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
    if attention_mask is not None:
        attention_mask = attention_mask[:, -kv_length:].to(torch.bool)
        if attention_mask.shape[1] != kv_length:
            raise ValueError(f"attention_mask covers {attention_mask.shape[1]} keys, the attention sees {kv_length}")
        # (on the meta device, af.estimate_memory's, a mask has no values: taken as no padding, as estimates run)
        attention_mask = None if attention_mask.is_meta or bool(attention_mask.all()) else attention_mask
    if not extras:
        return attention_mask
    segments = extras.get("segments")
    if segments is not None:
        segments = segments[:, -kv_length:].to(torch.int32).expand(batch_size, -1)
    limit = None
    if "blocks" in extras:
        config = kwargs.get("config")
        window = getattr(config, "sliding_window", None) if "sliding_window_overlay.<locals>.inner_mask" in parts \
            else None
        limit = _block_key_limit(extras["blocks"].expand(batch_size, -1), int(q_offset), int(q_length),
                                 int(kv_offset), int(kv_length), window)
    return KernelMask(attention_mask, segments, limit)


class RelativePositionBias:
    """T5's relative position bias, kept as its module's own compute_bias in place of the (1, H, N, M) tensor it
    builds: af.lrp patches T5-style attention modules (a relative_attention_bias table and a compute_bias method) to
    return this, T5 passes it from layer to layer as it passes the tensor, and the attention function asks it for the
    (H, N + M - 1) vector the kernels read (af.attention's rel_bias): compute_bias for one query at position
    N - 1 + past against N + M - 1 keys gives the bias of every offset j - i, bucketed by the model's own code."""

    def __init__(self, compute_bias, past=0):
        self.compute_bias, self.past = compute_bias, int(past)
        self._cached = None

    def vector(self, N, M, device):
        key = (N, M, device)
        if self._cached is None or self._cached[0] != key:
            with torch.no_grad():   # a constant of the explanation (no relevance, no gradient)
                values = self.compute_bias(1, N + M - 1, device=device, past_seen_tokens=N - 1 + self.past)
            self._cached = (key, values[0, :, 0, :].float().contiguous())
        return self._cached[1]

    def to(self, *args, **kwargs):   # (moved with the hidden states between devices: its vector follows the call)
        return self


def relative_bias_modules(model):
    """T5-style attention modules with a relative position bias table of their own and T5's compute_bias(query_length,
    key_length, device, past_seen_tokens) (LongT5's block-local one is another kind)."""
    found = []
    for m in model.modules():
        fn = getattr(m, "compute_bias", None)
        if isinstance(getattr(m, "relative_attention_bias", None), torch.nn.Module) and callable(fn):
            try:
                names = set(inspect.signature(fn).parameters)
            except (TypeError, ValueError):
                continue
            if {"query_length", "key_length", "past_seen_tokens"} <= names:
                found.append(m)
    return found


def mask_parts(attention_mask):
    """(key_padding_mask, segment_ids, key_limit) of a mask the engine takes as it is: a KernelMask, a (B, M) padding
    mask or None; None for a tensor of another shape (an N x M mask a model built itself)."""
    if attention_mask is None:
        return None, None, None
    if isinstance(attention_mask, KernelMask):
        return attention_mask.key_padding_mask, attention_mask.segment_ids, attention_mask.key_limit
    if attention_mask.dim() != 2:
        return None
    return attention_mask.to(torch.bool), None, None


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
    if not torch.compiler.is_compiling():
        ENGINE_CALLS[0] += 1
    # a layer run in sequence chunks (attnlrp_fast/seqchunk.py), or a model sharded over ranks (context_parallel.py)
    attend = getattr(ATTENTION_HOOK, "attend", None) or getattr(module, ATTEND_ATTR, None)
    if attend is not None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        return attend(module, query, key, value, attention_mask, scale=scaling, window=sliding_window,
                      softcap=softcap, sinks=kwargs.get("s_aux"), rule=getattr(module, RULE_ATTR, "grad"),
                      backend=getattr(module, BACKEND_ATTR, None), is_causal=causal,
                      position_bias=kwargs.get("position_bias")), None
    rel_bias = _relative_bias(module, kwargs.get("position_bias"), query.shape[2], key.shape[2], query.device)
    sinks = kwargs.get("s_aux")
    parts = mask_parts(attention_mask)
    if parts is None and attention_mask.dim() == 4:   # a mask the model built itself (Doge, Switch Transformers)
        out = dense_attention(query, key, value, rule=getattr(module, RULE_ATTR, "grad"), scale=scaling,
                              mask=attention_mask, softcap=softcap, sinks=sinks, rel_bias=rel_bias,
                              fill=torch.finfo(torch.float32).min)
        return out.transpose(1, 2).contiguous(), None
    if parts is None:
        raise NotImplementedError(
            f"attn_implementation='{NAME}' got a {attention_mask.dim()}-D attention mask; it takes the (B, M) padding "
            f"mask its own mask function makes, and {type(module).__name__} passed one built otherwise")
    kpm, segment_ids, key_limit = parts
    position_ids = kwargs.get("position_ids")
    if torch.compiler.is_compiling() and kpm is None and isinstance(position_ids, torch.Tensor) \
            and position_ids.shape[-1] == query.shape[2] == key.shape[2]:
        # the traced mask could not tell packed sequences apart (attnlrp_fast_mask): refuse them when the graph runs
        torch._assert_async((position_ids.diff(dim=-1) == 1).all(),
                            f"attn_implementation='{NAME}': these position ids pack several sequences into one row, "
                            "which it cannot express; use attn_implementation='sdpa' for packed batches")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    extra = {}
    if segment_ids is not None:
        extra["segment_ids"] = segment_ids
    if key_limit is not None:
        if not causal:
            raise NotImplementedError(f"attn_implementation='{NAME}': image-token blocks in a bidirectional layer")
        extra["key_limit"] = key_limit
    out = attention(query, key, value, causal=bool(causal), scale=scaling, window=sliding_window, softcap=softcap,
                    key_padding_mask=kpm, rule=getattr(module, RULE_ATTR, "grad"),
                    backend=getattr(module, BACKEND_ATTR, None), sinks=sinks, rel_bias=rel_bias, **extra)
    return out.transpose(1, 2).contiguous(), None   # (B, N, H, D) as the other implementations return it


def _scaled_grad(x, factor):
    return x * factor + (x * (1.0 - factor)).detach()


def dense_attention(q, k, v, *, rule, scale=None, mask=None, causal=False, softcap=None, sinks=None, rel_bias=None,
                    fill=float("-inf")):
    """Attention computed densely, for calls that bring an N x M mask of their own (a 4-D mask a model built itself;
    scaled_dot_product_attention with a mask, in code a model runs itself: models/eager_rules.py), with `rule` in
    autograd: AttnLRP halves Q, K, V and P's gradients (dQ = dK = 1/4, dV = 1/2, kernels/rules.py) and puts the
    softcap's tanh under the identity rule; CP-LRP holds P constant. q (..., H, N, D), k/v (..., Hkv, M, D); mask:
    bool (True = visible, hidden keys get `fill`) or additive; causal: queries aligned to the end of the keys; the
    scores in float32 at least. -> (..., H, N, Dv) in v's dtype."""
    from ..kernels.rules import SOFTCAP_IDENTITY

    H, N, M = q.shape[-3], q.shape[-2], k.shape[-2]
    if k.shape[-3] != H:
        k, v = (t.repeat_interleave(H // t.shape[-3], dim=-3) for t in (k, v))
    if rule == "attnlrp":
        q, k, v = _scaled_grad(q, 0.5), _scaled_grad(k, 0.5), _scaled_grad(v, 0.5)
    ct = torch.promote_types(q.dtype, torch.float32)
    u = (q.to(ct) @ k.to(ct).transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if softcap:
        capped = softcap * torch.tanh(u / softcap)
        s = u * (capped / torch.where(u == 0, torch.ones_like(u), u)).detach() if rule in SOFTCAP_IDENTITY else capped
    else:
        s = u
    if rel_bias is not None:
        offsets = torch.arange(M, device=q.device)[None, :] - torch.arange(N, device=q.device)[:, None]
        s = s + rel_bias.to(ct)[:, offsets + N - 1]
    if causal:
        s = s.masked_fill(torch.ones(N, M, dtype=torch.bool, device=s.device).tril(M - N).logical_not(), fill)
    if mask is not None:
        s = s.masked_fill(~mask, fill) if mask.dtype == torch.bool else s + mask.to(ct)
    if sinks is not None:
        s = torch.cat([s, sinks.to(ct)[:, None, None].expand(*s.shape[:-1], 1)], dim=-1)
    p = torch.softmax(s, dim=-1)
    p = p[..., :M] if sinks is not None else p
    if rule == "cp":
        p = p.detach()
    elif rule == "attnlrp":
        p = _scaled_grad(p, 0.5)
    return p.to(v.dtype) @ v


def _relative_bias(module, position_bias, N, M, device):
    """af.attention's rel_bias for a T5-style position_bias: its vector (RelativePositionBias), None for none or for
    the zeros T5 passes to layers without a table of their own; a position bias of any other values as an N x M
    tensor is refused."""
    if position_bias is None:
        return None
    if isinstance(position_bias, RelativePositionBias):
        return position_bias.vector(N, M, device)
    if isinstance(position_bias, torch.Tensor) and not bool(position_bias.any()):
        return None
    raise NotImplementedError(
        f"attn_implementation='{NAME}': {type(module).__name__} passes its position bias as an N x M tensor, which "
        "the engine does not take; inside af.lrp() T5-style biases are computed from their table in the kernel")


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
