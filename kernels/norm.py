"""Fused RMSNorm and LayerNorm, forward and backward, one kernel family (centering and the rule constexpr).

  RMSNorm    y = x * rstd * (offset + w),        rstd = 1 / sqrt(mean(x^2) + eps)
  LayerNorm  y = (x - mean) * rstd * w + b,      rstd = 1 / sqrt(mean((x - mean)^2) + eps)  (biased var)
over the last dim, in fp32, cast to the output dtype; w and b optional (factor 1, no bias). The forward
saves rstd (and the mean for LayerNorm) as fp32, one per row.

Backward, with xhat = (x - mean) * rstd (mean = 0 for RMSNorm) and gy = dy * (offset + w):
  exact ("grad"):  RMSNorm   dx = rstd * (gy - xhat * mean(gy * xhat))
                   LayerNorm dx = rstd * (gy - mean(gy) - xhat * mean(gy * xhat))
  "lrp":           identity rule on the normaliser, i.e. rstd held constant (centering stays linear):
                   RMSNorm   dx = rstd * gy
                   LayerNorm dx = rstd * (gy - mean(gy))
  both:            dw = sum_rows dy * xhat,  db = sum_rows dy  (exact; only when asked for)

Layout: x is viewed as (rows, D) with any row stride (last dim contiguous); a whole row is one tile of
BLOCK_D = next_power_of_2(D) <= 65536 columns, BLOCK_R rows per tile.

Cost for R rows of width D:
  forward   FLOPs ~ 5 R D (LayerNorm ~ 7 R D); reads x once and w, b once per program; writes y and
            4 (8) bytes per row of statistics.
  backward  FLOPs ~ 8 R D (+ 2 R D each for dw, db); reads dy, x once; writes dx. dw / db: each of at
            most MAX_PARTIALS programs owns a fixed run of rows and writes one fp32 partial row, summed
            in torch afterwards: no atomics (deterministic), extra memory MAX_PARTIALS x D fp32 at most.
"""

import math

import torch
import triton
import triton.language as tl

from .attention_common import fit_int32_tiles, launchable, load_rows, on_device, store_rows

MAX_D = 65536
MAX_PARTIALS = 512
TILE_ELEMENTS = 8192


