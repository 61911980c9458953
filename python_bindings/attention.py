"""torch.library custom ops for attention: forward, backward per rule, autograd, backend dispatch.

  attnlrp_fast::attention_fwd(q, k, v, kpm?, causal, scale, window, softcap, rule, backend, segment_ids?=None,
                              key_limit?=None) -> (o, lse)
  attnlrp_fast::attention_bwd(do, q, k, v, o, lse, kpm?, causal, scale, window, softcap, rule, backend,
                              segment_ids?=None, key_limit?=None, rel_bias?=None, delta?=None) -> (dq, dk, dv)

delta (B, H, N) fp32 = rowsum(dO * O) of the whole attention the call's keys are a part of (ring attention,
bindings/ring.py: each block's backward given the merged O, LSE and delta is the exact whole-softmax gradient of
its keys); None: computed from this call's do and o (the torch chunked path: from its own P and dP).

`window` 0 and `softcap` 0.0 mean "none" (the schema has no optional scalars). The forward is the same
for every rule; the rule only picks the backward. Both ops have fake implementations, so torch.compile
traces through them without graph breaks.

Dispatch: dispatch.attention_choice (CUDA -> torch's fused SDPA kernels or the Triton kernels, per call and per the
measured dispatch table; CPU -> the torch path of torch_path.py or Triton's interpreter; float64 -> torch).
attention() below is the public function (af.attention).
"""

import math
from typing import Optional

import torch

from ..kernels.attention_bwd import attention_bwd as triton_bwd
from ..kernels.attention_fwd import attention_fwd as triton_fwd
from ..kernels.rules import SOFTMAX_INPUT_FACTORS
from . import torch_path
from .checks import check_attention_arguments
from .dispatch import attention_choice, dense


def _opt(window: int, softcap: float):
    return (window if window > 0 else None), (softcap if softcap > 0 else None)


def _choice(q, k, kpm, causal, window, softcap, rule, backend, segment_ids, key_limit, rel_bias=None):
    """Where this call runs (dispatch.attention_choice); the forward and backward of one call decide alike."""
    return attention_choice(q, k, key_padding_mask=kpm, causal=causal, window=window, softcap=softcap, rule=rule,
                            segment_ids=segment_ids, key_limit=key_limit,
                            backend=None if backend == "auto" else backend, rel_bias=rel_bias)


@torch.library.custom_op("attnlrp_fast::attention_fwd", mutates_args=())
def attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                     causal: bool, scale: float, window: int, softcap: float, rule: str,
                     backend: str, segment_ids: Optional[torch.Tensor] = None,
                     key_limit: Optional[torch.Tensor] = None,
                     rel_bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    win, cap = _opt(window, softcap)
    choice = _choice(q, k, key_padding_mask, causal, win, cap, rule, backend, segment_ids, key_limit, rel_bias)
    kw = dict(causal=causal, scale=scale, window=win, softcap=cap, segment_ids=segment_ids, key_limit=key_limit,
              rel_bias=rel_bias)
    if choice.path == "triton":
        return dense(triton_fwd)(q, k, v, key_padding_mask, prefer=choice.forward, exclude=choice.exclude, **kw)
    return dense(torch_path.attention_fwd_torch)(q, k, v, key_padding_mask, **kw)


@attention_fwd_op.register_fake
def _(q, k, v, key_padding_mask, causal, scale, window, softcap, rule, backend, segment_ids=None, key_limit=None,
      rel_bias=None):
    B, H, N, D = q.shape   # contiguous, as dispatch.pick returns every path's results
    return q.new_empty((B, H, N, D)), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("attnlrp_fast::attention_bwd", mutates_args=())
def attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                     lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor], causal: bool, scale: float,
                     window: int, softcap: float, rule: str,
                     backend: str, segment_ids: Optional[torch.Tensor] = None,
                     key_limit: Optional[torch.Tensor] = None,
                     rel_bias: Optional[torch.Tensor] = None,
                     delta: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    win, cap = _opt(window, softcap)
    choice = _choice(q, k, key_padding_mask, causal, win, cap, rule, backend, segment_ids, key_limit, rel_bias)
    kw = dict(causal=causal, scale=scale, window=win, softcap=cap, rule=rule, segment_ids=segment_ids,
              key_limit=key_limit, rel_bias=rel_bias, delta=delta)
    if choice.path == "triton":
        return dense(triton_bwd)(do, q, k, v, o, lse, key_padding_mask, dq_mode=choice.dq, **kw)
    return dense(torch_path.attention_bwd_torch)(do, q, k, v, o, lse, key_padding_mask, **kw)


@attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, key_padding_mask, causal, scale, window, softcap, rule, backend, segment_ids=None,
      key_limit=None, rel_bias=None, delta=None):
    # contiguous, as dispatch.pick returns every path's results
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, causal, scale, window, softcap, rule, backend, segment_ids, key_limit, rel_bias = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, key_padding_mask, segment_ids, key_limit, rel_bias)
    ctx.options = (causal, scale, window, softcap, rule, backend)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, key_padding_mask, segment_ids, key_limit, rel_bias = ctx.saved_tensors
    dq, dk, dv = attention_bwd_op(do, q, k, v, o, lse, key_padding_mask, *ctx.options, segment_ids, key_limit,
                                  rel_bias)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("attnlrp_fast::attention_fwd", _backward, setup_context=_setup_context)


def segment_ids_from_cu_seqlens(cu_seqlens, total):
    """Segment ids (1, total) int32 of packed variable-length sequences: cu_seqlens int (S + 1,), nondecreasing
    from 0, sequence s holding positions cu_seqlens[s] .. cu_seqlens[s + 1] - 1; positions from cu_seqlens[-1]
    to total (padding after the last sequence) get the id S, a segment of their own. For attention(...,
    segment_ids=...) on q, k, v packed along the sequence dim with batch size 1."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be an int32 or int64 tensor, got "
                        f"{cu_seqlens.dtype if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must have shape (S + 1,), got {tuple(cu_seqlens.shape)}")
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise ValueError(f"total must be a non-negative int, got {total!r}")
    positions = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    # sequence s holds cu[s] <= t < cu[s + 1]: the number of ends cu[1:] at or before t
    ids = torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)
    return ids.to(torch.int32)[None]


class _SinkAttention(torch.autograd.Function):
    """Attention with a learned logit per head in every row's softmax denominator (attention sinks: GPT-OSS): a key
    with logit sinks[h] and value 0. From the plain forward's (o, lse): lse' = logaddexp(lse, sink) and
    o' = o exp(lse - lse'). The backward is the plain backward given (o', lse'): it recomputes P' = exp(s - lse')
    and delta = rowsum(dO o'), which is the sink-attention softmax's backward (the sink's value is 0, so its
    column adds nothing to dP); each rule's factors apply as without a sink. The sink logits' own gradient is
    -sum over rows of P'_sink * delta, times the rule's factor on the softmax's inputs (kernels/rules.py
    SOFTMAX_INPUT_FACTORS; under the explanation rules the sink is a constant that absorbs relevance, like a bias)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, key_padding_mask, causal, scale, window, softcap, rule, backend, segment_ids,
                key_limit, rel_bias):
        o, lse = attention_fwd_op(q, k, v, key_padding_mask, causal, scale, window, softcap, rule, backend,
                                  segment_ids, key_limit, rel_bias)
        lse_sink = torch.logaddexp(lse, sinks.float()[None, :, None].expand_as(lse))
        o_sink = (o.float() * torch.exp(lse - lse_sink)[..., None]).to(o.dtype)
        ctx.save_for_backward(q, k, v, o_sink, lse_sink, sinks, key_padding_mask, segment_ids, key_limit, rel_bias)
        ctx.options = (causal, scale, window, softcap, rule, backend)
        return o_sink

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, sinks, key_padding_mask, segment_ids, key_limit, rel_bias = ctx.saved_tensors
        dq, dk, dv = attention_bwd_op(do.contiguous(), q, k, v, o, lse, key_padding_mask, *ctx.options, segment_ids,
                                      key_limit, rel_bias)
        dsinks = None
        if ctx.needs_input_grad[3]:
            delta = (do.float() * o.float()).sum(-1)
            factor = SOFTMAX_INPUT_FACTORS[ctx.options[4]]
            dsinks = -factor * (torch.exp(sinks.float()[None, :, None] - lse) * delta).sum((0, 2))
            dsinks = dsinks.to(sinks.dtype)
        return dq, dk, dv, dsinks, None, None, None, None, None, None, None, None, None, None


