"""Split-KV ("flash-decoding") attention forward for a few query rows against a long key cache.

Generation runs N = 1 (or a few) query rows per head against M cached keys. The flash forward (attention_fwd)
gives each (batch, head) one program that streams all M keys: B * H programs, too few to fill a GPU when M is long
and the batch small. Here the visible keys are cut into splits of SPLIT keys (a power-of-two multiple of BLOCK_N)
and each program takes one split of one K/V head for ALL the query rows of its GQA group: the G = H / Hkv heads
times N queries stacked into G * N rows (padded to BLOCK_M >= 16 rows for tl.dot; more rows than BLOCK_M go to
several row blocks), so K/V are read once per group instead of once per query head. Grid (splits * row blocks,
Hkv, B): no dimension carries B * H. Each program writes a partial O (fp32, normalised by its own row sums) and a
partial base-2 log-sum-exp (-inf where the split shows a row nothing); a second kernel merges the splits by
log-sum-exp into O (q's dtype) and the natural-log LSE (fp32; +inf and O = 0 for rows that see no key), the
conventions of attention_fwd, so the backward kernels read this LSE as they read the flash forward's.

Split size (split_plan): enough splits that the grid holds >= 2 programs per SM (the SM count of the tensors' GPU; a
fixed count elsewhere), each split a power-of-two number of key blocks, so that SPLIT is always a multiple of 16 and
one compiled kernel serves every split size. Only the keys some row can see are split: with a window W the key
blocks before M - N - W + 1 are never launched (causal bounds nothing here: the queries sit at the end of the keys).

Cost for q (B, H, N, D), k/v (B, Hkv, M, D), N <= 16, V = the keys visible to some row (M, or about N + W with a
window W), S = the number of splits, R = ceil(G * N / BLOCK_M) row blocks of BLOCK_M rows:
  FLOPs  4 * B * Hkv * R * BLOCK_M * V * D on the matrix units (4 * B * H * N * V * D of them useful: the rest is
         the padding of G * N rows up to BLOCK_M, free where the kernel is memory-bound, as decoding is)
  memory reads K, V once per row block (R = 1 unless G * N > 64) and Q once per split; writes partials of
         S * B * H * N * (D + 1) fp32, which the merge reads once, and O (B, H, N, D) and an fp32 LSE (B, H, N):
         extra memory S * B * H * N * (D + 1) * 4 bytes, with S between 2 and 4 * SMs / (B * Hkv * R) when chosen
         (under 2 MB for one row of 32 heads of 128; a caller's small split can make it more).
"""

import functools

import torch
import triton
import triton.language as tl

from .attention_common import (
    batch_slices,
    dot_precision,
    fit_int32_tiles,
    head_base,
    head_dim_block,
    interpreting,
    kernel_config,
    launchable,
    load_rows,
    masked_keys_from,
    on_device,
    store_rows,
)
from .attention_fwd import _fwd_inner, normalise

# At most this many query rows per head: G * N rows share one tile, and generation runs one row (or a few, with
# speculative decoding).
MAX_QUERIES = 16
# attention_fwd's "auto" takes this kernel when N <= MAX_QUERIES and some row sees at least MIN_KEY_BLOCKS key
# blocks (of the BLOCK_N decode_config picks: 256 keys on a GPU in half precision, 128 under the interpreter): below
# that there is little to split, and the merge's launch costs about what splitting saves (an estimate, to be set by
# timing both forwards on a GPU).
MIN_KEY_BLOCKS = 4
# Rows per merge program: the merge is a few loads and multiply-adds per split, small tiles keep it in registers.
MERGE_ROWS = 16
# Programs per SM the split choice aims for, and the SM count assumed off CUDA (H100 / H200: 132).
PROGRAMS_PER_SM = 2
DEFAULT_SM_COUNT = 132


