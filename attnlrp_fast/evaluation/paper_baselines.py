"""The AttnLRP paper's baselines, written from their own papers: AtMan, SmoothGrad x input, attention rollout and
Grad x AttnRoll. This module holds their math and the attention implementations they run through;
evaluation/evaluate.py wires them to an input, its padding, target and backend (ev.attribute(model, ids, "atman")).

AtMan (Deiseroth, Deb et al., NeurIPS 2023), `atman`: perturbation through the attention. For each input token i,
one forward pass in which the attention scores toward key i are multiplied by (1 - f) in every layer and head, from
every query, after the scale and the logit softcap and before the mask (the paper multiplies the scores before the
causal mask; f = atman_factor = 0.9, the published suppression factor). Without a softcap that is key i scaled by
(1 - f), run through the engine's attention; with one, plain-torch attention (suppressed_attention). Conceptual
suppression: every other real token j whose input embedding has cosine similarity s_ij >= kappa (atman_kappa = 0.7,
the published threshold) to token i has its scores multiplied by 1 - f * s_ij (the authors' code:
(1 - 0.1) (1 - s) + 0.1 with their factor 0.1 = 1 - f); a token identical to i (s = 1) is suppressed as fully as i.
atman_kappa=None: token i alone. Relevance of i = target score on the input - target score with i suppressed (both
through the same attention implementation). atman_group = g > 1 suppresses runs of g consecutive explained tokens at
once (their similar tokens: by the highest similarity to any of the run's tokens) and gives each token of the run
the run's score drop divided by its length: 1 + ceil(n / g) forward passes per input row of n explained tokens (the
real tokens up to the last position the target reads; later ones cannot change it). The variants run atman_batch
rows per forward.

SmoothGrad (Smilkov et al. 2017) x input, `smoothgrad`: x * mean over S = smoothgrad_samples (16) draws of the
gradient at x + eps, eps ~ N(0, sigma^2), sigma = smoothgrad_noise (0.1) x (max - min) of the row's input embeddings
x (over its real tokens), summed over the hidden dimension. The gradients are af.explain's with rule "grad" (the
engine's exact gradients, on the backend asked for), the noise added after af.explain takes the embeddings, so that
its relevance is x * grad f(x + eps). Sample j of every row is torch.randn((B, N, D), float32) from a generator
seeded with `seed`, drawn in sample order, times sigma; smoothgrad_batch rows per explanation.

Attention rollout (Abnar & Zuidema 2020), `attention_rollout`: per layer A = the attention weights averaged over
heads, A' = 0.5 A + 0.5 I with rows renormalised (a query that sees no key keeps itself), rollout = A'_L ... A'_1;
relevance = the target position's row (the mean of the rows of the positions the target reads). Computed as that
row vector carried from the top layer down, v <- v A'_l, one layer's weights formed at a time in blocks of query
rows from the query and key recorded in one forward: no N x N matrix.

Grad x AttnRoll (Chefer et al., ICCV 2021, the self-attention rule), `grad_x_attnroll`: per layer
A_bar = mean over heads of (grad_A s * A)^+, R = R + A_bar R from the first layer up, starting from R = I;
relevance = R's row(s) of the target position(s). R's row is (I + A_bar_L) ... (I + A_bar_1) read from the left:
carried from the top down, v <- v + v A_bar_l. grad_A s = dO V^T (the attention output O = A V), so one af.explain
pass with rule "grad" records each layer's query, key, value and output gradient dO (O(N) each), and A_bar's rows
are formed in blocks: no N x N matrix is kept, nor made with autograd.
"""

import contextlib
import math
from dataclasses import asdict, dataclass, fields

import torch

from attnlrp_fast.bindings.hf import attnlrp_fast_attention, attnlrp_fast_mask, mask_parts
from attnlrp_fast.bindings.torch_path import visible_keys
from attnlrp_fast.evaluation.capture import attention_implementations
from attnlrp_fast.patching import Patches

METHODS = ("atman", "smoothgrad", "attention_rollout", "grad_x_attnroll")
ATMAN_NAME = "attnlrp_fast_atman"            # the attention implementation with AtMan's multipliers
RECORD_NAME = "attnlrp_fast_record"          # the engine's attention, its inputs (and output gradient) recorded
MULTIPLIER_ATTR = "attnlrp_fast_atman"       # on each attention module: a holder [multiplier (B, M) or None]
RECORDER_ATTR = "attnlrp_fast_record"        # on each attention module: a callable that takes a Recorded
BLOCK = 1 << 24                              # elements of one block of attention scores (B x H x rows x M)


