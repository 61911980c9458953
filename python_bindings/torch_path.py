"""The torch path of every op: what the Triton kernels compute, in torch operations. It serves CPU tensors when
Triton's interpreter is off, float64 anywhere, and on CUDA whatever backend="torch" (or auto's dispatch table,
dispatch.py) sends it.

Attention runs on torch's own fused attention kernels where they express the call (sdpa.py: the exact gradients
times the rules' factors of kernels/rules.py; CPU, and CUDA's flash / memory-efficient kernels), or, with a
window, softcap, segment ids or key limits, processes queries in chunks with the kernels' explicit formulas;
memory stays linear in N either way (never an N x M tensor). The norm, GLU and activation functions mirror
kernels/norm.py and kernels/glu.py. Computation in float32 (float64 for float64 inputs). The float64 oracles the
tests compare this path with live apart, in attnlrp_fast/reference.py, and share no code with it.
"""

import math

import torch

from ..kernels.glu import ACT_IDS
from ..kernels.rules import ATTENTION_FACTORS, SOFTCAP_IDENTITY
from . import sdpa
from .sdpa import compute_dtype

# Elements per chunk of the (heads x rows x keys) score block (8 MiB in float32; a chunk's backward holds about
# four such blocks at once).
CHUNK_ELEMENTS = 1 << 21


def visible_keys(rows, n, m, *, causal=False, window=None, key_padding_mask=None, device=None, segment_ids=None,
                 key_limit=None, keys=None):
    """Bool mask (B or 1, 1, P, K): may query row i (position i + m - n) see key j? rows: P row indices shared
    by the batch, or (B, P), rows per batch element. keys: (k0, k1), the keys j = k0..k1-1 asked about (default all
    m). segment_ids (B, M): only keys with the id of the row's position (n <= m); key_limit (B, N), causal only:
    j <= key_limit[b, i] in place of j <= i + m - n."""
    k0, k1 = (0, m) if keys is None else keys
    row_idx = torch.as_tensor(rows, device=device)
    qpos = (row_idx + (m - n))[..., None]
    kpos = torch.arange(k0, k1, device=device)
    keep = torch.ones(qpos.shape[:-1] + (k1 - k0,), dtype=torch.bool, device=device)
    if causal and key_limit is None:
        keep &= kpos <= qpos
    if window is not None:
        keep &= qpos - kpos < window
        if not causal:
            keep &= kpos - qpos < window
    keep = keep[None, None] if keep.dim() == 2 else keep[:, None]
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, None, k0:k1].to(device=keep.device, dtype=torch.bool)
    if segment_ids is not None or key_limit is not None:
        batch = (segment_ids if segment_ids is not None else key_limit).shape[0]
        per_row = row_idx.expand(batch, row_idx.shape[-1]).long()     # (B, P)
        if key_limit is not None and causal:
            limit = torch.gather(key_limit.to(device=keep.device).long(), 1, per_row)
            keep = keep & (kpos <= limit[..., None])[:, None]
        if segment_ids is not None:
            seg = segment_ids.to(device=keep.device)
            row_seg = torch.gather(seg, 1, per_row + (m - n))             # the ids of the rows' positions
            keep = keep & (row_seg[:, :, None] == seg[:, None, k0:k1])[:, None]
    return keep


