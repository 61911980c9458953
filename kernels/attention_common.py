"""Pieces shared by the attention forward and backward kernels.

- which (query, key) pairs are visible (causal aligned to the end of the keys or per-query key limits, sliding
  window, key padding, segment ids), decided per element from positions and O(N + M) id / limit vectors, never
  from an N x M mask tensor;
- the logit transform (scale, optional softcap c * tanh(s / c)) and its derivative per rule;
- the range of key blocks a query block can see (and of query blocks a key block is seen by),
  so that fully masked blocks are never visited;
- launch configurations (one fixed config under the interpreter, autotuned lists on a GPU).

Position convention: query i sits at position i + shift with shift = M - N, key j at position j.

Segments (segment_ids (B, M), one id per key position): query i belongs to the segment of its position
i + shift and sees only keys of that segment. Key limits (key_limit (B, N), causal only): query i sees the keys
j <= key_limit[i], in place of j <= i + shift.
"""

import os

import triton
import triton.language as tl

from .rules import RULE_IDS

# Globals a @triton.jit function reads must be tl.constexpr (the interpreter accepts plain floats, the
# compiler does not).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Backward rules (kernels/rules.py), passed to the kernels as a constexpr id; the ids as constexpr globals.
ATTNLRP_RULE = tl.constexpr(RULE_IDS["attnlrp"])
CP_RULE = tl.constexpr(RULE_IDS["cp"])


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def head_dim_block(head_dim: int) -> int:
    """Head dims are padded to the next power of two (at least 16, for tl.dot) and masked."""
    return max(16, triton.next_power_of_2(head_dim))


def key_limit_table(key_limit, M: int):
    """int32 (B, 2, M) for the dK/dV kernel's query loop under per-query key limits (key_limit (B, N) int32):
    [:, 0, j] = the first query i whose running max of key_limit[:i+1] reaches j (no query before it sees key
    j), [:, 1, j] = the first query from which every later key_limit reaches j (every query from there on sees
    key j, as far as the limit goes). O(B * (N + M)) memory and work, computed on the tensors' device."""
    import torch

    B, N = key_limit.shape
    keys = torch.arange(M, device=key_limit.device, dtype=key_limit.dtype).expand(B, M).contiguous()
    running_max = torch.cummax(key_limit, dim=1).values.contiguous()
    suffix_min = torch.cummin(key_limit.flip(1), dim=1).values.flip(1).contiguous()
    first_seen = torch.searchsorted(running_max, keys, out_int32=True)
    all_see = torch.searchsorted(suffix_min, keys, out_int32=True)
    return torch.stack((first_seen, all_see), dim=1).contiguous()


