"""Attention backward, one kernel family with the rule a constexpr.

With S = cap(scale * Q K^T) (masked), P = softmax(S) recomputed from the saved LSE, O = P V:
  exact ("grad"):  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta) with delta = rowsum(dO * O),
                   dU = dS * cap'(U),  dQ = scale * dU K,  dK = scale * dU^T Q.
  "attnlrp":       uniform rule on P V (dV and dP halved), exact softmax gradient (Taylor rule),
                   identity rule on the softcap's tanh (cap'(U) -> cap(U) / U), uniform rule on
                   Q K^T (dQ and dK halved): dV = 1/2 exact, dQ = dK = 1/4 (exact with cap -> cap/U).
  "cp":            attention weights are constants: dV exact, dQ = dK = 0 (no score gradient computed).

Three launches by default, no atomics (deterministic):
  1. delta = rowsum(dO * O) per query row                        reads O, dO once.
  2. dK, dV: one program per key block of a K/V head, looping over the queries of every head of its GQA
     group; FLOPs 8 * B * H * N * M * D (4 for "cp": no dP, no dK).
  3. dQ: one program per query block, looping over the visible keys; FLOPs 6 * B * H * N * M * D
     (skipped for "cp").
Memory: dQ, dK, dV plus an fp32 delta (B, H, N); no N x M buffer.

dq_mode="atomic" (or ATTNLRP_FAST_DQ=atomic) drops launch 3: launch 2 also computes dS^T K for each block
and adds it into an fp32 (B, H, N, D) buffer with relaxed atomics, 10 instead of 14 units of N*M*D FLOPs,
as FlashAttention-2's backward does; the float summation order then varies between runs. Which is faster
on a GPU is for bench/gpu_check.py to say (both are timed).

Segments and key limits (HAS_SEGMENTS, HAS_KEY_LIMIT; both dQ modes): the dQ kernel bounds its key loop as
the forward does (in-kernel, from its rows' key limits). The dK/dV kernel starts its query loop at the first
query block that can see its keys, from a host-side table key_limit_table (B, 2, M) int32 (O(N + M) work and
memory: a running max of the limits searched per key), and reads there where the unmasked query blocks begin.
Segments do not bound either loop: blocks are masked element-wise (correct for any id layout; packed sequences
cost as much as one sequence of their total length under the other masks).

A relative bias (HAS_REL_BIAS: T5's bucketed table, ALiBi) is added to S as in the forward, from the same
(H, N + M - 1) vector (a gather of one value per score in both kernels; no memory beyond the vector). It is a
constant: it changes P, not the formulas above, and gets no gradient.
"""

import os

import torch
import triton
import triton.language as tl

from .attention_common import (
    CP_RULE,
    LOG2E,
    autotuned,
    base2_logits,
    batch_slices,
    dot_precision,
    fit_int32_tiles,
    head_base,
    head_dim_block,
    key_limit_table,
    key_mask,
    key_range,
    launch,
    launchable,
    length_bucket,
    limited_key_range,
    limited_query_range,
    load_rows,
    masked_keys_from,
    masked_queries_until,
    on_device,
    query_range,
    rel_bias_tile,
    row_ids,
    softcap_grad_factor,
    store_rows,
    visible,
)
from .attention_fwd import index_inputs
from .rules import ATTENTION_FACTORS, RULE_IDS


@triton.jit
def attention_bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_on, stride_od,
                               stride_dob, stride_doh, stride_don, stride_dod, H, N,
                               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    start = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2)
    o = load_rows(head_base(O, b, h, stride_ob, stride_oh), start, N, stride_on, stride_od, BLOCK_M, HEAD_DIM,
                  BLOCK_D, False)
    do = load_rows(head_base(DO, b, h, stride_dob, stride_doh), start, N, stride_don, stride_dod, BLOCK_M, HEAD_DIM,
                   BLOCK_D, False)
    offs_m = tl.arange(0, BLOCK_M)
    tl.store(DELTA + (b.to(tl.int64) * H + h) * N + start + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1),
             mask=offs_m < N - start)