@dataclass(frozen=True)
class Options:
    """The paper baselines' settings (module docstring). Options.of({...}) takes a dict with these names."""

    atman_group: int = 1              # consecutive tokens suppressed together
    atman_factor: float = 0.9         # f: the suppressed token's scores are multiplied by 1 - f
    atman_kappa: float | None = 0.7   # conceptual suppression threshold on the embeddings' cosine; None: off
    atman_batch: int = 32             # suppressed variants per forward
    smoothgrad_samples: int = 16      # S
    smoothgrad_noise: float = 0.1     # sigma / (max - min) of the input embeddings
    smoothgrad_batch: int = 32        # rows (samples x inputs) per explanation

    def __post_init__(self):
        for name in ("atman_group", "atman_batch", "smoothgrad_samples", "smoothgrad_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"method option {name} must be a positive int, got {value!r}")
        if not _number(self.atman_factor) or not 0 <= self.atman_factor <= 1:
            raise ValueError(f"method option atman_factor must lie in [0, 1], got {self.atman_factor!r}")
        if self.atman_kappa is not None and (not _number(self.atman_kappa) or not -1 <= self.atman_kappa <= 1):
            raise ValueError(f"method option atman_kappa must be a cosine in [-1, 1] or None, got "
                             f"{self.atman_kappa!r}")
        if not _number(self.smoothgrad_noise) or not 0 <= self.smoothgrad_noise < math.inf:
            raise ValueError(f"method option smoothgrad_noise must be a finite number >= 0, got "
                             f"{self.smoothgrad_noise!r}")

    @classmethod
    def of(cls, options):
        """Options from None (the defaults), an Options, or a dict of some of its fields (ValueError naming an
        unknown one)."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if not isinstance(options, dict):
            raise TypeError(f"method options must be a dict or an Options, got {type(options).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = [k for k in options if k not in known]
        if unknown:
            raise ValueError(f"unknown method option {unknown[0]!r}; the options are {', '.join(known)}")
        return cls(**options)

    def changed(self):
        """The fields that differ from the defaults, as a dict (what a report states)."""
        default = asdict(Options())
        return {k: v for k, v in asdict(self).items() if v != default[k]}


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _register():
    """Register both attention implementations with transformers (idempotent); both take the engine's masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATMAN_NAME, suppressed_attention)
    AttentionMaskInterface.register(ATMAN_NAME, attnlrp_fast_mask)
    AttentionInterface.register(RECORD_NAME, recording_attention)
    AttentionMaskInterface.register(RECORD_NAME, attnlrp_fast_mask)


@contextlib.contextmanager
def _implementation(model, name, modules, attr, value):
    """The model's attention through `name` for the block, `attr` = value on each of `modules`; the model's attention
    implementations and the modules as before afterwards (also when the block raises)."""
    _register()
    before = attention_implementations(model.config)
    with Patches() as patches:
        for module in modules:
            patches.set(module, attr, value)
        model.set_attn_implementation(name)
        try:
            yield
        finally:
            model.set_attn_implementation(before)


def _heads(t, H):
    """K or V (B, Hkv, M, D) repeated to H heads (GQA)."""
    return t if t.shape[1] == H else t.repeat_interleave(H // t.shape[1], 1)


def _mask_of(attention_mask):
    """(key_padding_mask, segment_ids, key_limit, dense 4-D mask or None) of what an attention function is given."""
    parts = mask_parts(attention_mask)
    if parts is None:
        return None, None, None, attention_mask
    return (*parts, None)


def _block_rows(B, H, M):
    return max(1, BLOCK // max(1, B * H * M))


def _scores(q, k, rows, *, scale, softcap, window, causal, mask, keys, multiplier=None):
    """Attention logits (B, H, P, K) of the query rows `rows` (P,) or (B, P) against keys keys[0]..keys[1]-1, after
    scale and softcap, times multiplier[b, key] (B, M) when given, with the positions a row may not see at -inf;
    q (B, H, N, D), k (B, H, M, D) (heads repeated), mask as _mask_of returns it. In float32 at least."""
    B, H, N, D = q.shape
    M = k.shape[2]
    k0, k1 = keys
    ct = torch.promote_types(q.dtype, torch.float32)
    qs = q[:, :, rows] if rows.dim() == 1 else q[torch.arange(B, device=q.device)[:, None], :, rows].transpose(1, 2)
    s = (qs.to(ct) @ k[:, :, k0:k1].to(ct).transpose(-1, -2)) * (scale if scale is not None else D ** -0.5)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if multiplier is not None:
        s = s * multiplier[:, None, None, k0:k1].to(s.dtype)
    kpm, segment_ids, key_limit, dense = mask
    if dense is not None:
        m = dense[..., rows, k0:k1] if rows.dim() == 1 else None
        if m is None:
            raise NotImplementedError("a 4-D attention mask with rows per batch element")
        return s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.to(ct)
    keep = visible_keys(rows, N, M, causal=causal, window=window or None, key_padding_mask=kpm, device=s.device,
                        segment_ids=segment_ids, key_limit=key_limit, keys=(k0, k1))
    return s.masked_fill(~keep, float("-inf"))


def _key_end(causal, mask, i1, N, M):
    """Keys beyond the last one the block's rows may see (causal, without per-row key limits) need no scores."""
    return min(M, i1 + M - N) if causal and mask[2] is None and mask[3] is None else M


def attention_probabilities(q, k, rows, *, scale=None, softcap=None, window=None, causal=True, key_padding_mask=None,
                            segment_ids=None, key_limit=None):
    """Softmax weights (B, H, P, M) of the query rows `rows` ((P,) shared or (B, P)) of q (B, H, N, D) against k
    (B, Hkv, M, D), with the engine's flags (af.attention's); a row that sees no key is all zeros."""
    k = _heads(k, q.shape[1])
    rows = torch.as_tensor(rows, device=q.device)
    s = _scores(q, k, rows, scale=scale, softcap=softcap, window=window, causal=causal,
                mask=(key_padding_mask, segment_ids, key_limit, None), keys=(0, k.shape[2]))
    return torch.softmax(s, -1).nan_to_num(0.0)


# --- AtMan -----------------------------------------------------------------------------------------------------
def atman_groups(explained, group):
    """The runs of `group` consecutive explained positions ((N,) bool) as a list of (g,) index tensors."""
    return list(explained.nonzero().flatten().split(group))


def atman_multipliers(embeddings, real, groups, factor=0.9, kappa=0.7):
    """(G, N) multipliers on the attention scores toward each key, one row per group of positions: 1 - factor on
    the group's tokens; with kappa, 1 - factor * s on every other real token whose highest cosine similarity s to
    the group's tokens' embeddings (N, D) is >= kappa; 1 elsewhere."""
    G, N = len(groups), embeddings.shape[0]
    mult = torch.ones(G, N, dtype=torch.promote_types(embeddings.dtype, torch.float32), device=embeddings.device)
    if kappa is not None and G:
        e = torch.nn.functional.normalize(embeddings.to(mult.dtype), dim=-1, eps=1e-8)
        members = torch.cat(groups)
        owner = torch.repeat_interleave(torch.arange(G, device=e.device), torch.tensor([len(g) for g in groups],
                                                                                       device=e.device))
        sim = torch.full((G, N), -1.0, dtype=mult.dtype, device=e.device)
        for i in range(0, members.numel(), 1024):
            block = (e[members[i:i + 1024]] @ e.T).clamp(-1, 1)                      # (b, N)
            sim.scatter_reduce_(0, owner[i:i + 1024, None].expand(-1, N), block, "amax")
        similar = (sim >= kappa) & real.to(e.device)[None]
        mult = torch.where(similar, 1 - factor * sim, mult)
    for g, idx in enumerate(groups):
        mult[g, idx] = 1 - factor
    return mult


@contextlib.contextmanager
def suppressing(model, modules):
    """The model's attention through suppressed_attention for the block; yields set(multiplier): (B, M) on the scores
    toward each key for the next forwards of B rows (None: plain attention)."""
    holder = [None]

    def set_multiplier(multiplier):
        holder[0] = multiplier
    with _implementation(model, ATMAN_NAME, modules, MULTIPLIER_ATTR, holder):
        yield set_multiplier


def suppressed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                         softcap=None, is_causal=None, **kwargs):
    """transformers attention interface, AtMan's: attention whose scores (after scale and softcap, before the mask)
    toward key j are multiplied by the module's multiplier[b, j], with the mask as the engine's mask function gives it
    (causal, sliding window, padding, packed sequences, image-token blocks) or a 4-D mask the model built.

    Without a softcap, multiplying the scores toward key j by m_j is multiplying key j by m_j (q . (m_j k_j) =
    m_j (q . k_j)): the engine's attention (af.attention, on the module's backend) runs on the scaled keys. With a
    softcap the multiplier comes after it, which no key scaling expresses: plain torch then, in blocks of query
    rows (no N x M tensor for all rows at once)."""
    if dropout:
        raise ValueError(f"attention dropout p={dropout}: call model.eval()")
    for name in ("s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"atman: attention with {name} (sinks / relative position bias) is not "
                                      "supported")
    holder = getattr(module, MULTIPLIER_ATTR, None)
    multiplier = holder[0] if holder is not None else None
    B, H, N, _ = query.shape
    M = key.shape[2]
    if multiplier is not None and tuple(multiplier.shape) != (B, M):
        raise ValueError(f"atman: multipliers of shape {tuple(multiplier.shape)} for attention over {B} x {M} keys")
    if not softcap:
        if multiplier is not None:
            key = key * multiplier[:, None, :, None].to(key.dtype)
        return attnlrp_fast_attention(module, query, key, value, attention_mask, scaling=scaling,
                                      sliding_window=sliding_window, is_causal=is_causal, **kwargs)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    mask = _mask_of(attention_mask)
    k, v = _heads(key, H), _heads(value, H)
    out = query.new_empty(B, H, N, v.shape[-1])
    step = _block_rows(B, H, M)
    for i0 in range(0, N, step):
        i1 = min(N, i0 + step)
        k1 = _key_end(causal, mask, i1, N, M)
        s = _scores(query, k, torch.arange(i0, i1, device=query.device), scale=scaling, softcap=softcap,
                    window=sliding_window, causal=causal, mask=mask, keys=(0, k1), multiplier=multiplier)
        p = torch.softmax(s, -1).nan_to_num(0.0)
        out[:, :, i0:i1] = (p @ v[:, :, :k1].to(p.dtype)).to(out.dtype)
    return out.transpose(1, 2).contiguous(), None


# --- SmoothGrad ------------------------------------------------------------------------------------------------
def smoothgrad_sigma(embeddings, real, noise):
    """(B,) the noise's standard deviation per row: noise x (max - min) of the row's real tokens' embeddings."""
    e = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))
    real = real.to(e.device)[..., None]
    top = e.masked_fill(~real, float("-inf")).amax(dim=(1, 2))
    bottom = e.masked_fill(~real, float("inf")).amin(dim=(1, 2))
    return (noise * (top - bottom)).to(embeddings.dtype)


