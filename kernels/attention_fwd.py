"""Flash-attention forward: O = softmax(mask(cap(scale * Q K^T))) V and the row log-sum-exp.

One program computes BLOCK_M query rows of one (batch, head) and streams over the key blocks those
rows can see, keeping a running max and sum (online softmax, base 2). K/V of a GQA group are read
by its H / Hkv query heads in place, never repeated in memory.

Cost for q (B, H, N, D), k/v (B, Hkv, M, D):
  FLOPs  4 * B * H * N * M * D (about half with causal, ~ 4 * B * H * N * W * D with a window W)
  memory reads Q once and K, V once per query block; writes O (B, H, N, D) and an fp32 LSE (B, H, N):
         no N x M buffer, extra memory O(N).
Rows that see no key get O = 0 and LSE = +inf (so the backward's exp(S - LSE) is 0 for them).

A relative bias (HAS_REL_BIAS, portable kernel only): the logit of query i and key j gets rel_bias[h, j - i + N - 1]
from an (H, N + M - 1) fp32 vector (T5's bucketed position bias, ALiBi): one gathered load per score, O(N + M) memory
where the bias matrix would be N x M.

Segments and key limits (portable kernel only; forward_variant picks it when they are given): each program
reads its rows' key limits (BLOCK_M int32) and, with segments, its rows' and each key block's segment ids.
Key limits bound the key loop in-kernel (up to 1 + the block's largest limit; blocks below 1 + its smallest
limit skip the mask), so the work stays that of causal attention plus the image blocks' extra keys. Segments
do not bound the loop: every key block the other masks leave is visited and masked element-wise (correct for
any id layout; packed sequences then cost as much as one causal sequence of their total length).
"""

import os
from functools import partial

import torch
import triton
import triton.language as tl

try:  # Triton >= 3.4; the "tma" and "hopper" forward variants need it (descriptor_path_unsupported)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None

from .attention_common import (
    LN2,
    autotuned,
    base2_logits,
    batch_slices,
    dot_precision,
    fit_int32_tiles,
    head_base,
    head_dim_block,
    interpreting,
    key_mask,
    key_range,
    launch,
    launchable,
    length_bucket,
    limited_key_range,
    load_rows,
    masked_keys_from,
    on_device,
    rel_bias_tile,
    resolve_config,
    row_ids,
    store_rows,
    visible,
)