@triton.jit
def _row_factor(W, offs_d, d_ok, offset, HAS_W: tl.constexpr):
    """(offset + w) as fp32 over the padded columns, or 1 without a weight."""
    if HAS_W:
        f = offset + tl.load(W + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    else:
        f = tl.full(offs_d.shape, 1.0, tl.float32)
    return f


@triton.jit
def norm_fwd_kernel(X, W, B, Y, MEAN, RSTD, stride_x, stride_y, n_rows, eps, offset,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                    CENTER: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK_R
    offs_r = start + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    r_ok = offs_r < n_rows
    x = load_rows(X, start, n_rows, stride_x, 1, BLOCK_R, D, BLOCK_D, False).to(tl.float32)
    if CENTER:
        mean = tl.sum(x, 1) / D
        x = tl.where(d_ok[None, :], x - mean[:, None], 0.0)
        tl.store(MEAN + offs_r, mean, mask=r_ok)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)
    y = x * rstd[:, None] * _row_factor(W, offs_d, d_ok, offset, HAS_W)[None, :]
    if HAS_B:
        y += tl.load(B + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    store_rows(Y, y, start, n_rows, stride_y, 1, BLOCK_R, D, BLOCK_D)
    tl.store(RSTD + offs_r, rstd, mask=r_ok)


@triton.jit
def norm_bwd_kernel(DY, X, W, MEAN, RSTD, DX, DW, DB, stride_dy, stride_x, stride_dx, n_rows, rows_per_program,
                    offset, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                    CENTER: tl.constexpr, HAS_W: tl.constexpr, LRP: tl.constexpr,
                    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr):
    pid = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    factor = _row_factor(W, offs_d, d_ok, offset, HAS_W)
    dw = tl.zeros([BLOCK_D], tl.float32)
    db = tl.zeros([BLOCK_D], tl.float32)
    # This program's rows: [start, end), a whole number of BLOCK_R tiles (rows_per_program is a multiple).
    start = pid.to(tl.int64) * rows_per_program
    end = tl.minimum(start + rows_per_program, n_rows)
    for r0 in tl.range(start, end, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < end
        x = load_rows(X, r0, end, stride_x, 1, BLOCK_R, D, BLOCK_D, False).to(tl.float32)
        dy = load_rows(DY, r0, end, stride_dy, 1, BLOCK_R, D, BLOCK_D, False).to(tl.float32)
        rstd = tl.load(RSTD + offs_r, mask=r_ok, other=0.0)
        if CENTER:
            mean = tl.load(MEAN + offs_r, mask=r_ok, other=0.0)
            x = tl.where(d_ok[None, :], x - mean[:, None], 0.0)
        xhat = x * rstd[:, None]
        gy = dy * factor[None, :]
        g = gy
        if CENTER:
            g = g - (tl.sum(gy, 1) / D)[:, None]
        if not LRP:
            g = g - xhat * (tl.sum(gy * xhat, 1) / D)[:, None]
        store_rows(DX, g * rstd[:, None], r0, end, stride_dx, 1, BLOCK_R, D, BLOCK_D)
        if COMPUTE_DW:
            dw += tl.sum(dy * xhat, 0)
        if COMPUTE_DB:
            db += tl.sum(dy, 0)
    if COMPUTE_DW:
        tl.store(DW + pid * D + offs_d, dw, mask=d_ok)
    if COMPUTE_DB:
        tl.store(DB + pid * D + offs_d, db, mask=d_ok)


def rows_2d(t, D):
    """(rows, D) view of t with a contiguous last dim (a copy only when the last dim is strided, or the row stride
    is too large for 32-bit offsets inside a block: fit_int32_tiles)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return fit_int32_tiles(t.reshape(math.prod(t.shape[:-1]), D))


def _blocks(D):
    if D > MAX_D:
        raise ValueError(f"the Triton norm kernels take rows of at most {MAX_D} elements, got D={D}; "
                         "use backend='torch'")
    block_d = triton.next_power_of_2(D)
    block_r = max(1, min(64, TILE_ELEMENTS // block_d))
    num_warps = max(4, min(16, block_r * block_d // 1024))
    return block_d, block_r, num_warps


def norm_fwd(x, weight, bias, eps, *, offset=0.0, out_dtype=None, center=False):
    """RMSNorm (center=False: x * rstd * (offset + weight)) or LayerNorm (center=True; offset unused there:
    pass 0.0) over the last dim of x (..., D). weight, bias: (D,) or None. Returns y (x's shape, dtype
    out_dtype or x's), mean (x.shape[:-1], fp32; None for RMSNorm) and rstd (x.shape[:-1], fp32)."""
    D = x.shape[-1]
    block_d, block_r, num_warps = _blocks(D)
    x2 = rows_2d(x, D)
    rows = x2.shape[0]
    y = torch.empty((rows, D), dtype=out_dtype or x.dtype, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    mean = torch.empty_like(rstd) if center else None
    if rows > 0 and launchable(x2):
        with on_device(x2):
            norm_fwd_kernel[(triton.cdiv(rows, block_r),)](
                x2, x2 if weight is None else weight, x2 if bias is None else bias, y, rstd if mean is None else mean,
                rstd, x2.stride(0), y.stride(0), rows, float(eps), float(offset),
                D=D, BLOCK_D=block_d, BLOCK_R=block_r, CENTER=center, HAS_W=weight is not None,
                HAS_B=bias is not None, num_warps=num_warps)
    return y.reshape(x.shape), mean, rstd


def norm_bwd(dy, x, weight, mean, rstd, *, offset=0.0, lrp=False, need_dw=False, need_db=False):
    """dx (x's dtype) under the rule (lrp: rstd constant, centering linear) for the norm norm_fwd computed
    (LayerNorm iff mean is given); dweight and dbias as fp32 (D,) sums when asked for, else None."""
    D = x.shape[-1]
    block_d, block_r, num_warps = _blocks(D)
    x2, dy2 = rows_2d(x, D), rows_2d(dy, D)
    rstd = rstd.reshape(-1).contiguous()
    mean = None if mean is None else mean.reshape(-1).contiguous()
    rows = x2.shape[0]
    dx = torch.empty((rows, D), dtype=x.dtype, device=x.device)
    blocks = triton.cdiv(rows, block_r)
    # With a weight/bias gradient each program reduces a fixed run of row tiles into one partial row
    # (every program writes its row: no zero fill; with no rows the sums over zero partials are zeros).
    reduce = need_dw or need_db
    per_program = triton.cdiv(blocks, MAX_PARTIALS) if reduce and blocks > 0 else 1
    programs = triton.cdiv(blocks, per_program)
    partial = torch.empty((2 if need_db else 1, programs, D), dtype=torch.float32, device=x.device) if reduce else None
    if rows > 0 and launchable(x2):
        with on_device(x2):
            norm_bwd_kernel[(programs,)](
                dy2, x2, x2 if weight is None else weight, rstd if mean is None else mean, rstd, dx,
                dx if partial is None else partial[0], dx if partial is None else partial[-1],
                dy2.stride(0), x2.stride(0), dx.stride(0), rows, per_program * block_r,
                float(offset), D=D, BLOCK_D=block_d, BLOCK_R=block_r, CENTER=mean is not None,
                HAS_W=weight is not None, LRP=bool(lrp), COMPUTE_DW=bool(need_dw), COMPUTE_DB=bool(need_db),
                num_warps=num_warps)
    dw = partial[0].sum(0) if need_dw else None
    db = partial[-1].sum(0) if need_db else None
    return dx.reshape(x.shape), dw, db
