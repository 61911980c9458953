"""Flash-attention forward: O = softmax(mask(cap(scale * Q K^T))) V and the row log-sum-exp.

One program computes BLOCK_M query rows of one (batch, head) and streams over the key blocks those
rows can see, keeping a running max and sum (online softmax, base 2). K/V of a GQA group are read
by its H / Hkv query heads in place, never repeated in memory.

Cost for q (B, H, N, D), k/v (B, Hkv, M, D):
  FLOPs  4 * B * H * N * M * D (about half with causal, ~ 4 * B * H * N * W * D with a window W)
  memory reads Q once and K, V once per query block; writes O (B, H, N, D) and an fp32 LSE (B, H, N):
         no N x M buffer, extra memory O(N).
Rows that see no key get O = 0 and LSE = +inf (so the backward's exp(S - LSE) is 0 for them).
"""

import torch
import triton
import triton.language as tl

from .attention_common import (
    LN2,
    base2_logits,
    autotuned,
    batch_slices,
    dot_precision,
    fit_int32_tiles,
    head_base,
    head_dim_block,
    key_mask,
    key_range,
    launch,
    length_bucket,
    load_rows,
    masked_keys_from,
    on_device,
    store_rows,
    visible,
)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_base, offs_m, lo, hi, masked_from,
               stride_kn, stride_kd, stride_vn, stride_vd,
               M, shift, window, scale, softcap,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               HAS_KPM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online-softmax accumulation (base 2) over the key blocks [lo, hi). Blocks before `masked_from` are known
    to be whole and visible to every row, so they skip the mask (key padding still applies): a uniform branch in
    one loop rather than two loops, which costs registers (spills at D = 64 in Triton 3.6)."""
    qpos = offs_m[:, None] + shift
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt = load_rows(k_base, start_n, M, stride_kn, stride_kd, BLOCK_N, HEAD_DIM, BLOCK_D, True)
        s, _u, _t = base2_logits(tl.dot(q, kt, input_precision=DOT_PRECISION), scale, softcap, HAS_SOFTCAP)
        if start_n >= masked_from:
            keep = visible(qpos, offs_n[None, :], window, key_mask(kpm_base, offs_n, M, HAS_KPM)[None, :],
                           IS_CAUSAL, HAS_WINDOW)
            s = tl.where(keep, s, float("-inf"))
        elif HAS_KPM:
            s = tl.where(key_mask(kpm_base, offs_n, M, HAS_KPM)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet keeps m = -inf; shift by 0 there so no inf - inf appears.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_rows(v_base, start_n, M, stride_vn, stride_vd, BLOCK_N, HEAD_DIM, BLOCK_D, False)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def fwd_block_start(BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """First query row of this program. Causal: the last blocks first, as they see the most keys (the longest
    programs start early instead of trailing at the end of the grid)."""
    pid_m = tl.program_id(0)
    if IS_CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    return pid_m * BLOCK_M


@triton.jit
def fwd_finish(acc, l_i, m_i, o_base, lse_row, q_first, N, stride_on, stride_od,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """O = acc / l and the natural-log LSE (+inf, with O = 0, for rows that saw no key)."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * LN2)
    store_rows(o_base, acc / l_safe[:, None], q_first, N, stride_on, stride_od, BLOCK_M, HEAD_DIM, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_M)
    tl.store(lse_row + q_first + offs_m, lse, mask=offs_m < N - q_first)


@triton.jit
def attention_fwd_kernel(
    Q, K, V, O, LSE, KPM,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_kpm_b,
    H, GROUP, N, M, shift, window, scale, softcap, N_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    q_first = fwd_block_start(BLOCK_M, IS_CAUSAL)
    h = tl.program_id(1)
    b = tl.program_id(2)
    hk = h // GROUP

    offs_m = q_first + tl.arange(0, BLOCK_M)
    q = load_rows(head_base(Q, b, h, stride_qb, stride_qh), q_first, N, stride_qn, stride_qd, BLOCK_M, HEAD_DIM,
                  BLOCK_D, False)
    q_last = tl.minimum(q_first + BLOCK_M, N) - 1
    lo, hi = key_range(q_first, q_last, shift, window, M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    masked_from = masked_keys_from(q_first, shift, M, lo, hi, BLOCK_N, IS_CAUSAL, HAS_WINDOW)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, head_base(K, b, hk, stride_kb, stride_kh), head_base(V, b, hk, stride_vb, stride_vh),
        KPM + b.to(tl.int64) * stride_kpm_b, offs_m, lo, hi, masked_from, stride_kn, stride_kd, stride_vn, stride_vd,
        M, shift, window, scale, softcap,
        HEAD_DIM, BLOCK_D, BLOCK_N, IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_KPM, DOT_PRECISION,
    )
    fwd_finish(acc, l_i, m_i, head_base(O, b, h, stride_ob, stride_oh), LSE + (b.to(tl.int64) * H + h) * N,
               q_first, N, stride_on, stride_od, HEAD_DIM, BLOCK_D, BLOCK_M)


TUNE_KEY = ["HEAD_DIM", "IS_CAUSAL", "HAS_WINDOW", "HAS_SOFTCAP", "HAS_KPM", "GROUP", "N_BUCKET"]
_tuned_fwd = autotuned(attention_fwd_kernel, "fwd", key=TUNE_KEY)


def attention_fwd(q, k, v, key_padding_mask=None, *, causal=False, scale=1.0, window=None, softcap=None,
                  config=None):
    """Launch the forward. q (B,H,N,D), k/v (B,Hkv,M,D) of one dtype and device, any strides;
    key_padding_mask: uint8/bool (B, M), nonzero = real key. Returns O (B,H,N,D) and LSE (B,H,N) fp32.

    config: optional {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"} overriding the tuned choice (or such a
    dict under the key "fwd").
    """
    B, H, N, D = q.shape
    o = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    if B * H * N == 0:
        return o, lse
    q, k, v = (fit_int32_tiles(x) for x in (q, k, v))
    kpm = key_padding_mask.to(torch.uint8) if key_padding_mask is not None else None
    with on_device(q):
        for part in batch_slices(B):
            _launch_fwd(q[part], k[part], v[part], o[part], lse[part], None if kpm is None else kpm[part],
                        causal, scale, window, softcap, config)
    return o, lse


def _launch_fwd(q, k, v, o, lse, kpm, causal, scale, window, softcap, config):
    B, H, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    args = (
        q, k, v, o, lse, kpm if kpm is not None else q,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        kpm.stride(0) if kpm is not None else 0,
        H, H // Hkv, N, M, M - N, int(window or 0), float(scale), float(softcap or 1.0), length_bucket(max(N, M)),
    )
    flags = dict(
        HEAD_DIM=D, BLOCK_D=head_dim_block(D), IS_CAUSAL=bool(causal), HAS_WINDOW=window is not None,
        HAS_SOFTCAP=softcap is not None, HAS_KPM=kpm is not None, DOT_PRECISION=dot_precision(q.dtype),
    )
    launch(attention_fwd_kernel, _tuned_fwd, "fwd", N, "BLOCK_M", H, B, args, flags, config, q.element_size())
