"""The CPU path of every op: plain torch with the kernels' explicit forward and backward formulas.

What the Triton kernels compute, for CPU tensors when Triton's interpreter is off (and float64 anywhere):
attention processes queries in chunks so that memory stays linear in N (never an N x M tensor), and applies the
rules through the factors of kernels/rules.py; the norm, GLU and activation functions mirror kernels/norm.py
and kernels/glu.py. Computation in float32 (float64 for float64 inputs). The float64 oracles the tests compare
this path with live apart, in attnlrp_fast/reference.py, and share no code with it.
"""

import math

import torch

from ..kernels.glu import ACT_IDS
from ..kernels.rules import ATTENTION_FACTORS, SOFTCAP_IDENTITY

# Elements per chunk of the (heads x rows x keys) score block.
CHUNK_ELEMENTS = 1 << 23


def visible_keys(rows, n, m, *, causal=False, window=None, key_padding_mask=None, device=None):
    """Bool mask (B or 1, 1, P, M): may query row i (position i + m - n) see key j? rows: P row indices shared
    by the batch, or (B, P), rows per batch element."""
    qpos = (torch.as_tensor(rows, device=device) + (m - n))[..., None]
    kpos = torch.arange(m, device=device)
    keep = torch.ones(qpos.shape[:-1] + (m,), dtype=torch.bool, device=device)
    if causal:
        keep &= kpos <= qpos
    if window is not None:
        keep &= qpos - kpos < window
        if not causal:
            keep &= kpos - qpos < window
    keep = keep[None, None] if keep.dim() == 2 else keep[:, None]
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, None, :].to(device=keep.device, dtype=torch.bool)
    return keep


def compute_dtype(dtype):
    """What the torch path computes in, and the dtype of the per-row statistics every path saves (the kernels'
    fp32 LSE, rstd, mean): float32, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(B, H, N, M, chunk):
    if chunk is None:
        chunk = max(16, CHUNK_ELEMENTS // max(1, B * H * M))
    return [(i, min(i + chunk, N)) for i in range(0, N, chunk)]


def _scores(qc, k, rows, N, M, scale, softcap, causal, window, key_padding_mask):
    """Raw logits u, transformed logits s and visibility for the query rows `rows`.
    qc (B, Hkv, G, C, D), k (B, Hkv, M, D) -> (B, Hkv, G, C, M) blocks."""
    u = scale * (qc @ k[:, :, None].transpose(-1, -2))
    s = u if softcap is None else softcap * torch.tanh(u / softcap)
    keep = visible_keys(rows, N, M, causal=causal, window=window, key_padding_mask=key_padding_mask, device=qc.device)
    return u, s, keep[:, :, None]


def attention_fwd_torch(q, k, v, key_padding_mask=None, *, causal=False, scale=1.0, window=None, softcap=None,
                        chunk=None):
    """Chunked forward: O (B,H,N,D) in q's dtype and LSE (B,H,N) fp32 (+inf for rows seeing no key)."""
    B, H, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    G = H // Hkv
    ct = compute_dtype(q.dtype)
    qg = q.to(ct).reshape(B, Hkv, G, N, D)
    kc, vc = k.to(ct), v.to(ct)
    o = torch.empty((B, Hkv, G, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hkv, G, N), dtype=torch.float32, device=q.device)
    for i0, i1 in _chunk_rows(B, H, N, M, chunk):
        _, s, keep = _scores(qg[:, :, :, i0:i1], kc, range(i0, i1), N, M, scale, softcap, causal, window,
                                key_padding_mask)
        s = s.masked_fill(~keep, float("-inf"))
        lse_c = torch.logsumexp(s, dim=-1)
        lse_c = lse_c.masked_fill(lse_c == float("-inf"), float("inf"))
        p = torch.exp(s - lse_c[..., None])
        o[:, :, :, i0:i1] = (p @ vc[:, :, None]).to(q.dtype)
        lse[:, :, :, i0:i1] = lse_c.float()
    return o.reshape(B, H, N, D), lse.reshape(B, H, N)