@triton.jit
def _dkdv_inner(dk, dv, k, v, key_ok, k_seg, seg_base, kl_base, q_base, do_base, lse_base, delta_base, dq_base,
                offs_n, lo, hi, masked_until,
                stride_qn, stride_qd, stride_don, stride_dod, N, shift, window, scale, softcap,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
                HAS_SEGMENTS: tl.constexpr, HAS_KEY_LIMIT: tl.constexpr,
                RULE: tl.constexpr, DOT_PRECISION: tl.constexpr, DQ_ATOMIC: tl.constexpr, rb_base,
                HAS_REL_BIAS: tl.constexpr):
    """Accumulate dK, dV of one key block over the query blocks [lo, hi) of one query head. Blocks before
    `masked_until` are masked; the others see every key of the block, so they skip the mask (key padding still
    applies). DQ_ATOMIC: also add this key block's share of dQ (unscaled) into the fp32 rows at dq_base.
    k_seg (BLOCK_N, 1): the keys' segment ids; the queries' ids (seg_base) and key limits (kl_base) are read per
    query block (with HAS_SEGMENTS / HAS_KEY_LIMIT)."""
    for start_m in tl.range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N
        qt = load_rows(q_base, start_m, N, stride_qn, stride_qd, BLOCK_M, HEAD_DIM, BLOCK_D, True)
        do = load_rows(do_base, start_m, N, stride_don, stride_dod, BLOCK_M, HEAD_DIM, BLOCK_D, False)
        lse2 = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf")) * LOG2E
        # Transposed scores (keys x queries), so dK and dV accumulate without transposes.
        st, ut, tt = base2_logits(tl.dot(k, qt, input_precision=DOT_PRECISION), scale, softcap, HAS_SOFTCAP)
        if HAS_REL_BIAS:
            st += rel_bias_tile(rb_base, offs_n, offs_m, N, N + shift, True)
        pt = tl.exp2(st - lse2[None, :])
        if start_m < masked_until:
            keep = visible(offs_m[None, :] + shift, offs_n[:, None], window, key_ok[:, None],
                           row_ids(seg_base + shift, offs_m, N, HAS_SEGMENTS)[None, :], k_seg,
                           row_ids(kl_base, offs_m, N, HAS_KEY_LIMIT)[None, :], IS_CAUSAL, HAS_WINDOW,
                           HAS_SEGMENTS, HAS_KEY_LIMIT)
            pt = tl.where(keep, pt, 0.0)
        elif HAS_KPM:
            pt = tl.where(key_ok[:, None], pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
        if RULE != CP_RULE:
            delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            dst = pt * (dpt - delta[None, :])
            if HAS_SOFTCAP:
                dst = dst * softcap_grad_factor(ut, tt, softcap, RULE)
            dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=DOT_PRECISION)
            if DQ_ATOMIC:
                dq_part = tl.dot(tl.trans(dst.to(k.dtype)), k, input_precision=DOT_PRECISION)
                offs_r = tl.arange(0, BLOCK_M)
                offs_d = tl.arange(0, BLOCK_D)
                tl.atomic_add(dq_base + tl.cast(start_m, tl.int64) * HEAD_DIM + offs_r[:, None] * HEAD_DIM + offs_d[None, :],
                              dq_part, mask=m_ok[:, None] & (offs_d < HEAD_DIM)[None, :], sem="relaxed")
    return dk, dv


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, KPM, SEG, KL, KLQ, RB, DK, DV, DQ_ACC,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_kpm_b, stride_seg_b, stride_kl_b, stride_klq_b, stride_rb_h,
    H, GROUP, N, M, shift, window, scale, softcap, dk_factor, dv_factor, N_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_SEGMENTS: tl.constexpr, HAS_KEY_LIMIT: tl.constexpr,
    RULE: tl.constexpr, DOT_PRECISION: tl.constexpr, DQ_ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_REL_BIAS: tl.constexpr = False,
):
    k_first = tl.program_id(0) * BLOCK_N
    hk = tl.program_id(1)
    b = tl.program_id(2)

    offs_n = k_first + tl.arange(0, BLOCK_N)
    k = load_rows(head_base(K, b, hk, stride_kb, stride_kh), k_first, M, stride_kn, stride_kd, BLOCK_N, HEAD_DIM,
                  BLOCK_D, False)
    v = load_rows(head_base(V, b, hk, stride_vb, stride_vh), k_first, M, stride_vn, stride_vd, BLOCK_N, HEAD_DIM,
                  BLOCK_D, False)
    key_ok = key_mask(KPM + b.to(tl.int64) * stride_kpm_b, offs_n, M, HAS_KPM)

    k_last = tl.minimum(k_first + BLOCK_N, M) - 1
    lo, hi = query_range(k_first, k_last, shift, window, N, BLOCK_M, IS_CAUSAL, HAS_WINDOW)
    # Query blocks from `masked_until` on see the whole key block: no mask there. Keys past M need none for dK,
    # dV (their rows are never stored), but they do for atomic dQ: zero-filled keys there give logits of 0, and
    # exp(0 - LSE) can overflow to inf when every real logit is very negative; inf * 0 in dS^T K would be NaN.
    masked_until = masked_queries_until(k_last, shift, lo, hi, BLOCK_M, IS_CAUSAL, HAS_WINDOW)
    if HAS_KEY_LIMIT:   # the limits replace the causal bound: the launcher's table gives both bounds
        lo, masked_until = limited_query_range(KLQ + b.to(tl.int64) * stride_klq_b, k_first, k_last, M, hi,
                                               BLOCK_M, HAS_WINDOW)
    seg_base = SEG + b.to(tl.int64) * stride_seg_b
    k_seg = row_ids(seg_base, offs_n, M, HAS_SEGMENTS)[:, None]
    if HAS_SEGMENTS:    # any id layout: every visited block takes the mask
        masked_until = hi
    if DQ_ATOMIC:
        if k_first + BLOCK_N > M:
            masked_until = hi

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        row_base = (b.to(tl.int64) * H + h) * N
        dk, dv = _dkdv_inner(dk, dv, k, v, key_ok, k_seg, seg_base, KL + b.to(tl.int64) * stride_kl_b,
                             head_base(Q, b, h, stride_qb, stride_qh),
                             head_base(DO, b, h, stride_dob, stride_doh), LSE + row_base, DELTA + row_base,
                             DQ_ACC + row_base * HEAD_DIM, offs_n, lo, hi, masked_until, stride_qn, stride_qd,
                             stride_don, stride_dod, N, shift, window, scale, softcap, HEAD_DIM, BLOCK_D, BLOCK_M,
                             IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_KPM, HAS_SEGMENTS, HAS_KEY_LIMIT, RULE,
                             DOT_PRECISION, DQ_ATOMIC, RB + h.to(tl.int64) * stride_rb_h, HAS_REL_BIAS)

    store_rows(head_base(DK, b, hk, stride_dkb, stride_dkh), dk * dk_factor, k_first, M, stride_dkn, stride_dkd,
               BLOCK_N, HEAD_DIM, BLOCK_D)
    store_rows(head_base(DV, b, hk, stride_dvb, stride_dvh), dv * dv_factor, k_first, M, stride_dvn, stride_dvd,
               BLOCK_N, HEAD_DIM, BLOCK_D)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_base, v_base, kpm_base, seg_base, q_seg, q_limit, offs_m, lo, hi,
              masked_from, stride_kn, stride_kd, stride_vn, stride_vd, M, shift, window, scale, softcap,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
              IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
              HAS_SEGMENTS: tl.constexpr, HAS_KEY_LIMIT: tl.constexpr, RULE: tl.constexpr,
              DOT_PRECISION: tl.constexpr, rb_base, HAS_REL_BIAS: tl.constexpr):
    """Accumulate dQ of one query block over the key blocks [lo, hi). Blocks before `masked_from` are known to
    be whole and visible to every row, so they skip the mask (key padding still applies). q_seg, q_limit: the
    rows' segment ids and key limits, (BLOCK_M, 1) (unused without HAS_SEGMENTS / HAS_KEY_LIMIT)."""
    qpos = offs_m[:, None] + shift
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt = load_rows(k_base, start_n, M, stride_kn, stride_kd, BLOCK_N, HEAD_DIM, BLOCK_D, True)
        vt = load_rows(v_base, start_n, M, stride_vn, stride_vd, BLOCK_N, HEAD_DIM, BLOCK_D, True)
        s, u, t = base2_logits(tl.dot(q, kt, input_precision=DOT_PRECISION), scale, softcap, HAS_SOFTCAP)
        if HAS_REL_BIAS:
            s += rel_bias_tile(rb_base, offs_m, offs_n, M - shift, M, False)
        p = tl.exp2(s - lse2[:, None])
        if start_n >= masked_from:
            keep = visible(qpos, offs_n[None, :], window, key_mask(kpm_base, offs_n, M, HAS_KPM)[None, :], q_seg,
                           row_ids(seg_base, offs_n, M, HAS_SEGMENTS)[None, :], q_limit, IS_CAUSAL,
                           HAS_WINDOW, HAS_SEGMENTS, HAS_KEY_LIMIT)
            p = tl.where(keep, p, 0.0)
        elif HAS_KPM:
            p = tl.where(key_mask(kpm_base, offs_n, M, HAS_KPM)[None, :], p, 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * softcap_grad_factor(u, t, softcap, RULE)
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)
    return dq


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, KPM, SEG, KL, RB, DQ,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_kpm_b, stride_seg_b, stride_kl_b, stride_rb_h,
    H, GROUP, N, M, shift, window, scale, softcap, dq_factor, N_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_SEGMENTS: tl.constexpr, HAS_KEY_LIMIT: tl.constexpr, RULE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_REL_BIAS: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    if IS_CAUSAL:   # the last query blocks see the most keys: start them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    q_first = pid_m * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2)
    hk = h // GROUP

    offs_m = q_first + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N
    q = load_rows(head_base(Q, b, h, stride_qb, stride_qh), q_first, N, stride_qn, stride_qd, BLOCK_M, HEAD_DIM,
                  BLOCK_D, False)
    do = load_rows(head_base(DO, b, h, stride_dob, stride_doh), q_first, N, stride_don, stride_dod, BLOCK_M,
                   HEAD_DIM, BLOCK_D, False)
    row_base = (b.to(tl.int64) * H + h) * N
    lse2 = tl.load(LSE + row_base + offs_m, mask=m_ok, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)

    q_last = tl.minimum(q_first + BLOCK_M, N) - 1
    lo, hi = key_range(q_first, q_last, shift, window, M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    masked_from = masked_keys_from(q_first, shift, M, lo, hi, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    seg_base = SEG + b.to(tl.int64) * stride_seg_b
    q_seg = row_ids(seg_base + shift, offs_m, N, HAS_SEGMENTS)
    q_limit = row_ids(KL + b.to(tl.int64) * stride_kl_b, offs_m, N, HAS_KEY_LIMIT)
    if HAS_KEY_LIMIT:   # the limits replace the causal bound (as in the forward)
        hi, masked_from = limited_key_range(q_limit, offs_m, N, M, lo, BLOCK_N, HAS_WINDOW)
    if HAS_SEGMENTS:
        masked_from = lo

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _dq_inner(dq, q, do, lse2, delta, head_base(K, b, hk, stride_kb, stride_kh),
                   head_base(V, b, hk, stride_vb, stride_vh), KPM + b.to(tl.int64) * stride_kpm_b, seg_base,
                   q_seg[:, None], q_limit[:, None], offs_m, lo, hi,
                   masked_from, stride_kn, stride_kd, stride_vn, stride_vd, M, shift, window, scale, softcap,
                   HEAD_DIM, BLOCK_D, BLOCK_N, IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_KPM, HAS_SEGMENTS,
                   HAS_KEY_LIMIT, RULE, DOT_PRECISION, RB + h.to(tl.int64) * stride_rb_h, HAS_REL_BIAS)

    store_rows(head_base(DQ, b, h, stride_dqb, stride_dqh), dq * dq_factor, q_first, N, stride_dqn, stride_dqd,
               BLOCK_M, HEAD_DIM, BLOCK_D)


DQ_MODES = ("separate", "atomic")

TUNE_KEY = ["HEAD_DIM", "IS_CAUSAL", "HAS_WINDOW", "HAS_SOFTCAP", "HAS_KPM", "HAS_SEGMENTS", "HAS_KEY_LIMIT", "RULE",
            "GROUP", "N_BUCKET", "HAS_REL_BIAS"]
_tuned_dkdv = autotuned(attention_bwd_dkdv_kernel, "dkdv", key=TUNE_KEY + ["DQ_ATOMIC"])
_tuned_dkdv_atomic = autotuned(attention_bwd_dkdv_kernel, "dkdv_atomic", key=TUNE_KEY + ["DQ_ATOMIC"],
                               reset_to_zero=["DQ_ACC"])
_tuned_dq = autotuned(attention_bwd_dq_kernel, "dq", key=TUNE_KEY)



def dq_mode_default():
    """The dQ strategy when the caller names none: ATTNLRP_FAST_DQ ("separate", the default, or "atomic")."""
    mode = os.environ.get("ATTNLRP_FAST_DQ", "separate").strip().lower() or "separate"
    if mode not in DQ_MODES:
        raise ValueError(f"ATTNLRP_FAST_DQ must be one of {', '.join(DQ_MODES)}, got {mode!r}")
    return mode


def attention_bwd(do, q, k, v, o, lse, key_padding_mask=None, *, causal=False, scale=1.0, window=None,
                  softcap=None, rule="grad", config=None, dq_mode=None, segment_ids=None, key_limit=None,
                  rel_bias=None, delta=None):
    """Launch the backward for `rule` ("grad" | "attnlrp" | "cp"). Shapes as in attention_fwd; do like o.
    Returns dq, dk, dv (dk/dv reduced over each GQA group), in the dtypes of q, k, v. segment_ids, key_limit:
    as in attention_fwd (the same ones the forward had); rel_bias too (a constant: no gradient is returned for it).
    delta: fp32 (B, H, N) rowsum(dO * O) given by the caller (ring attention: these keys are one block of the row's
    softmax, O and LSE the merged ones); None: computed here from do and o.

    dq_mode: "separate" (a third launch recomputes the scores per query block: deterministic, 14 units of
    N*M*D FLOPs in all) or "atomic" (the dK/dV launch also adds each block's dQ into an fp32 buffer with
    atomics, as FlashAttention-2 does: 10 units, an fp32 (B, H, N, D) buffer, and a summation order that
    varies from run to run). None: dq_mode_default().
    config: None, one {"BLOCK_M", "BLOCK_N", "num_warps"?, "num_stages"?} for both kernels, or one per kernel
    under the keys "dkdv" and "dq"."""
    if rule not in RULE_IDS:
        raise ValueError(f"rule must be one of {tuple(RULE_IDS)}, got {rule!r}")
    cp = rule == "cp"
    dq_mode = dq_mode or dq_mode_default()
    if dq_mode not in DQ_MODES:
        raise ValueError(f"dq_mode must be one of {', '.join(DQ_MODES)}, got {dq_mode!r}")
    atomic = dq_mode == "atomic" and not cp
    B, H, N, D = q.shape
    M = k.shape[2]
    # The kernels write every element of dK, dV and (unless cp, or with no keys) dQ: no zero fill there.
    no_dq = cp or M == 0
    dq = (torch.zeros_like if no_dq else torch.empty_like)(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if B * H * N == 0 or M == 0:
        return dq, dk.zero_(), dv.zero_()
    q, k, v, o, do = (fit_int32_tiles(x) for x in (q, k, v, o, do))
    lse = lse.contiguous()   # (the kernels index it as a dense (B, H, N) array; a caller may pass a slice)
    kpm = key_padding_mask.to(torch.uint8).contiguous() if key_padding_mask is not None else None   # rows of stride 1
    seg, lim = index_inputs(segment_ids, key_limit, N, M, causal)
    rb = None if rel_bias is None else rel_bias.to(torch.float32).contiguous()
    with on_device(q):
        klq = key_limit_table(lim, M) if lim is not None and launchable(q) else None
        delta = _delta(o, do) if delta is None else delta.to(torch.float32).contiguous()
        # fp32 dQ for the atomics, contiguous (a 1-element placeholder when unused: the autotuner zeroes it)
        dq_acc = torch.zeros((B, H, N, D) if atomic else (1,), dtype=torch.float32, device=q.device)
        for part in batch_slices(B) if launchable(q) else ():   # meta: the allocations above, no launch
            acc = dq_acc[part] if atomic else dq_acc
            idx = tuple(None if t is None else t[part] for t in (seg, lim, klq))
            _launch_bwd(do[part], q[part], k[part], v[part], lse[part], delta[part],
                        None if kpm is None else kpm[part], dq[part], dk[part], dv[part], acc,
                        causal, scale, window, softcap, rule, config, atomic, idx, rb)
        if atomic:
            dq.copy_(dq_acc.mul_(float(scale) * ATTENTION_FACTORS[rule][0]))
    return dq, dk, dv


def _delta(o, do):
    """rowsum(dO * O) per query row, fp32 (B, H, N)."""
    B, H, N, D = o.shape
    delta = torch.empty((B, H, N), dtype=torch.float32, device=o.device)
    block_d = head_dim_block(D)
    block_rows = 64 if block_d <= 128 else 32
    for part in batch_slices(B) if launchable(o) else ():
        o_, do_ = o[part], do[part]
        attention_bwd_delta_kernel[(triton.cdiv(N, block_rows), H, o_.shape[0])](
            o_, do_, delta[part], *o_.stride(), *do_.stride(), H, N, HEAD_DIM=D, BLOCK_D=block_d,
            BLOCK_M=block_rows)
    return delta


def _launch_bwd(do, q, k, v, lse, delta, kpm, dq, dk, dv, dq_acc, causal, scale, window, softcap, rule, config,
                atomic, idx=(None, None, None), rb=None):
    B, H, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    qk_factor, dv_factor = ATTENTION_FACTORS[rule]
    common = (H, H // Hkv, N, M, M - N, int(window or 0), float(scale), float(softcap or 1.0))
    flags = dict(
        HEAD_DIM=D, BLOCK_D=head_dim_block(D), IS_CAUSAL=bool(causal), HAS_WINDOW=window is not None,
        HAS_SOFTCAP=softcap is not None, HAS_KPM=kpm is not None, HAS_SEGMENTS=idx[0] is not None,
        HAS_KEY_LIMIT=idx[1] is not None, RULE=RULE_IDS[rule], DOT_PRECISION=dot_precision(q.dtype),
        HAS_REL_BIAS=rb is not None,
    )
    rb_arg, rb_stride = (q, 0) if rb is None else (rb, rb.stride(0))
    kpm_arg = kpm if kpm is not None else q
    kpm_stride = kpm.stride(0) if kpm is not None else 0
    seg_arg, kl_arg, klq_arg = (q if t is None else t for t in idx)
    seg_stride, kl_stride, klq_stride = (0 if t is None else t.stride(0) for t in idx)
    bucket = length_bucket(max(N, M))
    dkdv_args = (
        q, k, v, do, lse, delta, kpm_arg, seg_arg, kl_arg, klq_arg, rb_arg, dk, dv, dq_acc,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), kpm_stride, seg_stride,
        kl_stride, klq_stride, rb_stride, *common, float(scale) * qk_factor, dv_factor, bucket,
    )
    launch(attention_bwd_dkdv_kernel, _tuned_dkdv_atomic if atomic else _tuned_dkdv, "dkdv_atomic" if atomic else "dkdv",
           M, "BLOCK_N", Hkv, B, dkdv_args, dict(flags, DQ_ATOMIC=atomic), config, q.element_size())
    if not atomic and rule != "cp":
        dq_args = (
            q, k, v, do, lse, delta, kpm_arg, seg_arg, kl_arg, rb_arg, dq,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), kpm_stride, seg_stride, kl_stride,
            rb_stride, *common, float(scale) * qk_factor, bucket,
        )
        launch(attention_bwd_dq_kernel, _tuned_dq, "dq", N, "BLOCK_M", H, B, dq_args, flags, config,
               q.element_size())