def _chunks(B, H, N, M, chunk, causal, window, key_limit):
    """(i0, i1, k0, k1): query rows i0..i1-1 and the keys k0..k1-1 that any of them may see (causal bound, window,
    key limit; k1 <= k0: none). Rows per chunk: `chunk`, or what keeps a (heads x rows x keys) block near
    CHUNK_ELEMENTS."""
    width = M if window is None else min(M, window if causal else 2 * window - 1)
    if chunk is None:
        chunk = max(16, CHUNK_ELEMENTS // max(1, B * H * width))
    limits = None
    if causal and key_limit is not None:
        limits = key_limit.amax(0).tolist()         # (N,): the furthest key any batch row's query i may see
    for i0 in range(0, N, chunk):
        i1 = min(i0 + chunk, N)
        first, last = i0 + M - N, i1 - 1 + M - N
        k0 = 0 if window is None else max(0, first - window + 1)
        if causal:
            k1 = min(M, last + 1) if limits is None else min(M, int(max(limits[i0:i1])) + 1)
        else:
            k1 = M if window is None else min(M, last + window)
        yield i0, i1, k0, k1


def _scores(qc, k, rows, N, M, scale, softcap, causal, window, key_padding_mask, segment_ids=None, key_limit=None,
            rel_bias=None, keys=None):
    """Raw logits u, transformed logits s (u itself without a softcap) and visibility for the query rows `rows`
    and the keys `keys` = (k0, k1) of which k holds k0..k1-1. qc (B, Hkv, G, C, D), k (B, Hkv, K, D) ->
    (B, Hkv, G, C, K) blocks. rel_bias (H, N + M - 1): added to s at [h, j - i + N - 1] (after the softcap), gathered
    for these rows and keys only."""
    k0, k1 = keys
    u = qc @ k[:, :, None].transpose(-1, -2)
    u.mul_(scale)
    s = u if softcap is None else torch.tanh(u / softcap).mul_(softcap)
    if rel_bias is not None:
        idx = (torch.arange(k0, k1, device=qc.device)[None, :] - torch.as_tensor(rows, device=qc.device)[:, None]
               + (N - 1))
        bias = rel_bias.to(s.dtype)[:, idx].reshape(1, k.shape[1], -1, idx.shape[0], k1 - k0)
        s = s + bias if s is u else s.add_(bias)
    keep = visible_keys(rows, N, M, causal=causal, window=window, key_padding_mask=key_padding_mask, device=qc.device,
                        segment_ids=segment_ids, key_limit=key_limit, keys=keys)
    return u, s, keep[:, :, None]


def _attention_fwd_chunked(q, k, v, key_padding_mask=None, *, causal=False, scale=1.0, window=None, softcap=None,
                           chunk=None, segment_ids=None, key_limit=None, rel_bias=None):
    """Chunked forward: O (B,H,N,D) in q's dtype and LSE (B,H,N) fp32 (+inf for rows seeing no key)."""
    B, H, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    G = H // Hkv
    ct = compute_dtype(q.dtype)
    qg = q.to(ct).reshape(B, Hkv, G, N, D)
    kc, vc = k.to(ct), v.to(ct)
    o = torch.zeros((B, Hkv, G, N, D), dtype=q.dtype, device=q.device)
    lse = torch.full((B, Hkv, G, N), float("inf"), dtype=torch.float32, device=q.device)
    for i0, i1, k0, k1 in _chunks(B, H, N, M, chunk, causal, window, key_limit):
        if k1 <= k0:
            continue
        _, s, keep = _scores(qg[:, :, :, i0:i1], kc[:, :, k0:k1], range(i0, i1), N, M, scale, softcap, causal,
                             window, key_padding_mask, segment_ids, key_limit, rel_bias, (k0, k1))
        s.masked_fill_(~keep, float("-inf"))
        lse_c = torch.logsumexp(s, dim=-1)
        lse_c.masked_fill_(lse_c == float("-inf"), float("inf"))
        p = s.sub_(lse_c[..., None]).exp_()                 # (s is a block of this chunk's own: no copy)
        o[:, :, :, i0:i1] = (p @ vc[:, :, None, k0:k1]).to(q.dtype)
        lse[:, :, :, i0:i1] = lse_c.float()
    return o.reshape(B, H, N, D), lse.reshape(B, H, N)


def _attention_bwd_chunked(do, q, k, v, o, lse, key_padding_mask=None, *, causal=False, scale=1.0, window=None,
                           softcap=None, rule="grad", chunk=None, segment_ids=None, key_limit=None, rel_bias=None,
                           delta=None):
    """Chunked backward under `rule`; the formulas of kernels/attention_bwd.py (o is not needed: delta comes
    from each chunk's P and dP, unless given: (B, H, N) rowsum(dO * O) of a softmax these keys are one block of)."""
    B, H, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    G = H // Hkv
    ct = compute_dtype(q.dtype)
    qk_factor, dv_factor = ATTENTION_FACTORS[rule]
    qg = q.to(ct).reshape(B, Hkv, G, N, D)
    dog = do.to(ct).reshape(B, Hkv, G, N, D)
    lseg = lse.to(ct).reshape(B, Hkv, G, N)
    deltag = None if delta is None else delta.to(ct).reshape(B, Hkv, G, N)
    kc, vc = k.to(ct), v.to(ct)
    dq = torch.zeros((B, Hkv, G, N, D), dtype=ct, device=q.device)
    dk = torch.zeros((B, Hkv, M, D), dtype=ct, device=q.device)
    dv = torch.zeros((B, Hkv, M, D), dtype=ct, device=q.device)
    for i0, i1, k0, k1 in _chunks(B, H, N, M, chunk, causal, window, key_limit):
        if k1 <= k0:
            continue
        qc, doc, kb = qg[:, :, :, i0:i1], dog[:, :, :, i0:i1], kc[:, :, k0:k1]
        u, s, keep = _scores(qc, kb, range(i0, i1), N, M, scale, softcap, causal, window, key_padding_mask,
                             segment_ids, key_limit, rel_bias, (k0, k1))
        p = s.sub(lseg[:, :, :, i0:i1, None]) if s is u else s.sub_(lseg[:, :, :, i0:i1, None])
        p = p.exp_().masked_fill_(~keep, 0.0)
        dv[:, :, k0:k1] += torch.einsum("bhgnm,bhgnd->bhmd", p, doc)
        if rule == "cp":
            continue
        dp = doc @ vc[:, :, None, k0:k1].transpose(-1, -2)
        # delta = rowsum(P * dP) from the same P and dP (the chunk holds whole rows): consistent rounding, where
        # rowsum(dO * O) would mix in the forward's rounding and lose digits when dP - delta cancels.
        row = (p[..., None, :] @ dp[..., None]).squeeze(-1) if deltag is None else deltag[:, :, :, i0:i1, None]
        ds = dp.sub_(row).mul_(p)                           # p * (dp - row), in dp's block
        del p, dp
        if softcap is not None:
            if rule in SOFTCAP_IDENTITY:
                small = u.abs() < 1e-6
                capped = torch.tanh(u / softcap).mul_(softcap)
                ds.mul_(torch.where(small, 1.0, capped.div_(u.masked_fill(small, 1.0))))
            else:  # 1 - t^2 = 4 e / (1 + e)^2 with e = exp(-2 |u| / softcap): no cancellation where tanh saturates
                e = u.abs().mul_(-2.0 / softcap).exp_()
                ds.mul_(e).mul_(4.0).div_(e.add_(1.0).square_())
        del u, s
        dq[:, :, :, i0:i1] = ds @ kb[:, :, None]
        dk[:, :, k0:k1] += torch.einsum("bhgnm,bhgnd->bhmd", ds, qc)
    f = scale * qk_factor
    return ((dq * f).reshape(B, H, N, D).to(q.dtype), (dk * f).to(k.dtype), (dv * dv_factor).to(v.dtype))


def fused(q, k, window=None, softcap=None, chunk=None, segment_ids=None, key_limit=None, rel_bias=None):
    """Whether torch's fused attention (sdpa.py) computes this call; else the chunked path (windows, softcaps,
    segment ids, key limits, head dims its CUDA kernels do not take, or a `chunk` asked for)."""
    return chunk is None and sdpa.unsupported(q, k, window, softcap, segment_ids, key_limit, rel_bias=rel_bias) is None


def attention_fwd_torch(q, k, v, key_padding_mask=None, *, causal=False, scale=1.0, window=None, softcap=None,
                        chunk=None, segment_ids=None, key_limit=None, rel_bias=None):
    """The torch forward: O (B,H,N,D) in q's dtype and LSE (B,H,N) fp32 (+inf for rows seeing no key), on torch's
    fused attention where it applies (`fused`: CPU, or CUDA's flash / memory-efficient kernels), else in query
    chunks (also when `chunk` is given). segment_ids (B, M) and key_limit (B, N, causal only): as af.attention;
    they take the chunked path."""
    if fused(q, k, window, softcap, chunk, segment_ids, key_limit, rel_bias):
        return sdpa.attention_fwd(q, k, v, key_padding_mask, causal=causal, scale=scale, window=window)
    return _attention_fwd_chunked(q, k, v, key_padding_mask, causal=causal, scale=scale, window=window,
                                  softcap=softcap, chunk=chunk, segment_ids=segment_ids, key_limit=key_limit,
                                  rel_bias=rel_bias)


def attention_bwd_torch(do, q, k, v, o, lse, key_padding_mask=None, *, causal=False, scale=1.0, window=None,
                        softcap=None, rule="grad", chunk=None, segment_ids=None, key_limit=None, rel_bias=None,
                        delta=None):
    """The torch backward under `rule`: dq, dk, dv, on the path the forward took. delta: as
    _attention_bwd_chunked's (torch's fused kernels take theirs from o, which gives the same)."""
    if fused(q, k, window, softcap, chunk, segment_ids, key_limit, rel_bias):
        return sdpa.attention_bwd(do, q, k, v, o, lse, key_padding_mask, causal=causal, scale=scale, rule=rule,
                                  window=window)
    return _attention_bwd_chunked(do, q, k, v, o, lse, key_padding_mask, causal=causal, scale=scale, window=window,
                                  softcap=softcap, rule=rule, chunk=chunk, segment_ids=segment_ids,
                                  key_limit=key_limit, rel_bias=rel_bias, delta=delta)


# --- norms, GLU products, activations: the formulas of kernels/norm.py and kernels/glu.py ---

ACTIVATIONS = tuple(ACT_IDS)


def norm_fwd_torch(x, weight, bias, eps, *, offset=0.0, out_dtype=None, center=False):
    """CPU path of kernels/norm.py norm_fwd: y, mean (None for RMSNorm) and rstd, statistics in fp32 (fp64 for
    fp64 inputs)."""
    ct = compute_dtype(x.dtype)
    xf = x.to(ct)
    mean = xf.mean(-1, keepdim=True) if center else None
    if center:
        xf = xf - mean
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = xf * rstd
    if weight is not None:
        y = y * (offset + weight.to(ct))
    if bias is not None:
        y = y + bias.to(ct)
    return (y.to(out_dtype or x.dtype), None if mean is None else mean[..., 0].to(ct), rstd[..., 0].to(ct))


def norm_bwd_torch(dy, x, weight, mean, rstd, *, offset=0.0, lrp=False, need_dw=False, need_db=False):
    """CPU path of kernels/norm.py norm_bwd: dx, and dweight / dbias sums in the compute dtype or None."""
    ct = compute_dtype(x.dtype)
    dyf = dy.to(ct)
    r = rstd.to(ct)[..., None]
    xhat = (x.to(ct) if mean is None else x.to(ct) - mean.to(ct)[..., None]) * r
    g = dyf if weight is None else dyf * (offset + weight.to(ct))
    dx = g
    if mean is not None:
        dx = dx - g.mean(-1, keepdim=True)
    if not lrp:
        dx = dx - xhat * (g * xhat).mean(-1, keepdim=True)
    D = x.shape[-1]
    dw = (dyf * xhat).reshape(-1, D).sum(0) if need_dw else None
    db = dyf.reshape(-1, D).sum(0) if need_db else None
    return (dx * r).to(x.dtype), dw, db


def act_ratio_torch(x, act):
    """act(x) / x in closed form, with its limit at 0 (the identity rule's factor, kernels/glu.py act_and_factor):
    sigmoid(x) (silu), Phi(x) (gelu), sigmoid(2u) (gelu_tanh), tanh(x) / x, and relu's 0 / 1."""
    if act == "silu":
        return torch.sigmoid(x)
    if act == "gelu":
        return 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
    if act == "gelu_tanh":
        return torch.sigmoid(2.0 * math.sqrt(2.0 / math.pi) * x * (1.0 + 0.044715 * x * x))
    if act == "tanh":
        small = x.abs() < 1e-6
        return torch.where(small, 1.0, torch.tanh(x) / torch.where(small, 1.0, x))
    if act == "relu":
        return (x > 0).to(x.dtype)
    raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")


def act_and_factor_torch(x, act, lrp):
    """act(x) and act'(x) (or, lrp, act(x) / x), as kernels/glu.py act_and_factor."""
    if act == "tanh" and not lrp:
        t = torch.tanh(x)
        return t, 1.0 - t * t
    r = act_ratio_torch(x, act)   # act(x) = x * r for every act here
    if lrp or act == "relu":      # relu: the ratio is its gradient
        return x * r, r
    if act == "silu":
        return x * r, r * (1.0 + x * (1.0 - r))
    if act == "gelu":
        return x * r, r + x * torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    k = math.sqrt(2.0 / math.pi)  # gelu_tanh
    return x * r, r + x * 2.0 * r * (1.0 - r) * k * (1.0 + 3.0 * 0.044715 * x * x)


# torch's own element-wise kernels for the forward (one pass each); the backward needs act(x) / x or act'(x)
_ACT_FORWARD = {
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "tanh": torch.tanh,
    "relu": torch.relu,
}


def glu_fwd_torch(gate, up, *, act="silu"):
    """CPU path of kernels/glu.py glu_fwd: act(gate) * up in gate's dtype."""
    ct = compute_dtype(gate.dtype)
    if act not in _ACT_FORWARD:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    return _ACT_FORWARD[act](gate.to(ct)).mul_(up.to(ct)).to(gate.dtype)


def glu_bwd_torch(dout, gate, up, *, act="silu", lrp=False):
    """CPU path of kernels/glu.py glu_bwd: (dgate, dup). Under the rules act(x) = x * f with f = act(x) / x, so
    with gf = dout / 2 * f: dgate = gf * up and dup = gf * gate (act itself is never formed)."""
    ct = compute_dtype(gate.dtype)
    x, u = gate.to(ct), up.to(ct)
    if lrp:
        gf = dout.to(ct) * 0.5
        gf.mul_(act_ratio_torch(x, act))
        return (gf * u).to(gate.dtype), gf.mul_(x).to(up.dtype)
    a, f = act_and_factor_torch(x, act, False)
    g = dout.to(ct)
    return (g * u * f).to(gate.dtype), (g * a).to(up.dtype)


def activation_fwd_torch(x, *, act="gelu"):
    """CPU path of kernels/glu.py activation_fwd."""
    if act not in _ACT_FORWARD:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    return _ACT_FORWARD[act](x.to(compute_dtype(x.dtype))).to(x.dtype)


def activation_bwd_torch(dy, x, *, act="gelu", lrp=False):
    """CPU path of kernels/glu.py activation_bwd: dy * act'(x), or (lrp) dy * act(x) / x."""
    ct = compute_dtype(x.dtype)
    xc = x.to(ct)
    factor = act_ratio_torch(xc, act) if lrp else act_and_factor_torch(xc, act, False)[1]
    return (dy.to(ct) * factor).to(x.dtype)