@triton.jit
def online_softmax(s, m_i, l_i):
    """One key block of the online softmax (base 2): the block's probabilities against the new running max, the
    factor that rescales what was accumulated, the new max and the new row sums. A row with nothing visible yet
    keeps m = -inf; it is shifted by 0 there so that no inf - inf appears."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def hide_keys(s, masked, qpos, offs_n, window, kpm_base, M, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              HAS_KPM: tl.constexpr, seg_base, q_seg, q_limit, HAS_SEGMENTS: tl.constexpr,
              HAS_KEY_LIMIT: tl.constexpr):
    """Logits s (rows: queries at qpos; columns: keys offs_n) with the keys a row may not see at -inf: every
    visibility rule where `masked` (a block the mask split could not clear), else key padding only. With
    HAS_SEGMENTS / HAS_KEY_LIMIT: the rows' segment ids q_seg (BLOCK_M, 1) against those of the keys at
    seg_base, and the rows' key limits q_limit (BLOCK_M, 1)."""
    if masked:
        keep = visible(qpos, offs_n[None, :], window, key_mask(kpm_base, offs_n, M, HAS_KPM)[None, :], q_seg,
                       row_ids(seg_base, offs_n, M, HAS_SEGMENTS)[None, :], q_limit, IS_CAUSAL, HAS_WINDOW,
                       HAS_SEGMENTS, HAS_KEY_LIMIT)
        s = tl.where(keep, s, float("-inf"))
    elif HAS_KPM:
        s = tl.where(key_mask(kpm_base, offs_n, M, HAS_KPM)[None, :], s, float("-inf"))
    return s


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_base, seg_base, q_seg, q_limit, offs_m, lo, hi, masked_from,
               stride_kn, stride_kd, stride_vn, stride_vd,
               M, shift, window, scale, softcap,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               HAS_KPM: tl.constexpr, HAS_SEGMENTS: tl.constexpr, HAS_KEY_LIMIT: tl.constexpr,
               DOT_PRECISION: tl.constexpr, rb_base=None, HAS_REL_BIAS: tl.constexpr = False):
    """Online-softmax accumulation (base 2) over the key blocks [lo, hi). Blocks before `masked_from` are known
    to be whole and visible to every row, so they skip the mask (key padding still applies): a uniform branch in
    one loop rather than two loops, which costs registers (spills at D = 64 in Triton 3.6). q_seg, q_limit: the
    rows' segment ids and key limits, (BLOCK_M, 1) (unused without HAS_SEGMENTS / HAS_KEY_LIMIT)."""
    qpos = offs_m[:, None] + shift
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt = load_rows(k_base, start_n, M, stride_kn, stride_kd, BLOCK_N, HEAD_DIM, BLOCK_D, True)
        s, _u, _t = base2_logits(tl.dot(q, kt, input_precision=DOT_PRECISION), scale, softcap, HAS_SOFTCAP)
        if HAS_REL_BIAS:
            s += rel_bias_tile(rb_base, offs_m, offs_n, M - shift, M, False)
        s = hide_keys(s, start_n >= masked_from, qpos, offs_n, window, kpm_base, M, IS_CAUSAL, HAS_WINDOW, HAS_KPM,
                      seg_base, q_seg, q_limit, HAS_SEGMENTS, HAS_KEY_LIMIT)
        p, alpha, m_new, l_i = online_softmax(s, m_i, l_i)
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
def normalise(acc, l_i, m_i):
    """O = acc / l and the natural-log LSE; rows that saw no key get O = 0 and LSE = +inf."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    return acc / l_safe[:, None], tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * LN2)


@triton.jit
def store_lse(lse_row, lse, q_first, N, BLOCK_M: tl.constexpr):
    offs = tl.arange(0, BLOCK_M)
    tl.store(lse_row + q_first + offs, lse, mask=offs < N - q_first)


@triton.jit
def attention_fwd_kernel(
    Q, K, V, O, LSE, KPM, SEG, KL, RB,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_kpm_b, stride_seg_b, stride_kl_b, stride_rb_h,
    H, GROUP, N, M, shift, window, scale, softcap, N_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_SEGMENTS: tl.constexpr, HAS_KEY_LIMIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_REL_BIAS: tl.constexpr = False,
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
    seg_base = SEG + b.to(tl.int64) * stride_seg_b
    q_seg = row_ids(seg_base + shift, offs_m, N, HAS_SEGMENTS)
    q_limit = row_ids(KL + b.to(tl.int64) * stride_kl_b, offs_m, N, HAS_KEY_LIMIT)
    if HAS_KEY_LIMIT:   # the limits replace the causal bound (key_limit requires causal)
        hi, masked_from = limited_key_range(q_limit, offs_m, N, M, lo, BLOCK_N, HAS_WINDOW)
    if HAS_SEGMENTS:    # any id layout: every visited block takes the mask
        masked_from = lo

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, head_base(K, b, hk, stride_kb, stride_kh), head_base(V, b, hk, stride_vb, stride_vh),
        KPM + b.to(tl.int64) * stride_kpm_b, seg_base, q_seg[:, None], q_limit[:, None], offs_m, lo, hi,
        masked_from, stride_kn, stride_kd, stride_vn, stride_vd,
        M, shift, window, scale, softcap,
        HEAD_DIM, BLOCK_D, BLOCK_N, IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_KPM, HAS_SEGMENTS, HAS_KEY_LIMIT,
        DOT_PRECISION, RB + h.to(tl.int64) * stride_rb_h, HAS_REL_BIAS,
    )
    o, lse = normalise(acc, l_i, m_i)
    # O by pointer stores: the warp specialisation splits the rows between the consumer warpgroups, and Triton
    # 3.6 cannot split a descriptor store (a pointer load of Q breaks it too, so Q comes by descriptor)
    store_rows(head_base(O, b, h, stride_ob, stride_oh), o, q_first, N, stride_on, stride_od, BLOCK_M, HEAD_DIM,
               BLOCK_D)
    store_lse(LSE + (b.to(tl.int64) * H + h) * N, lse, q_first, N, BLOCK_M)


@triton.jit
def _fwd_inner_tma(acc, l_i, m_i, q, k_desc, v_desc, kpm_base, b, hk, offs_m, lo, hi, M, shift, window, scale,
                   softcap, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                   HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr, MASKED: tl.constexpr,
                   WARP_SPECIALIZE: tl.constexpr):
    """_fwd_inner with K and V brought in by the tensor memory accelerator (TMA: descriptor loads, zero-filled past
    M and past the head dim), the mask on every block (MASKED) or on none (key padding aside), and the loop
    warp-specialised when WARP_SPECIALIZE."""
    qpos = offs_m[:, None] + shift
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        k = k_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        s, _u, _t = base2_logits(tl.dot(q, k.T), scale, softcap, HAS_SOFTCAP)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        s = hide_keys(s, MASKED, qpos, offs_n, window, kpm_base, M, IS_CAUSAL, HAS_WINDOW, HAS_KPM, kpm_base, 0, 0,
                      False, False)
        p, alpha, m_new, l_i = online_softmax(s, m_i, l_i)
        v = v_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attention_fwd_tma_kernel(
    q_desc, k_desc, v_desc, O, LSE, KPM, stride_ob, stride_oh, stride_on, stride_od, stride_kpm_b,
    H, GROUP, N, M, shift, window, scale, softcap, N_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The forward for Hopper (sm_90, Triton >= 3.6): Q, K and V through (B, H, N, D) tensor descriptors in the
    tensors' own strides, the unmasked key blocks and the masked ones in two loops (warp-specialised when
    WARP_SPECIALIZE). Same results as attention_fwd_kernel; rows past N are neither read nor written."""
    q_first = fwd_block_start(BLOCK_M, IS_CAUSAL)
    h = tl.program_id(1)
    b = tl.program_id(2)
    hk = h // GROUP
    offs_m = q_first + tl.arange(0, BLOCK_M)
    q = q_desc.load([b, h, q_first, 0]).reshape(BLOCK_M, BLOCK_D)
    q_last = tl.minimum(q_first + BLOCK_M, N) - 1
    lo, hi = key_range(q_first, q_last, shift, window, M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kpm_base = KPM + b.to(tl.int64) * stride_kpm_b
    if WARP_SPECIALIZE:
        # Triton 3.6 specialises one branch-free loop only (two loops in a row, or a branch inside, fail to
        # compile or are left alone): every block takes the mask.
        acc, l_i, m_i = _fwd_inner_tma(acc, l_i, m_i, q, k_desc, v_desc, kpm_base, b, hk, offs_m, lo, hi, M, shift,
                                       window, scale, softcap, BLOCK_D, BLOCK_N, IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP,
                                       HAS_KPM, True, True)
    else:
        masked_from = masked_keys_from(q_first, shift, M, lo, hi, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
        acc, l_i, m_i = _fwd_inner_tma(acc, l_i, m_i, q, k_desc, v_desc, kpm_base, b, hk, offs_m, lo, masked_from,
                                       M, shift, window, scale, softcap, BLOCK_D, BLOCK_N, IS_CAUSAL, HAS_WINDOW,
                                       HAS_SOFTCAP, HAS_KPM, False, False)
        acc, l_i, m_i = _fwd_inner_tma(acc, l_i, m_i, q, k_desc, v_desc, kpm_base, b, hk, offs_m, masked_from, hi,
                                       M, shift, window, scale, softcap, BLOCK_D, BLOCK_N, IS_CAUSAL, HAS_WINDOW,
                                       HAS_SOFTCAP, HAS_KPM, True, False)
    o, lse = normalise(acc, l_i, m_i)
    # O by pointer stores: the warp specialisation splits the rows between the consumer warpgroups, and Triton
    # 3.6 cannot split a descriptor store (a pointer load of Q breaks it too, so Q comes by descriptor)
    store_rows(head_base(O, b, h, stride_ob, stride_oh), o, q_first, N, stride_on, stride_od, BLOCK_M, HEAD_DIM,
               BLOCK_D)
    store_lse(LSE + (b.to(tl.int64) * H + h) * N, lse, q_first, N, BLOCK_M)


TUNE_KEY = ["HEAD_DIM", "IS_CAUSAL", "HAS_WINDOW", "HAS_SOFTCAP", "HAS_KPM", "GROUP", "N_BUCKET"]
_tuned_fwd = autotuned(attention_fwd_kernel, "fwd", key=TUNE_KEY + ["HAS_SEGMENTS", "HAS_KEY_LIMIT", "HAS_REL_BIAS"])
_tuned_fwd_tma = autotuned(attention_fwd_tma_kernel, "fwd_tma", key=TUNE_KEY + ["WARP_SPECIALIZE"])
_tuned_fwd_ws = autotuned(attention_fwd_tma_kernel, "fwd_ws", key=TUNE_KEY + ["WARP_SPECIALIZE"])

# Which forward kernel runs: "portable" (pointer loads, any GPU and Triton >= 3.4), "tma" (tensor descriptors,
# Hopper, Triton >= 3.6), "hopper" (tensor descriptors and a warp-specialised loop, Hopper, Triton 3.6), or "auto":
# the first of "tma", "portable" these tensors and this machine can take, with the caller's preference first
# (`prefer`: the bindings pass what a measured dispatch table names, so "hopper" runs under "auto" only once a GPU
# run has proven it). ATTNLRP_FAST_FWD sets the variant when the caller does not. Segment ids and per-query key
# limits run on "portable" only ("auto" picks it for them). "decode": the split-KV kernel of attention_decode.py for
# N <= 16 query rows against long keys; "auto" takes it, before anything else, when it pays (decode_pays: at least
# MIN_KEY_BLOCKS key blocks visible; no segment_ids or key_limit), or whenever it can run when `prefer` names it.
FWD_VARIANTS = ("auto", "portable", "tma", "hopper", "decode")
# Triton's Hopper warp specialisation is experimental: 3.6 (the GPU machines' version) compiles this kernel's
# loop; 3.9 fails on it (it splits the Q descriptor copy between the consumers). Other versions take "tma".
WARP_SPECIALIZED_TRITON = (3, 6)


def _triton_version():
    return tuple(int(x) for x in triton.__version__.split(".")[:2])


def forward_variant(q, k, v, key_padding_mask=None, variant=None, *, segment_ids=None, key_limit=None,
                    prefer=None, window=None, exclude=(), rel_bias=None) -> str:
    """The forward kernel for these tensors: "portable", "tma", "hopper" or "decode" (see FWD_VARIANTS). Asking for a
    descriptor variant the tensors or the machine cannot take is an error that says why; "auto" falls back
    (and under the interpreter, where only tests force the others, is "portable"): it tries `prefer` (a variant
    or None), then "tma", then "portable". The descriptor variants take no segment_ids or key_limit: "auto" is
    "portable" with them. Before all that "auto" takes "decode" where it pays for these shapes and the window
    (attention_decode.decode_pays), or where it can run at all when `prefer` is "decode". `exclude`: variants
    "auto" must not take (those a GPU check failed; "portable", the last resort, stays)."""
    asked = (variant or os.environ.get("ATTNLRP_FAST_FWD", "auto")).strip().lower() or "auto"
    if asked not in FWD_VARIANTS:
        raise ValueError(f"the forward variant must be one of {', '.join(FWD_VARIANTS)}, got {asked!r} "
                         "(argument or ATTNLRP_FAST_FWD)")
    if prefer not in (None, *FWD_VARIANTS):
        raise ValueError(f"the preferred forward variant must be one of {', '.join(FWD_VARIANTS)}, got {prefer!r}")
    prefer = None if prefer in exclude else prefer
    if rel_bias is not None:   # the relative bias is read by the portable kernel only
        if asked not in ("auto", "portable"):
            raise ValueError(f"forward variant {asked!r} cannot run here: it takes no rel_bias (the 'portable' "
                             "forward does)")
        return "portable"
    if asked == "decode" or (asked == "auto" and segment_ids is None and key_limit is None
                             and "decode" not in exclude):
        from .attention_decode import decode_pays, decode_unsupported   # (it builds on this module's kernel)

        reason = decode_unsupported(q.shape[2], segment_ids, key_limit)
        if asked == "decode" and reason:
            raise ValueError(f"forward variant 'decode' cannot run here: {reason} (the 'portable' forward takes any)")
        if asked == "decode" or (reason is None and (prefer == "decode" or decode_pays(q, k, window))):
            return "decode"
    if asked == "auto" and prefer == "portable":
        return "portable"
    if asked == "portable" or (asked == "auto" and interpreting()):
        return "portable"
    if segment_ids is not None or key_limit is not None:
        if asked == "auto":
            return "portable"
        raise ValueError(f"forward variant {asked!r} cannot run here: it takes no segment_ids or key_limit "
                         "(the 'portable' forward does)")
    candidates = (("hopper", "tma") if prefer == "hopper" else ("tma",)) if asked == "auto" else (asked,)
    for candidate in (c for c in candidates if asked != "auto" or c not in exclude):
        reason = descriptor_path_unsupported(q, k, v, key_padding_mask, warp_specialize=candidate == "hopper")
        if reason is None:
            return candidate
    if asked == "auto":
        return "portable"
    raise ValueError(f"forward variant {asked!r} cannot run here: {reason}")


def descriptor_path_unsupported(q, k, v, key_padding_mask=None, warp_specialize=False):
    """Why the tensor-descriptor forward cannot take these tensors here (None when it can)."""
    version = _triton_version()
    if TensorDescriptor is None or version < (3, 6):
        return f"it needs Triton >= 3.6 with tensor descriptors (this is {triton.__version__})"
    if warp_specialize and not interpreting():
        if version != WARP_SPECIALIZED_TRITON:
            return (f"its warp-specialised loop compiles with Triton {'.'.join(map(str, WARP_SPECIALIZED_TRITON))} "
                    f"only (this is {triton.__version__}); 'tma' runs the same kernel without it")
        if key_padding_mask is not None:   # a pointer load in the loop: Triton 3.6 cannot specialise it
            return "its warp-specialised loop takes no key padding mask; 'tma' does"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"it takes float16 or bfloat16 inputs, not {q.dtype}"
    reason = descriptor_device_unsupported(q.device)
    if reason:
        return reason
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * t.element_size() % 16 for s in t.stride()[:-1]):
            return f"{name} needs a contiguous last dim and 16-byte aligned start and strides"
    return None


def descriptor_device_unsupported(device):
    """Why the descriptor forward cannot run on `device` (None when it can: a Hopper GPU, or the interpreter).
    bench/compile_check.py stands in a GPU here to compile it without one."""
    if interpreting():
        return None
    if device.type != "cuda":
        return f"it runs on CUDA tensors, not {device.type}"
    if torch.cuda.get_device_capability(device)[0] != 9:
        return "it needs a Hopper GPU (compute capability 9.x)"
    return None


def attention_fwd(q, k, v, key_padding_mask=None, *, causal=False, scale=1.0, window=None, softcap=None,
                  config=None, variant=None, segment_ids=None, key_limit=None, prefer=None, exclude=(),
                  rel_bias=None):
    """Launch the forward. q (B,H,N,D), k/v (B,Hkv,M,D) of one dtype and device, any strides;
    key_padding_mask: uint8/bool (B, M), nonzero = real key. Returns O (B,H,N,D) and LSE (B,H,N) fp32.
    segment_ids: int (B, M), one id per key position (query i has the id of position i + M - N; needs N <= M):
    queries see the keys of their segment only. key_limit: int (B, N), causal only: query i sees the keys
    j <= key_limit[:, i] in place of j <= i + M - N. rel_bias: (H, N + M - 1) float, added to the logit of query i
    and key j at [h, j - i + N - 1] (after the softcap). All three take the "portable" kernel.

    config: optional {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"} overriding the tuned choice (or such a
    dict under the key "fwd"). variant: the kernel (FWD_VARIANTS; None: ATTNLRP_FAST_FWD, else "auto"); prefer:
    the variant "auto" tries first and exclude those it must not take (forward_variant). "decode" (N <= 16, long
    keys) runs attention_decode with its own split choice; config reaches it as for the other kernels (the kind
    "decode").
    """
    B, H, N, D = q.shape
    if B * H * N == 0:
        return (torch.empty((B, H, N, D), dtype=q.dtype, device=q.device),
                torch.empty((B, H, N), dtype=torch.float32, device=q.device))
    q, k, v = (fit_int32_tiles(x) for x in (q, k, v))
    kpm = key_padding_mask.to(torch.uint8).contiguous() if key_padding_mask is not None else None   # rows of stride 1
    seg, lim = index_inputs(segment_ids, key_limit, N, k.shape[2], causal)
    variant = forward_variant(q, k, v, kpm, variant, segment_ids=seg, key_limit=lim, prefer=prefer, window=window,
                              exclude=exclude, rel_bias=rel_bias)
    if variant == "decode":
        from . import attention_decode

        return attention_decode.attention_decode(q, k, v, kpm, causal=causal, scale=scale, window=window,
                                                 softcap=softcap, config=config)
    o = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    if variant == "portable":
        rb = None if rel_bias is None else rel_bias.to(torch.float32).contiguous()
        run = partial(_launch_fwd, seg=seg, lim=lim, rb=rb)
    else:
        run = partial(_launch_fwd_tma, warp_specialize=variant == "hopper")
    if not launchable(q):
        return o, lse
    with on_device(q):
        for part in batch_slices(B):
            run(q[part], k[part], v[part], o[part], lse[part], None if kpm is None else kpm[part], causal, scale,
                window, softcap, config, part=part)
    return o, lse


def index_inputs(segment_ids, key_limit, N, M, causal):
    """segment_ids (B, M) and key_limit (B, N) as the kernels read them: contiguous rows, segment ids in their
    own integer dtype (compared for equality only), key limits int32 clamped to -1..M-1 (the same visibility:
    no key, or every key, lies beyond those; int32 then holds every value). Checks what the kernels rely on."""
    if segment_ids is not None:
        if N > M:
            raise ValueError(f"segment_ids needs N <= M (query i sits at key position i + M - N), got N={N}, M={M}")
        segment_ids = segment_ids.contiguous()
    if key_limit is not None:
        if not causal:
            raise ValueError("key_limit replaces the causal bound: it needs causal=True")
        key_limit = key_limit.clamp(-1, max(M - 1, -1)).to(torch.int32).contiguous()
    return segment_ids, key_limit


def _scalars(q, k, kpm, window, scale, softcap):
    """The kernels' shared scalar arguments, from stride_kpm_b to N_BUCKET."""
    H, N, Hkv, M = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    return (kpm.stride(0) if kpm is not None else 0, H, H // Hkv, N, M, M - N, int(window or 0), float(scale),
            float(softcap or 1.0), length_bucket(max(N, M)))


def _flags(q, kpm, causal, window, softcap):
    D = q.shape[-1]
    return dict(HEAD_DIM=D, BLOCK_D=head_dim_block(D), IS_CAUSAL=bool(causal), HAS_WINDOW=window is not None,
                HAS_SOFTCAP=softcap is not None, HAS_KPM=kpm is not None)


def _launch_fwd(q, k, v, o, lse, kpm, causal, scale, window, softcap, config, *, seg=None, lim=None, rb=None,
                part=None):
    seg = None if seg is None else seg[part]
    lim = None if lim is None else lim[part]
    kpm_stride, *rest = _scalars(q, k, kpm, window, scale, softcap)
    args = (q, k, v, o, lse, kpm if kpm is not None else q, seg if seg is not None else q,
            lim if lim is not None else q, rb if rb is not None else q, *q.stride(), *k.stride(), *v.stride(),
            *o.stride(), kpm_stride, seg.stride(0) if seg is not None else 0, lim.stride(0) if lim is not None else 0,
            rb.stride(0) if rb is not None else 0, *rest)
    flags = dict(_flags(q, kpm, causal, window, softcap), HAS_SEGMENTS=seg is not None, HAS_KEY_LIMIT=lim is not None,
                 DOT_PRECISION=dot_precision(q.dtype), HAS_REL_BIAS=rb is not None)
    launch(attention_fwd_kernel, _tuned_fwd, "fwd", q.shape[2], "BLOCK_M", q.shape[1], q.shape[0], args, flags,
           config, q.element_size())


def _launch_fwd_tma(q, k, v, o, lse, kpm, causal, scale, window, softcap, config, *, warp_specialize, part=None):
    """The descriptor forward. Descriptors are made with the configuration's block shapes (under the autotuner,
    its pre-hook sets them per candidate: set_descriptor_blocks)."""
    block_d = head_dim_block(q.shape[-1])
    kind = "fwd_ws" if warp_specialize else "fwd_tma"
    chosen = resolve_config(config, kind, block_d, q.element_size())
    rows = chosen or {"BLOCK_M": 64, "BLOCK_N": 64}   # placeholders the autotuner's pre-hook replaces
    descs = [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows[key], block_d])
             for t, key in ((q, "BLOCK_M"), (k, "BLOCK_N"), (v, "BLOCK_N"))]
    args = (*descs, o, lse, kpm if kpm is not None else q, *o.stride(), *_scalars(q, k, kpm, window, scale, softcap))
    flags = dict(_flags(q, kpm, causal, window, softcap), WARP_SPECIALIZE=bool(warp_specialize))
    launch(attention_fwd_tma_kernel, _tuned_fwd_ws if warp_specialize else _tuned_fwd_tma, kind, q.shape[2], "BLOCK_M", q.shape[1], q.shape[0], args,
           flags, chosen, q.element_size())