def smoothgrad_noise(shape, sigma, samples, seed, device, dtype):
    """(S, B, N, D) noise: sample j = torch.randn((B, N, D), float32) of a generator seeded with `seed`, drawn in
    sample order, times sigma (B,) per row."""
    g = torch.Generator().manual_seed(seed)
    draws = torch.stack([torch.randn(shape, generator=g) for _ in range(samples)])
    return draws.to(device=device, dtype=dtype) * sigma.to(device)[None, :, None, None]


@contextlib.contextmanager
def added_to_input_embeddings(model, noise):
    """Inside the block `noise` (the output's shape) is added to the input-embedding module's output after every
    forward hook registered on it when the module runs (af.explain's, which takes the embeddings its relevance is
    defined on): af.explain's relevance is then x * g(x + noise)."""
    emb = model.get_input_embeddings()
    last = []

    def add(module, inputs, output):
        last.pop().remove()                      # once per call
        return output + noise.to(output.dtype) if output.shape == noise.shape else None

    def register_last(module, inputs):
        last.append(module.register_forward_hook(add))   # after the hooks registered so far
    first = emb.register_forward_pre_hook(register_last)
    try:
        yield
    finally:
        first.remove()
        for handle in last:
            handle.remove()


# --- the attention of every layer, recorded --------------------------------------------------------------------
@dataclass
class Recorded:
    """One call of the engine's attention: its inputs (detached) and, once the backward has run, the gradient of
    its output (None where none came)."""

    query: torch.Tensor                   # (B, H, N, D)
    key: torch.Tensor                     # (B, Hkv, M, D)
    value: torch.Tensor | None            # (B, Hkv, M, Dv), when values are recorded
    scaling: float | None
    softcap: float | None
    window: int | None
    causal: bool
    mask: tuple                           # _mask_of's
    grad: torch.Tensor | None = None      # (B, H, N, Dv): d target / d attention output


