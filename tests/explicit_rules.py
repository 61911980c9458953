"""AttnLRP's rules for one attention layer written out as relevance propagation (the paper's formulas),
in float64 with everything materialised. Independent of autograd and of the gradient x input identity:
the tests check that x * g(x) from the kernels equals what these formulas give.

Relevance flows O -> (P, V) -> S -> (Q, K):
  O = P V, uniform epsilon rule (eps -> 0): z_ijd = P_ij V_jd, R_O[i, d] shared in proportion z_ijd / O_id,
     each of the two factors taking half:   R_P[i, j] = 1/2 sum_d z_ijd R_O[i, d] / O_id,
                                            R_V[j, d] = 1/2 sum_i z_ijd R_O[i, d] / O_id.
  P = softmax(S), Taylor decomposition at the input (Prop. 3.1): R_S = S * (R_P - P * sum_j R_P).
  S = cap(scale * A): identity rule on the cap, epsilon rule on the scale: R_A = R_S.
  A = Q K^T, uniform epsilon rule: z_ijd = Q_id K_jd, R_Q[i, d] = 1/2 sum_j z_ijd R_A[i, j] / A_ij, and the
     same sum over i for R_K[j, d].
  CP-LRP: P is a constant, so all of R_O goes to V: R_V[j, d] = sum_i z_ijd R_O[i, d] / O_id.
Masked pairs carry no relevance.
"""

import math

import torch

from attnlrp_fast.reference import attention_mask_dense


def _safe_div(a, b):
    return torch.where(b == 0, torch.zeros_like(a), a / torch.where(b == 0, torch.ones_like(b), b))


def attention_relevance(q, k, v, relevance_out, *, rule="attnlrp", causal=False, scale=None, window=None,
                        softcap=None, key_padding_mask=None, bias=None):
    """(R_Q, R_K, R_V) for output relevance R_O, shapes of q, k, v (K/V relevance summed over GQA groups).
    bias: a (1 or B, H, N, M) constant added to the logits S (T5's position bias): the epsilon rule on that sum
    leaves R_A = (S - bias) / S * R_S, the bias absorbing the rest."""
    q, k, v, r_o = (x.double() for x in (q, k, v, relevance_out))
    B, H, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    G = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    a = q @ kr.transpose(-1, -2)
    s = scale * a if softcap is None else softcap * torch.tanh(scale * a / softcap)
    if bias is not None:
        s = s + bias.double()
    keep = attention_mask_dense(N, M, causal=causal, window=window, key_padding_mask=key_padding_mask)
    row_any = keep.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~keep, float("-inf")).masked_fill(~row_any, 0.0), -1).masked_fill(~row_any, 0.0)
    o = p @ vr
    share = _safe_div(r_o, o)  # R_O[i, d] / O_id
    rv_full = torch.einsum("bhij,bhjd,bhid->bhjd", p, vr, share)
    fold = lambda x: x.reshape(B, Hkv, G, M, D).sum(2)  # noqa: E731
    if rule == "cp":
        return torch.zeros_like(q), torch.zeros_like(k), fold(rv_full)
    assert rule == "attnlrp"
    r_p = 0.5 * torch.einsum("bhij,bhjd,bhid->bhij", p, vr, share)
    r_s = torch.where(keep, s * (r_p - p * r_p.sum(-1, keepdim=True)), 0.0)
    if bias is not None:
        r_s = _safe_div(s - bias.double(), s) * r_s
    ratio = _safe_div(r_s, a)  # R_A[i, j] / A_ij
    r_q = 0.5 * torch.einsum("bhid,bhjd,bhij->bhid", q, kr, ratio)
    r_k = 0.5 * torch.einsum("bhid,bhjd,bhij->bhjd", q, kr, ratio)
    return r_q, fold(r_k), 0.5 * fold(rv_full)