def attention_bwd_torch(do, q, k, v, o, lse, key_padding_mask=None, *, causal=False, scale=1.0, window=None,
                        softcap=None, rule="grad", chunk=None):
    """Chunked backward under `rule`; the formulas of kernels/attention_bwd.py (o is not needed: delta comes
    from each chunk's P and dP)."""
    B, H, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    G = H // Hkv
    ct = compute_dtype(q.dtype)
    qk_factor, dv_factor = ATTENTION_FACTORS[rule]
    qg = q.to(ct).reshape(B, Hkv, G, N, D)
    dog = do.to(ct).reshape(B, Hkv, G, N, D)
    lseg = lse.to(ct).reshape(B, Hkv, G, N)
    kc, vc = k.to(ct), v.to(ct)
    dq = torch.zeros((B, Hkv, G, N, D), dtype=ct, device=q.device)
    dk = torch.zeros((B, Hkv, M, D), dtype=ct, device=q.device)
    dv = torch.zeros((B, Hkv, M, D), dtype=ct, device=q.device)
    for i0, i1 in _chunk_rows(B, H, N, M, chunk):
        qc, doc = qg[:, :, :, i0:i1], dog[:, :, :, i0:i1]
        u, s, keep = _scores(qc, kc, range(i0, i1), N, M, scale, softcap, causal, window, key_padding_mask)
        p = torch.where(keep, torch.exp(s - lseg[:, :, :, i0:i1, None]), 0.0)
        dv += torch.einsum("bhgnm,bhgnd->bhmd", p, doc)
        if rule == "cp":
            continue
        dp = doc @ vc[:, :, None].transpose(-1, -2)
        # delta = rowsum(P * dP) from the same P and dP (the chunk holds whole rows): consistent rounding, where
        # rowsum(dO * O) would mix in the forward's rounding and lose digits when dP - delta cancels.
        ds = p * (dp - (p * dp).sum(-1, keepdim=True))
        if softcap is not None:
            if rule in SOFTCAP_IDENTITY:
                small = u.abs() < 1e-6
                ds = ds * torch.where(small, 1.0, s / torch.where(small, 1.0, u))
            else:  # 1 - t^2 without cancellation where tanh saturates
                e = torch.exp(-2.0 * (u / softcap).abs())
                ds = ds * (4.0 * e / (1.0 + e) ** 2)
        dq[:, :, :, i0:i1] = ds @ kc[:, :, None]
        dk += torch.einsum("bhgnm,bhgnd->bhmd", ds, qc)
    f = scale * qk_factor
    return ((dq * f).reshape(B, H, N, D).to(q.dtype), (dk * f).to(k.dtype), (dv * dv_factor).to(v.dtype))


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


def act_and_factor_torch(x, act, lrp):
    """act(x) and act'(x) (or, lrp, act(x) / x in closed form), as kernels/glu.py act_and_factor."""
    if act == "silu":
        s = torch.sigmoid(x)
        return x * s, s if lrp else s * (1.0 + x * (1.0 - s))
    if act == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
        return x * cdf, cdf if lrp else cdf + x * torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    if act == "gelu_tanh":
        k = math.sqrt(2.0 / math.pi)
        h = torch.sigmoid(2.0 * k * x * (1.0 + 0.044715 * x * x))
        return x * h, h if lrp else h + x * 2.0 * h * (1.0 - h) * k * (1.0 + 3.0 * 0.044715 * x * x)
    if act == "tanh":
        t = torch.tanh(x)
        if not lrp:
            return t, 1.0 - t * t
        small = x.abs() < 1e-6
        return t, torch.where(small, 1.0, t / torch.where(small, 1.0, x))
    if act == "relu":
        return torch.relu(x), (x > 0).to(x.dtype)
    raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")


def glu_fwd_torch(gate, up, *, act="silu"):
    """CPU path of kernels/glu.py glu_fwd: act(gate) * up in gate's dtype."""
    ct = compute_dtype(gate.dtype)
    return (act_and_factor_torch(gate.to(ct), act, False)[0] * up.to(ct)).to(gate.dtype)


def glu_bwd_torch(dout, gate, up, *, act="silu", lrp=False):
    """CPU path of kernels/glu.py glu_bwd: (dgate, dup)."""
    ct = compute_dtype(gate.dtype)
    a, f = act_and_factor_torch(gate.to(ct), act, lrp)
    g = dout.to(ct) * (0.5 if lrp else 1.0)
    return (g * up.to(ct) * f).to(gate.dtype), (g * a).to(up.dtype)


def activation_fwd_torch(x, *, act="gelu"):
    """CPU path of kernels/glu.py activation_fwd."""
    return act_and_factor_torch(x.to(compute_dtype(x.dtype)), act, False)[0].to(x.dtype)


def activation_bwd_torch(dy, x, *, act="gelu", lrp=False):
    """CPU path of kernels/glu.py activation_bwd: dy * act'(x), or (lrp) dy * act(x) / x."""
    ct = compute_dtype(x.dtype)
    return (dy.to(ct) * act_and_factor_torch(x.to(ct), act, lrp)[1]).to(x.dtype)