def recording_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                        softcap=None, is_causal=None, **kwargs):
    """The engine's attention function, telling the module's recorder, if it has one, what it was given and, through
    a hook on its output, the output's gradient. Calls made inside a backward pass (checkpointed layers run again
    there) are not recorded: the forward's calls are."""
    out, weights = attnlrp_fast_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                          sliding_window=sliding_window, softcap=softcap, is_causal=is_causal,
                                          **kwargs)
    record = getattr(module, RECORDER_ATTR, None)
    if record is not None and not _in_backward():
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        r = Recorded(query.detach(), key.detach(), value.detach() if record.values else None, scaling, softcap,
                     sliding_window, causal, _mask_of(attention_mask))
        record(r)
        if record.values and out.requires_grad:
            out.register_hook(lambda g, r=r: setattr(r, "grad", g.detach().transpose(1, 2)))
    return out, weights


def _in_backward():
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


class _Recorder(list):
    def __init__(self, values):
        super().__init__()
        self.values = values

    def __call__(self, recorded):
        self.append(recorded)


@contextlib.contextmanager
def recording(model, modules, values=False):
    """The model's attention through recording_attention for the block (the model must be inside af.lrp, which routes
    attention through the engine); yields the list of Recorded calls of `modules`, in the order of the forward.
    values=True: also each call's value and its output's gradient."""
    recorder = _Recorder(values)
    with _implementation(model, RECORD_NAME, modules, RECORDER_ATTR, recorder):
        yield recorder


