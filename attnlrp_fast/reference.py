"""The float64 oracles: every op and rule in plain torch, written from the contracts (README, attnlrp_fast/rules.py)
and sharing no code with the fast paths (the Triton kernels, the CPU torch path in attnlrp_fast.bindings), masks
included, so that a bug there cannot hide in a shared helper. For tests and self-checks only.

Each `*_dense` function materialises everything (the N x M attention matrix included) and expresses each rule as
a gradient modification that autograd then follows: short and obviously right, not fast.
Rules: "grad" exact gradients; "attnlrp" uniform rule on Q K^T and P V (each factor's gradient halved), exact
softmax gradient (Taylor rule), identity rule on the softcap's tanh; "cp" attention weights held constant.
"""

import math

import torch

RULES = ("grad", "attnlrp", "cp")


def scale_grad(x, factor):
    """Identity in the forward; multiplies the gradient by `factor` in the backward."""
    return x * factor + (x * (1.0 - factor)).detach()


def attention_mask_dense(N, M, *, causal=False, window=None, key_padding_mask=None, device=None, segment_ids=None,
                         key_limit=None):
    """Bool (B or 1, 1, N, M): True where query i may see key j, from the contract: query i sits at position
    p = i + M - N (queries aligned to the end of the keys); with d = p - j, causal needs d >= 0, a window W needs
    d < W and, when not causal, also -d < W; key padding hides padded keys. segment_ids (B, M), one id per key
    position: query i sees key j only if segment_ids[b, p] == segment_ids[b, j] (a query with p < 0 has no
    segment and sees nothing). key_limit (B, N), with causal: j <= key_limit[b, i] replaces d >= 0."""
    d = (torch.arange(N, device=device)[:, None] + (M - N)) - torch.arange(M, device=device)[None, :]
    allowed = torch.full((N, M), True, device=device)
    if causal and key_limit is None:
        allowed = allowed & (d >= 0)
    if window is not None:
        allowed = allowed & (d < window)
        if not causal:
            allowed = allowed & (-d < window)
    allowed = allowed[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.to(device=allowed.device, dtype=torch.bool)[:, None, None, :]
    if causal and key_limit is not None:
        # (B, N, M): key j against each query's own limit
        lim = key_limit.to(device=allowed.device, dtype=torch.int64)
        cols = torch.arange(M, device=allowed.device)
        allowed = allowed & (cols[None, None, :] <= lim[:, :, None])[:, None]
    if segment_ids is not None:
        ids = segment_ids.to(device=allowed.device, dtype=torch.int64)
        same = torch.zeros(ids.shape[0], N, M, dtype=torch.bool, device=allowed.device)
        for i in range(N):
            p = i + M - N
            if p >= 0:
                same[:, i, :] = ids[:, p, None] == ids
        allowed = allowed & same[:, None]
    return allowed


def softcap_identity(u, softcap):
    """softcap * tanh(u / softcap) in the forward, with the identity rule's gradient capped / u."""
    capped = softcap * torch.tanh(u / softcap)
    ratio = torch.where(u == 0, torch.ones_like(u), capped / torch.where(u == 0, torch.ones_like(u), u))
    return u * ratio.detach()


def attention_dense(q, k, v, *, causal=False, scale=None, window=None, softcap=None, key_padding_mask=None,
                    rule="grad", return_lse=False, segment_ids=None, key_limit=None, sinks=None, rel_bias=None):
    """Materialised attention whose autograd gradients follow `rule`. Shapes as af.attention; v may have its own head
    dim. sinks (H,): a logit per head in every row's softmax, a column of the softmax whose value is 0.
    rel_bias (H, N + M - 1): the (1, H, N, M) bias rel_bias[h, j - i + N - 1] added after the softcap, a constant."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    B, H, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k = k.repeat_interleave(H // Hkv, dim=1)
    v = v.repeat_interleave(H // Hkv, dim=1)
    if rule == "attnlrp":
        q, k, v = scale_grad(q, 0.5), scale_grad(k, 0.5), scale_grad(v, 0.5)
    u = scale * (q @ k.transpose(-1, -2))
    if softcap is None:
        s = u
    elif rule == "attnlrp":
        s = softcap_identity(u, softcap)
    else:
        s = softcap * torch.tanh(u / softcap)
    if rel_bias is not None:
        offsets = torch.arange(M)[None, :] - torch.arange(N)[:, None] + (N - 1)
        s = s + rel_bias.detach().to(s.dtype)[:, offsets][None]
    keep = attention_mask_dense(N, M, causal=causal, window=window, key_padding_mask=key_padding_mask,
                                device=q.device, segment_ids=segment_ids, key_limit=key_limit)
    row_any = keep.any(-1, keepdim=True)
    s = s.masked_fill(~keep, float("-inf")).masked_fill(~row_any, 0.0)
    if sinks is None:
        p = torch.softmax(s, dim=-1).masked_fill(~row_any, 0.0)
    else:
        s = s.masked_fill(~row_any, float("-inf"))
        column = sinks.to(s.dtype)[None, :, None, None].expand(B, H, N, 1)
        p = torch.softmax(torch.cat([s, column], -1), dim=-1)[..., :M]
    if rule == "cp":
        p = p.detach()
    elif rule == "attnlrp":
        p = scale_grad(p, 0.5)
    o = p @ v
    if not return_lse:
        return o
    lse = torch.logsumexp(s, dim=-1).masked_fill(~row_any[..., 0], float("inf"))
    return o, lse


# --- norms, GLU products, activations ---
#
# The rules as gradient modifications autograd follows: the identity rule on a normaliser holds rstd constant
# (centering stays linear), the uniform rule on a product of two input-dependent factors halves each factor's
# gradient, the identity rule on an element-wise act replaces act'(x) by act(x) / x.

ACTIVATION_FNS = {
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "tanh": torch.tanh,
    "relu": torch.relu,
}
# act(x) / x as x -> 0 (relu: its value at x = 0 taken from the left, i.e. no relevance through 0).
ACTIVATION_RATIO_AT_ZERO = {"silu": 0.5, "gelu": 0.5, "gelu_tanh": 0.5, "tanh": 1.0, "relu": 0.0}


def activation_identity(x, act):
    """act(x) in the forward; the identity rule's gradient act(x) / x (its limit at x = 0) in the backward."""
    zero = x == 0
    ratio = ACTIVATION_FNS[act](x) / torch.where(zero, torch.ones_like(x), x)
    ratio = torch.where(zero, torch.full_like(x, ACTIVATION_RATIO_AT_ZERO[act]), ratio)
    return x * ratio.detach()


def rms_norm_dense(x, weight, eps, *, offset=0.0, lrp=False):
    """x * rstd * (offset + weight) over the last dim; lrp: rstd held constant (identity rule)."""
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    y = x * (rstd.detach() if lrp else rstd)
    return y if weight is None else y * (offset + weight)


def layer_norm_dense(x, weight, bias, eps, *, lrp=False):
    """(x - mean) * rstd * weight + bias (biased variance); lrp: rstd held constant, centering linear."""
    xc = x - x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    y = xc * (rstd.detach() if lrp else rstd)
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


def glu_dense(gate, up, *, act="silu", lrp=False):
    """act(gate) * up; lrp: uniform rule on the product (each factor's gradient halved), identity rule on act."""
    if not lrp:
        return ACTIVATION_FNS[act](gate) * up
    return scale_grad(activation_identity(gate, act), 0.5) * scale_grad(up, 0.5)


def activation_dense(x, *, act="gelu", lrp=False):
    """act(x); lrp: identity rule (gradient act(x) / x)."""
    return activation_identity(x, act) if lrp else ACTIVATION_FNS[act](x)