def dot_precision(dtype) -> str:
    """fp32 inputs get full-precision dots (tests compare them at 1e-4); halves use the tensor cores."""
    import torch

    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def tanh(x):
    """tanh accurate to fp32 rounding: an odd Taylor polynomial for |x| < 0.25 (where 1 - exp(-2|x|) would
    cancel), the overflow-safe exp form elsewhere (tl has no tanh on every Triton >= 3.4 backend)."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(x >= 0, t, -t)
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    return tl.where(tl.abs(x) < 0.25, series, t)


@triton.jit
def load_rows(base, start, n_rows, stride_r, stride_d, BLOCK_R: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Rows start .. start + BLOCK_R of a (n_rows, HEAD_DIM) matrix as a zero-padded (BLOCK_R, BLOCK_D) tile, or
    its transpose (BLOCK_D, BLOCK_R) when TRANSPOSED (read straight from memory in that order: no tl.trans).
    The block's first row is addressed in 64 bits (start * stride_r can pass 2**31); offsets inside the block
    stay 32-bit (the launchers keep BLOCK * stride under 2**31: fit_int32_tiles)."""
    base = base + tl.cast(start, tl.int64) * stride_r
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    rows_ok = offs_r < n_rows - start
    if TRANSPOSED:
        tile = tl.load(base + offs_r[None, :] * stride_r + offs_d[:, None] * stride_d,
                       mask=(offs_d < HEAD_DIM)[:, None] & rows_ok[None, :], other=0.0)
    else:
        tile = tl.load(base + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d,
                       mask=rows_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    return tile


@triton.jit
def store_rows(base, tile, start, n_rows, stride_r, stride_d, BLOCK_R: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Write a (BLOCK_R, BLOCK_D) fp32 tile into rows start .. start + BLOCK_R of a (n_rows, HEAD_DIM) matrix, in
    its dtype (64-bit block start, 32-bit offsets inside the block, as load_rows)."""
    base = base + tl.cast(start, tl.int64) * stride_r
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(base + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d, tile.to(base.dtype.element_ty),
             mask=(offs_r < n_rows - start)[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def head_base(ptr, b, h, stride_b, stride_h):
    """ptr advanced to batch b, head h, in 64-bit arithmetic (b * stride_b passes 2**31 on long batches)."""
    return ptr + tl.cast(b, tl.int64) * stride_b + tl.cast(h, tl.int64) * stride_h


@triton.jit
def key_mask(kpm_base, offs_n, M, HAS_KPM: tl.constexpr):
    """Keys in bounds and, with a padding mask, real."""
    ok = offs_n < M
    if HAS_KPM:
        ok = ok & (tl.load(kpm_base + offs_n, mask=ok, other=0) != 0)
    return ok


@triton.jit
def visible(qpos, kpos, window, key_ok, q_seg, k_seg, q_limit, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
            HAS_SEGMENTS: tl.constexpr, HAS_KEY_LIMIT: tl.constexpr):
    """Visibility of key position kpos to query position qpos (broadcast blocks).

    key_ok already holds bounds and padding for the keys; causal: kpos <= qpos, or kpos <= q_limit (the query's
    key limit) with HAS_KEY_LIMIT; window W: qpos - kpos < W, and kpos - qpos < W when not causal; segments: the
    query's segment id q_seg equals the key's k_seg. q_seg, k_seg, q_limit are unused without their flags.
    """
    keep = key_ok
    if IS_CAUSAL:
        if HAS_KEY_LIMIT:
            keep = keep & (kpos <= q_limit)
        else:
            keep = keep & (kpos <= qpos)
    if HAS_WINDOW:
        keep = keep & (qpos - kpos < window)
        if not IS_CAUSAL:
            keep = keep & (kpos - qpos < window)
    if HAS_SEGMENTS:
        keep = keep & (q_seg == k_seg)
    return keep


@triton.jit
def row_ids(base, offs, n, ENABLED: tl.constexpr):
    """The int ids base[offs] of rows offs < n, -1 beyond (no segment; no key); zeros (unused) when not ENABLED.
    Keys' segments: row_ids(seg, offs_n, M); queries' segments, at their key positions offs_m + shift (the launchers
    require N <= M with segments): row_ids(seg + shift, offs_m, N); queries' key limits (int32, clamped to -1..M-1
    by the launchers): row_ids(kl, offs_m, N)."""
    if ENABLED:
        ids = tl.load(base + offs, mask=offs < n, other=-1)
    else:
        ids = tl.zeros_like(offs)
    return ids


@triton.jit
def limited_key_range(q_limit, offs_m, N, M, lo, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Key loop bounds of a query block under per-query key limits (which replace the causal bound): the end hi =
    1 + the block's largest limit (at most M), and where the masked key blocks start (as masked_keys_from):
    blocks wholly below 1 + the block's smallest limit are seen by every row; with a window every block keeps
    the mask (end = lo)."""
    in_rows = offs_m < N
    hi = tl.minimum(tl.max(tl.where(in_rows, q_limit, -1), 0) + 1, M)
    end = lo
    if not HAS_WINDOW:
        full = tl.minimum(tl.maximum(tl.min(tl.where(in_rows, q_limit, M), 0) + 1, 0), M)
        # full >= 0, so // rounds down the same way in the interpreter and on the GPU
        end = tl.minimum(tl.maximum((full // BLOCK_N) * BLOCK_N, lo), hi)
    return hi, end


@triton.jit
def limited_query_range(klq_base, k_first, k_last, M, hi, BLOCK_M: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Query loop bounds of a key block under per-query key limits, from the launcher's table (key_limit_table):
    row 0 at key j holds the first query whose running max of limits reaches j (no earlier query sees j), row 1
    the first query from which every later limit reaches j. Returns lo (rounded down to a block) and where the
    masked query blocks end (as masked_queries_until; hi with a window)."""
    lo = (tl.load(klq_base + k_first) // BLOCK_M) * BLOCK_M
    start = hi
    if not HAS_WINDOW:
        first = tl.load(klq_base + M + k_last)
        start = tl.minimum(tl.maximum(((first + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, lo), hi)
    return lo, start


@triton.jit
def key_range(q_first, q_last, shift, window, M, BLOCK_N: tl.constexpr,
              IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """[lo, hi) of keys that queries q_first..q_last may see; lo rounded down to a block start."""
    lo = 0
    hi = M
    if IS_CAUSAL:
        hi = tl.minimum(hi, q_last + shift + 1)
    if HAS_WINDOW:
        lo = tl.maximum(lo, q_first + shift - window + 1)
        if not IS_CAUSAL:
            hi = tl.minimum(hi, q_last + shift + window)
    lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def masked_keys_from(q_first, shift, M, lo, hi, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                     HAS_WINDOW: tl.constexpr):
    """Where the masked key blocks start: the blocks [lo, end) are whole and seen by every query from q_first
    on (in bounds and, causal, at or before q_first's position), so they need no mask; [end, hi) are masked.
    With a window every block keeps the mask (end = lo)."""
    end = lo
    if not HAS_WINDOW:
        full = M
        if IS_CAUSAL:
            full = tl.minimum(full, tl.maximum(q_first + shift + 1, 0))
        # full >= 0 here, so // rounds down the same way in the interpreter and on the GPU
        end = tl.minimum(tl.maximum((full // BLOCK_N) * BLOCK_N, lo), hi)
    return end


@triton.jit
def masked_queries_until(k_last, shift, lo, hi, BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr,
                         HAS_WINDOW: tl.constexpr):
    """Where the masked query blocks end: the blocks [start, hi) have every row see every key up to k_last
    (causal: rows at or after k_last's position), so they need no mask; [lo, start) are masked. Rows past N
    need no mask in the dK/dV loop (they load zeros and an LSE of +inf, so their probabilities are 0). With a
    window every block keeps the mask (start = hi)."""
    start = hi
    if not HAS_WINDOW:
        first = 0
        if IS_CAUSAL:
            first = tl.maximum(k_last - shift, 0)
        start = tl.minimum(tl.maximum(((first + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, lo), hi)
    return start


@triton.jit
def query_range(k_first, k_last, shift, window, N, BLOCK_M: tl.constexpr,
                IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """[lo, hi) of queries that may see keys k_first..k_last; lo rounded down to a block start."""
    lo = 0
    hi = N
    if IS_CAUSAL:
        lo = tl.maximum(lo, k_first - shift)
    if HAS_WINDOW:
        hi = tl.minimum(hi, k_last - shift + window)
        if not IS_CAUSAL:
            lo = tl.maximum(lo, k_first - shift - window + 1)
    lo = (lo // BLOCK_M) * BLOCK_M
    return lo, hi


@triton.jit
def softcap_logits(u, softcap):
    """Capped logits c * tanh(u / c) and tanh(u / c) itself (kept for the derivative)."""
    t = tanh(u / softcap)
    return softcap * t, t


@triton.jit
def softcap_grad_factor(u, t, softcap, RULE: tl.constexpr):
    """d(capped)/du under the rule: exact 1 - t^2, or the identity rule's capped / u (1 at u = 0)."""
    if RULE == ATTNLRP_RULE:
        small = tl.abs(u) < 1e-6
        f = tl.where(small, 1.0, softcap * t / tl.where(small, 1.0, u))
    else:
        # 1 - t^2 = 4 e / (1 + e)^2 with e = exp(-2|u/c|): no cancellation where tanh saturates
        e = tl.exp(-2.0 * tl.abs(u / softcap))
        f = 4.0 * e / ((1.0 + e) * (1.0 + e))
    return f


@triton.jit
def rel_bias_tile(rb_base, rows, cols, N, M, TRANSPOSED: tl.constexpr):
    """log2(e) * the relative bias of a tile: query i, key j get rel_bias[h, j - i + N - 1] (rb_base: head h's row).
    rows / cols: query and key indices (TRANSPOSED: key rows and query columns, the backward's dK/dV tile). Lanes
    past N or M read a clamped offset, a finite value of the vector: those lanes are masked, zero-weighted (LSE +inf)
    or never stored by the callers, and a clamp holds fewer registers than a mask tile."""
    if TRANSPOSED:
        idx = rows[:, None] - cols[None, :] + (N - 1)
    else:
        idx = cols[None, :] - rows[:, None] + (N - 1)
    idx = tl.minimum(tl.maximum(idx, 0), N + M - 2)
    return tl.load(rb_base + idx).to(tl.float32) * LOG2E


@triton.jit
def base2_logits(dot, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """log2(e) * cap(scale * dot) for the exp2-based softmax, and what the softcap's derivative needs: the
    scaled logits u and tanh(u / c) (both unused without a softcap). Without a softcap that is one multiply by
    scale * log2(e)."""
    if HAS_SOFTCAP:
        u = dot * scale
        s, t = softcap_logits(u, softcap)
        s2 = s * LOG2E
    else:
        s2 = dot * (scale * LOG2E)
        u = s2
        t = s2
    return s2, u, t


# ---- launching -------------------------------------------------------------------------------------------

# Grid dimensions 1 and 2 hold at most 65,535 programs: heads go on one, the batch on the other, in slices.
MAX_GRID_YZ = 65535
# Offsets inside a block are 32-bit: a block spans at most MAX_BLOCK rows (or columns), so strides below
# 2**31 / MAX_BLOCK keep them in range. Block starts and batch / head offsets are 64-bit in the kernels.
MAX_BLOCK = 256


def fit_int32_tiles(t):
    """t itself, or a contiguous copy when a stride of its last two dims is so large that offsets inside one
    block could pass 2**31 (a view into a vast buffer; contiguous rows have strides of a few hundred)."""
    if all(abs(s) * MAX_BLOCK < 2**31 for s in t.stride()[-2:]):
        return t
    return t.contiguous()


def batch_slices(batch: int):
    """Slices of the batch small enough for one grid dimension (each launch covers one slice)."""
    return [slice(b, min(b + MAX_GRID_YZ, batch)) for b in range(0, batch, MAX_GRID_YZ)]


def on_device(t):
    """Context under which Triton launches on t's CUDA device and its current stream (layers of one model can
    live on several GPUs; Triton launches on the current device); a no-op for CPU tensors (interpreter)."""
    import contextlib

    import torch

    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def launchable(t) -> bool:
    """Whether kernels launch on t: not on the meta device, where the launchers allocate exactly what they allocate
    on a GPU and launch nothing (af.estimate_memory counts those allocations)."""
    return not t.is_meta


def length_bucket(n: int) -> int:
    """Autotuning key for a sequence length: powers of 4 from 1 to 65,536 (so 1k, 4k, 16k, 64k+ tune apart but a
    model that sees a new length at every call does not retune every time)."""
    bucket = 1
    while bucket < n and bucket < 65536:
        bucket *= 4
    return bucket


# GPU candidates for the autotuner (ATTNLRP_FAST_AUTOTUNE=1), one list per kernel. The key holds the head dim, the
# mask flags, the GQA group, a length bucket (length_bucket) and the dtypes (Triton adds those).
def _configs(rows):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in rows]


FWD_CONFIGS = _configs([(128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3)])
# dK/dV programs own BLOCK_N keys and loop over BLOCK_M queries; dQ programs the other way round. The wide side
# is the one each program owns, so that two warpgroups (8 warps) split its rows and no MMA is issued twice.
DKDV_CONFIGS = _configs([(32, 128, 8, 2), (64, 128, 8, 1), (64, 128, 8, 2), (32, 128, 8, 3), (64, 64, 4, 2)])
# dK/dV adding dQ by atomics: dS^T K is a product with BLOCK_M rows, and only 64+ rows run on the warpgroup MMA.
DKDV_ATOMIC_CONFIGS = _configs([(64, 128, 8, 2), (64, 128, 8, 1), (64, 64, 4, 2), (64, 64, 8, 2)])
DQ_CONFIGS = _configs([(128, 64, 8, 2), (128, 64, 8, 1), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2)])


def set_descriptor_blocks(nargs):
    """Autotuner pre-hook of the descriptor forward: each candidate's block shapes into the tensor descriptors."""
    for name, key in (("q_desc", "BLOCK_M"), ("k_desc", "BLOCK_N"), ("v_desc", "BLOCK_N")):
        nargs[name].block_shape[2] = nargs[key]


FWD_TMA_CONFIGS = [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages,
                                 pre_hook=set_descriptor_blocks) for c in FWD_CONFIGS]
# Warp-specialised: num_warps is per consumer warpgroup group (4; Triton 3.6 specialises nothing at 8) and the
# kernel runs 12 warps: a producer warpgroup and two consumers that split BLOCK_M.
FWD_WS_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=st,
                                pre_hook=set_descriptor_blocks) for bm, bn, st in [(128, 128, 2), (128, 64, 3),
                                                                                   (128, 128, 3), (128, 64, 2)]]
CONFIGS = {"fwd": FWD_CONFIGS, "fwd_tma": FWD_TMA_CONFIGS, "fwd_ws": FWD_WS_CONFIGS, "dkdv": DKDV_CONFIGS,
           "dkdv_atomic": DKDV_ATOMIC_CONFIGS, "dq": DQ_CONFIGS}
# A caller's per-kernel configuration may name the general kind for its variants.
CONFIG_FALLBACK = {"dkdv_atomic": "dkdv", "fwd_tma": "fwd", "fwd_ws": "fwd"}
# "decode" (attention_decode.py) has a fixed configuration, never autotuned: its split size is chosen from BLOCK_N.
KERNEL_KINDS = (*CONFIGS, "decode")

# The interpreter has no driver to autotune with: one config, small enough to stay fast on CPU.
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32}


def autotune_enabled() -> bool:
    """Autotuning is opt-in (ATTNLRP_FAST_AUTOTUNE=1): it costs a compile and a timing per candidate per key."""
    return not interpreting() and os.environ.get("ATTNLRP_FAST_AUTOTUNE", "0").lower() in ("1", "true", "yes", "on")


def gpu_config(kind: str, block_d: int, itemsize: int) -> dict:
    """Fixed launch configuration of kernel `kind` (a key of CONFIGS) when not autotuning, for a
    (block_d)-wide head and 2- or 4-byte inputs (bench/NOTES.md has what ptxas makes of each on sm_90).

    Chosen from what Triton 3.6 makes of each for sm_90 (bench/compile_check.py --resources, bench/NOTES.md):
    every warpgroup computes its own rows of every product (no MMA issued twice) and, where possible, nothing
    spills. Half precision, head dim 65..128: the forward takes 128 x 128 blocks on 8 warps; dK/dV programs own
    128 keys and stream 32 queries (64 spills at D = 128), or 64 with atomic dQ (dS^T K needs 64 rows for the
    warpgroup MMA; 168 bytes spill), dQ programs own 128 queries and stream 64 keys. Head dims over 128 (256):
    128-row forward and dQ tiles; dK/dV on 32 x 64 still has the two warpgroups repeat part of the S^T and dP^T
    products (8 warps on 64 rows), the lesser cost next to 4 warps, which spill 1.7 KB."""
    half = itemsize < 4 and block_d <= 128
    if kind == "fwd_ws":   # 4 warps per consumer warpgroup, two consumers: 128 rows at every head dim
        return {"BLOCK_M": 128, "BLOCK_N": 128 if block_d <= 128 else 64, "num_warps": 4, "num_stages": 2}
    if block_d > 128:      # 128 query rows on 8 warps (one 64-row half per warpgroup), narrow key blocks
        table = {"fwd": (128, 32, 8, 2), "fwd_tma": (128, 32, 8, 2), "dkdv": (32, 64, 8, 1),
                 "dkdv_atomic": (32, 64, 8, 1), "dq": (128, 32, 8, 1)}
    elif not half:         # fp32 (tests, CPU-sized problems): small tiles
        table = {"fwd": (64, 32, 4, 2), "fwd_tma": (64, 32, 4, 2), "dkdv": (32, 64, 4, 1),
                 "dkdv_atomic": (32, 64, 4, 1), "dq": (64, 32, 4, 1)}
    elif block_d <= 64:
        table = {"fwd": (128, 64, 4, 3), "fwd_tma": (128, 64, 4, 3), "dkdv": (64, 64, 4, 2),
                 "dkdv_atomic": (64, 64, 4, 2), "dq": (64, 64, 4, 2)}
    else:                  # 65..128: the wide side of each kernel is 128 rows, split by its two warpgroups
        table = {"fwd": (128, 128, 8, 2), "fwd_tma": (128, 128, 8, 2), "dkdv": (32, 128, 8, 2),
                 "dkdv_atomic": (64, 128, 8, 2), "dq": (128, 64, 8, 2)}
    bm, bn, warps, stages = table[kind]
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}


def kernel_config(config, kind: str):
    """The caller's configuration for kernel `kind`: config is None, one dict for every kernel of the call
    ({"BLOCK_M", "BLOCK_N", "num_warps"?, "num_stages"?}), or a dict per kind ({"fwd": {...}, "dq": {...}})."""
    if config is None:
        return None
    if any(k in config for k in KERNEL_KINDS):
        unknown = set(config) - set(KERNEL_KINDS)
        if unknown:
            raise ValueError(f"config keys must be kernel kinds {KERNEL_KINDS}, got {sorted(unknown)}")
        return config.get(kind, config.get(CONFIG_FALLBACK.get(kind)))
    return config


def prune_configs(configs, named_args, **kwargs):
    """Drop candidates whose fp32 tiles cannot fit in registers for large head dims."""
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
    kept = [c for c in configs if block_d < 256 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
    return kept or configs[:1]


def autotuned(kernel, kind, key, reset_to_zero=None):
    """The kernel under triton.autotune over CONFIGS[kind] (used when autotune_enabled()); unchanged under the
    interpreter. reset_to_zero: arguments the kernel accumulates into (zeroed before each timing run)."""
    if interpreting():
        return kernel
    return triton.autotune(configs=CONFIGS[kind], key=key, prune_configs_by={"early_config_prune": prune_configs},
                           reset_to_zero=reset_to_zero)(kernel)


def resolve_config(config, kind, block_d, itemsize):
    """The launch configuration of kernel `kind`: the caller's (kernel_config), else the interpreter's, else None
    when the autotuner picks (autotune_enabled()), else gpu_config."""
    chosen = kernel_config(config, kind)
    if chosen is None:
        if interpreting():
            chosen = INTERPRET_CONFIG
        elif not autotune_enabled():
            chosen = gpu_config(kind, block_d, itemsize)
    return chosen


def launch(kernel, tuned, kind, rows, block_key, heads, batch, args, flags, config, itemsize):
    """Grid (blocks of `rows`, heads, batch): one program per `block_key`-sized block of rows of one head of one
    batch entry (batch <= MAX_GRID_YZ: callers slice with batch_slices), in the configuration resolve_config
    gives (the autotuned kernel `tuned` when that is None)."""
    config = resolve_config(config, kind, flags["BLOCK_D"], itemsize)
    if config is None:
        tuned[lambda meta: (triton.cdiv(rows, meta[block_key]), heads, batch)](*args, **flags)
    else:
        kernel[(triton.cdiv(rows, config[block_key]), heads, batch)](*args, **flags, **config)