@triton.jit
def group_rows(base, g, i, rows_ok, stride_h, stride_n, stride_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pointers and mask of a (BLOCK_M, BLOCK_D) tile whose row r is query i[r] of head g[r] of the group starting
    at base (64-bit: heads and rows of a group can lie far apart in a strided view)."""
    offs_d = tl.arange(0, BLOCK_D)
    rows = g.to(tl.int64) * stride_h + i.to(tl.int64) * stride_n
    return base + rows[:, None] + offs_d[None, :] * stride_d, rows_ok[:, None] & (offs_d < HEAD_DIM)[None, :]


@triton.jit
def attention_decode_kernel(
    Q, K, V, OP, LP, KPM,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ls, stride_kpm_b,
    GROUP, N, M, shift, window, scale, softcap, key_first, key_end, SPLIT, ROW_BLOCKS,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One split of the keys [key_first, key_end) for one row block of one GQA group: row r of the group is query
    r % N of head r // N. Writes the partial O (normalised by the split's row sums) and the split's base-2 LSE."""
    split = tl.program_id(0) // ROW_BLOCKS
    r_first = (tl.program_id(0) % ROW_BLOCKS) * BLOCK_M
    hk = tl.program_id(1)
    b = tl.program_id(2)
    rows = GROUP * N
    offs_r = r_first + tl.arange(0, BLOCK_M)
    g = offs_r // N
    i = offs_r - g * N
    rows_ok = offs_r < rows
    ptrs, ok = group_rows(head_base(Q, b, hk * GROUP, stride_qb, stride_qh), g, i, rows_ok, stride_qh, stride_qn,
                          stride_qd, HEAD_DIM, BLOCK_D)
    q = tl.load(ptrs, mask=ok, other=0.0)

    # block-aligned splits: every key of a visited block belongs to this split (the last block ends at M)
    lo = key_first + split * SPLIT
    hi = tl.minimum(lo + SPLIT, key_end)
    masked_from = masked_keys_from(0, shift, M, lo, hi, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kpm_base = KPM + b.to(tl.int64) * stride_kpm_b
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, head_base(K, b, hk, stride_kb, stride_kh), head_base(V, b, hk, stride_vb, stride_vh),
        kpm_base, kpm_base, i[:, None], i[:, None], i, lo, hi, masked_from, stride_kn, stride_kd, stride_vn,
        stride_vd, M, shift, window, scale, softcap,
        HEAD_DIM, BLOCK_D, BLOCK_N, IS_CAUSAL, HAS_WINDOW, HAS_SOFTCAP, HAS_KPM, False, False, DOT_PRECISION,
    )
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    part = head_base(OP, b, hk, stride_pb, stride_ph) + split.to(tl.int64) * stride_ps
    store_rows(part, acc / l_safe[:, None], r_first, rows, HEAD_DIM, 1, BLOCK_M, HEAD_DIM, BLOCK_D)
    lse_part = head_base(LP, b, hk, stride_lb, stride_lh) + split.to(tl.int64) * stride_ls
    tl.store(lse_part + offs_r, tl.where(empty, float("-inf"), m_i + tl.log2(l_safe)), mask=rows_ok)


@triton.jit
def attention_decode_merge_kernel(
    OP, LP, O, LSE,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ls,
    stride_ob, stride_oh, stride_on, stride_od, stride_lse_b,
    GROUP, N, SPLITS,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """The splits of one row block of one GQA group merged by log-sum-exp (a running max over the splits, as the
    online softmax runs over key blocks); O in its dtype and strides, LSE (B, H, N) contiguous, natural log."""
    r_first = tl.program_id(0) * BLOCK_M
    hk = tl.program_id(1)
    b = tl.program_id(2)
    rows = GROUP * N
    offs_r = r_first + tl.arange(0, BLOCK_M)
    rows_ok = offs_r < rows
    part = head_base(OP, b, hk, stride_pb, stride_ph)
    lse_part = head_base(LP, b, hk, stride_lb, stride_lh)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in tl.range(0, SPLITS):
        o_s = load_rows(part + tl.cast(s, tl.int64) * stride_ps, r_first, rows, HEAD_DIM, 1, BLOCK_M, HEAD_DIM,
                        BLOCK_D, False)
        lse_s = tl.load(lse_part + tl.cast(s, tl.int64) * stride_ls + offs_r, mask=rows_ok, other=float("-inf"))
        m_new = tl.maximum(m_i, lse_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        w = tl.exp2(lse_s - m_safe)
        acc = acc * alpha[:, None] + o_s * w[:, None]
        l_i = l_i * alpha + w
        m_i = m_new
    o, lse = normalise(acc, l_i, m_i)
    g = offs_r // N
    i = offs_r - g * N
    ptrs, ok = group_rows(head_base(O, b, hk * GROUP, stride_ob, stride_oh), g, i, rows_ok, stride_oh, stride_on,
                          stride_od, HEAD_DIM, BLOCK_D)
    tl.store(ptrs, o.to(O.dtype.element_ty), mask=ok)
    # LSE (B, H, N) contiguous: row r of group hk is entry (hk * GROUP + r // N) * N + r % N = hk * GROUP * N + r
    tl.store(LSE + b.to(tl.int64) * stride_lse_b + (hk * GROUP * N).to(tl.int64) + offs_r, lse, mask=rows_ok)


# ---- launching -------------------------------------------------------------------------------------------

def row_block(rows: int) -> int:
    """Rows per program for G * N stacked query rows: a power of two, at least 16 (tl.dot), at most 64."""
    return min(64, max(16, triton.next_power_of_2(rows)))


def decode_config(config, rows: int, block_d: int, itemsize: int) -> dict:
    """The launch configuration: the caller's (kernel_config, kind "decode": {"BLOCK_M", "BLOCK_N", "num_warps"?,
    "num_stages"?}), else a fixed one (never autotuned: the split size is chosen from BLOCK_N). BLOCK_M is the
    row tile (row_block); BLOCK_N 64 keys in half precision up to head dim 128 (K and V tiles of 16 KB each,
    three stages in flight), 32 for fp32 or wider heads, and 32 under the interpreter. 4 warps (one warpgroup
    takes a 64-row tile on the warpgroup MMA), 8 for fp32 64-row tiles (which spill on 4: bench/compile_check.py)."""
    chosen = kernel_config(config, "decode")
    if chosen is not None:
        for key in ("BLOCK_M", "BLOCK_N"):
            size = chosen.get(key)
            if not isinstance(size, int) or size < 16 or size & (size - 1):
                raise ValueError(f"the decode config's {key} must be a power of two >= 16, got {size!r}")
        return dict(chosen)
    if interpreting():
        return {"BLOCK_M": row_block(rows), "BLOCK_N": 32}
    block_m = row_block(rows)
    if itemsize >= 4:
        return {"BLOCK_M": block_m, "BLOCK_N": 32, "num_warps": 8 if block_m == 64 else 4, "num_stages": 2}
    return {"BLOCK_M": block_m, "BLOCK_N": 32 if block_d > 128 else 64, "num_warps": 4, "num_stages": 3}


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device; DEFAULT_SM_COUNT elsewhere (interpreter, meta)."""
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return DEFAULT_SM_COUNT


def visible_keys(N: int, M: int, window, block_n: int):
    """[first, end) of the keys some of the N query rows (at the end of the keys) may see, first rounded down to a
    block: the window's start (M - N - W + 1 for the first row; the same causal or not), else 0, to M (causal
    bounds nothing: the last row sits at M - 1; a non-causal window reaches past M)."""
    first = 0 if window is None else max(0, M - N - int(window) + 1)
    return (first // block_n) * block_n, M


def split_plan(keys: int, programs_per_split: int, block_n: int, sms: int, split=None):
    """(keys per split, number of splits) for `keys` visible keys. split=None: the largest power-of-two multiple
    of block_n that still makes the grid (programs_per_split programs per split) hold PROGRAMS_PER_SM * sms
    programs, one block when the keys are too few for that; else the caller's split, rounded up to a multiple of
    block_n."""
    if split is None:
        want = max(1, -(-PROGRAMS_PER_SM * sms // programs_per_split))
        blocks = max(1, keys // (want * block_n))
        split = block_n << (blocks.bit_length() - 1)
    else:
        if isinstance(split, bool) or not isinstance(split, int) or split < 1:
            raise ValueError(f"split (keys per split) must be a positive int, got {split!r}")
        split = -(-split // block_n) * block_n
    return split, -(-max(keys, 0) // split)


def decode_unsupported(N: int, segment_ids=None, key_limit=None):
    """Why this kernel cannot run a forward with N query rows (None when it can)."""
    if N > MAX_QUERIES:
        return f"it takes at most {MAX_QUERIES} query rows per head, got N={N}"
    if segment_ids is not None or key_limit is not None:
        return "it takes no segment_ids or key_limit"
    return None


def decode_pays(q, k, window=None) -> bool:
    """Whether attention_fwd's "auto" takes this kernel: N <= MAX_QUERIES and some row sees at least
    MIN_KEY_BLOCKS blocks of the fixed configuration's BLOCK_N (a caller's config does not move the threshold)."""
    N, M = q.shape[2], k.shape[2]
    if N > MAX_QUERIES:
        return False
    block_n = decode_config(None, q.shape[1] // k.shape[1] * N, head_dim_block(q.shape[3]),
                            q.element_size())["BLOCK_N"]
    first, end = visible_keys(N, M, window, block_n)
    return end - first >= MIN_KEY_BLOCKS * block_n


def attention_decode(q, k, v, key_padding_mask=None, *, causal=False, scale=1.0, window=None, softcap=None,
                     split=None, config=None):
    """Launch the split-KV forward. q (B,H,N,D) with N <= 16, k/v (B,Hkv,M,D) of one dtype and device, any strides;
    key_padding_mask: bool/uint8 (B, M), nonzero = real key. Returns O (B,H,N,D) in q's dtype and LSE (B,H,N)
    fp32, as attention_fwd. split: keys per split (rounded up to a multiple of BLOCK_N; None: chosen to fill the
    GPU, split_plan). config: {"BLOCK_M", "BLOCK_N", "num_warps"?, "num_stages"?} or such a dict under "decode"
    (decode_config)."""
    B, H, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    reason = decode_unsupported(N)
    if reason:
        raise ValueError(f"attention_decode: {reason}; attention_fwd's other variants take any N")
    o = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    if B * H * N == 0:
        return o, lse
    q, k, v = (fit_int32_tiles(x) for x in (q, k, v))
    kpm = key_padding_mask.to(torch.uint8).contiguous() if key_padding_mask is not None else None
    group = H // Hkv
    rows = group * N
    block_d = head_dim_block(D)
    chosen = decode_config(config, rows, block_d, q.element_size())
    block_m, block_n = chosen["BLOCK_M"], chosen["BLOCK_N"]
    row_blocks = triton.cdiv(rows, block_m)
    first, end = visible_keys(N, M, window, block_n)
    split, splits = split_plan(end - first, B * Hkv * row_blocks, block_n, sm_count(q.device), split)
    o_part = torch.empty((B, Hkv, splits, rows, D), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((B, Hkv, splits, rows), dtype=torch.float32, device=q.device)
    if not launchable(q):
        return o, lse
    if splits == 0:   # no key to see (M = 0): the merge of nothing writes O = 0 and LSE = +inf
        o_part, lse_part = o.new_empty((1, 1, 1, 1, 1), dtype=torch.float32), lse.new_empty((1, 1, 1, 1))
    part_strides = (*o_part.stride()[:3], *lse_part.stride()[:3])
    options = {key: chosen[key] for key in ("num_warps", "num_stages") if key in chosen}
    with on_device(q):
        for part in batch_slices(B):
            nb = part.stop - part.start
            kpm_b = kpm[part] if kpm is not None else None
            if splits:
                attention_decode_kernel[(splits * row_blocks, Hkv, nb)](
                    q[part], k[part], v[part], o_part[part], lse_part[part], kpm_b if kpm_b is not None else q,
                    *q.stride(), *k.stride(), *v.stride(), *part_strides, kpm.stride(0) if kpm is not None else 0,
                    group, N, M, M - N, int(window or 0), float(scale), float(softcap or 1.0), first, end, split,
                    row_blocks, HEAD_DIM=D, BLOCK_D=block_d, IS_CAUSAL=bool(causal), HAS_WINDOW=window is not None,
                    HAS_SOFTCAP=softcap is not None, HAS_KPM=kpm is not None, DOT_PRECISION=dot_precision(q.dtype),
                    BLOCK_M=block_m, BLOCK_N=block_n, **options)
            attention_decode_merge_kernel[(triton.cdiv(rows, MERGE_ROWS), Hkv, nb)](
                o_part[part] if splits else o_part, lse_part[part] if splits else lse_part, o[part], lse[part],
                *part_strides, *o.stride(), lse.stride(0), group, N, splits, HEAD_DIM=D, BLOCK_D=block_d,
                BLOCK_M=MERGE_ROWS)
    return o, lse