def _check_self_attention(r):
    if r.key.shape[2] != r.query.shape[2]:
        raise NotImplementedError(f"attention rollout needs self-attention layers; one has {r.query.shape[2]} queries "
                                  f"and {r.key.shape[2]} keys")


def rollout(records, start):
    """Attention rollout's rows: start (B, N) (the target rows' weights) times A'_L ... A'_1 of the recorded layers
    (in forward order)."""
    v = start.to(torch.promote_types(records[0].query.dtype, torch.float32)) if records else start.float()
    for r in reversed(records):
        _check_self_attention(r)
        v = _times_layer(r, v, _rollout_block)
    return v


def grad_rollout(records, start):
    """Grad x AttnRoll's rows: start (B, N) times (I + A_bar_L) ... (I + A_bar_1) of the recorded layers (in forward
    order, each with its output gradient; a layer the gradient did not reach adds nothing)."""
    v = start.to(torch.promote_types(records[0].query.dtype, torch.float32)) if records else start.float()
    for r in reversed(records):
        _check_self_attention(r)
        if r.grad is not None:
            v = v + _times_layer(r, v, _grad_block)
    return v


def _rollout_block(r, p, i0, i1, k1):
    """(B, P, K) rows i0..i1-1 of A' = rows renormalised 0.5 mean_h A + 0.5 I (over keys 0..k1-1)."""
    a = 0.5 * p.mean(1)
    rows = torch.arange(i0, i1, device=a.device)
    a[:, rows - i0, rows] += 0.5
    return a / a.sum(-1, keepdim=True)


def _grad_block(r, p, i0, i1, k1):
    """(B, P, K) rows i0..i1-1 of A_bar = mean_h (dO V^T * A)^+ (over keys 0..k1-1)."""
    v = _heads(r.value, p.shape[1])[:, :, :k1].to(p.dtype)
    grad_a = r.grad[:, :, i0:i1].to(p.dtype) @ v.transpose(-1, -2)
    return (grad_a * p).clamp(min=0).mean(1)


def _times_layer(r, v, block):
    """v (B, N) times the layer's matrix (rows formed by block(r, probabilities, i0, i1, k1)), in blocks of rows whose
    v is not all zero."""
    B, H, N, _ = r.query.shape
    M = r.key.shape[2]
    k = _heads(r.key, H)
    out = torch.zeros(B, M, dtype=v.dtype, device=v.device)
    step = _block_rows(B, H, M)
    for i0 in range(0, N, step):
        i1 = min(N, i0 + step)
        w = v[:, i0:i1]
        if not bool(w.any()):
            continue
        k1 = max(_key_end(r.causal, r.mask, i1, N, M), i1 + M - N)
        s = _scores(r.query, k, torch.arange(i0, i1, device=v.device), scale=r.scaling, softcap=r.softcap,
                    window=r.window, causal=r.causal, mask=r.mask, keys=(0, k1))
        p = torch.softmax(s.to(v.dtype), -1).nan_to_num(0.0)
        out[:, :k1] += torch.einsum("bp,bpk->bk", w, block(r, p, i0, i1, k1))
    return out