def attention(q, k, v, *, causal=False, scale=None, rule="grad", window=None, softcap=None,
              key_padding_mask=None, backend=None, segment_ids=None, key_limit=None, sinks=None, rel_bias=None):
    """Scaled dot-product attention whose backward follows an explanation rule.

    q (B, H, N, D); k, v (B, Hkv, M, D) with H % Hkv == 0 (grouped-query attention without copying
    K/V); any strides. Returns (B, H, N, D) in q's dtype.

    rule: "grad" exact gradients | "attnlrp" (AttnLRP: dV = 1/2, dQ = dK = 1/4 of the exact gradients, the
    softcap's tanh under the identity rule) | "cp" (CP-LRP: dQ = dK = 0, dV exact). The forward is the same.
    causal: queries aligned to the end of the keys (query i sees key j iff j <= i + M - N).
    window=W: also (i + M - N) - j < W, and j - (i + M - N) < W when not causal.
    softcap=c: logits -> c * tanh(logits / c). key_padding_mask: bool (B, M), True = real token.
    scale: defaults to 1 / sqrt(D). backend: None (auto) | "triton" | "torch".
    segment_ids: int32/int64 (B, M), one id per key position; query i has the id of its position i + M - N
    (needs N <= M) and sees only keys with the same id (packed sequences: segment_ids_from_cu_seqlens).
    key_limit: int32/int64 (B, N), needs causal=True: query i sees the keys j <= key_limit[b, i] in place of the
    causal j <= i + M - N (e.g. key_limit[b, i] = the end of the image block holding query i, i + M - N
    elsewhere). Both combine with window, softcap, key_padding_mask and with each other; memory stays O(N + M).
    sinks: (H,) one logit per query head added to every row's softmax denominator (attention sinks, GPT-OSS): a
    key every query sees, with value 0 (_SinkAttention).
    rel_bias: (H, N + M - 1) float, a bias on the logits that depends on the head and the offset j - i only: query i
    and key j get + rel_bias[h, j - i + N - 1] (after scale and softcap). T5's bucketed relative position bias and
    ALiBi (-slope_h |j - i|) are such vectors, O(N + M) where the bias matrix would be N x M. It is a constant of
    the call (no gradient flows to it; under the rules it absorbs relevance like any bias).
    v may have another head dim than q and k (multi-head latent attention, DeepSeek V2/V3): the smaller of the two
    is padded with zeros to the larger (zero value columns add nothing; zero q/k columns leave the logits as they
    are, and scale defaults to 1 / sqrt(q's own head dim)); the output has v's head dim.
    A query row that sees no key outputs zeros and gets zero gradient.
    """
    check_attention_arguments(q, k, v, causal, scale, rule, window, softcap, key_padding_mask, backend,
                              segment_ids=segment_ids, key_limit=key_limit, sinks=sinks, rel_bias=rel_bias)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[3])
    dqk, dv = q.shape[3], v.shape[3]
    if dv < dqk:
        v = torch.nn.functional.pad(v, (0, dqk - dv))
    elif dqk < dv:
        q, k = (torch.nn.functional.pad(t, (0, dv - dqk)) for t in (q, k))
    rel_bias = None if rel_bias is None else rel_bias.detach()
    args = (key_padding_mask, causal, float(scale), int(window or 0), float(softcap or 0.0), rule, backend or "auto",
            segment_ids, key_limit, rel_bias)
    if sinks is not None:
        o = _SinkAttention.apply(q, k, v, sinks, *args)
    else:
        o, _ = attention_fwd_op(q, k, v, *args)
    return o[..., :dv] if dv < dqk else o
