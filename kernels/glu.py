"""Element-wise activations and GLU products, forward and backward (the activation and the rule constexpr).

  activation  y = act(x)
  GLU         out = act(gate) * up
  act: silu x * sigmoid(x) | gelu x * Phi(x) (exact, erf) | gelu_tanh 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
       | tanh | relu   (the GLU product takes the first three)

Backward with the factor f(x) = act'(x) ("grad") or act(x) / x ("lrp", identity rule):
  activation  dx = dy * f(x)
  GLU         grad: dgate = dout * up * act'(gate),        dup = dout * act(gate)
              lrp:  uniform rule on the product (each factor's gradient halved), identity rule on act:
                    dgate = 1/2 * dout * up * act(gate) / gate,  dup = 1/2 * dout * act(gate)
act(x) / x is computed in closed form where it has one, with no division and so no special case at x = 0:
sigmoid(x) (silu), Phi(x) (gelu), sigmoid(2 u) = (1 + tanh(u)) / 2 (gelu_tanh), all 1/2 at x = 0; tanh(x) / x
uses the limit 1 for |x| < 1e-6; relu's ratio is 1 for x > 0 and 0 otherwise (its gradient).
Only the inputs are kept for the backward: act is recomputed there.

Layout: 2-D (rows, cols) tensors with a row stride each and a contiguous last dim, so the two halves of a
fused gate_up projection (Phi3: gate_up.chunk(2, -1), row stride 2 * cols) are read in place.
Cost per element: forward reads 1 (GLU: 2) values and writes 1, ~10 FLOPs and one exp or erf; backward reads
2 (3), writes 1 (2), ~20 FLOPs. No memory beyond the outputs.
"""

import torch
import triton
import triton.language as tl

from .attention_common import launchable, on_device, tanh
from .norm import rows_2d

ACT_IDS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "tanh": 3, "relu": 4}
GLU_ACTS = ("silu", "gelu", "gelu_tanh")

INV_SQRT2: tl.constexpr = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI: tl.constexpr = tl.constexpr(0.3989422804014327)
SQRT_2_OVER_PI: tl.constexpr = tl.constexpr(0.7978845608028654)
GELU_CUBIC: tl.constexpr = tl.constexpr(0.044715)

TILE_ELEMENTS = 4096
MAX_BLOCK_C = 1024


@triton.jit
def act_and_factor(x, ACT: tl.constexpr, LRP: tl.constexpr):
    """act(x) and the backward factor: act'(x), or act(x) / x under the identity rule (fp32 in, fp32 out).
    The constexpr constants stand right of a tensor in every product (constexpr * tensor breaks the interpreter)."""
    if ACT == 0:  # silu
        s = tl.sigmoid(x)
        a = x * s
        if LRP:
            f = s
        else:
            f = s * (1.0 + x * (1.0 - s))
    elif ACT == 1:  # gelu, exact
        cdf = 0.5 * (1.0 + tl.erf(x * INV_SQRT2))
        a = x * cdf
        if LRP:
            f = cdf
        else:
            f = cdf + x * tl.exp(-0.5 * x * x) * INV_SQRT_2PI
    elif ACT == 2:  # gelu_tanh: 0.5 (1 + tanh(u)) = sigmoid(2 u), with no cancellation for x << 0
        u = x * SQRT_2_OVER_PI * (1.0 + x * x * GELU_CUBIC)
        h = tl.sigmoid(2.0 * u)
        a = x * h
        if LRP:
            f = h
        else:
            f = h + x * 2.0 * h * (1.0 - h) * SQRT_2_OVER_PI * (1.0 + x * x * 3.0 * GELU_CUBIC)
    elif ACT == 3:  # tanh
        a = tanh(x)
        if LRP:
            small = tl.abs(x) < 1e-6
            f = tl.where(small, 1.0, a / tl.where(small, 1.0, x))
        else:
            f = 1.0 - a * a
    else:  # relu: the ratio and the gradient agree
        a = tl.maximum(x, 0.0)
        f = tl.where(x > 0, 1.0, 0.0)
    return a, f


@triton.jit
def _tile(n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row indices (int64, a column), column indices (a row) and the bounds mask of this program's tile."""
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_r < n_rows)[:, None] & (offs_c < n_cols)[None, :]
    return offs_r[:, None], offs_c[None, :], mask


@triton.jit
def act_fwd_kernel(X, UP, Y, stride_x, stride_up, stride_y, n_rows, n_cols,
                   ACT: tl.constexpr, HAS_UP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r, c, mask = _tile(n_rows, n_cols, BLOCK_R, BLOCK_C)
    x = tl.load(X + r * stride_x + c, mask=mask, other=0.0).to(tl.float32)
    y, _f = act_and_factor(x, ACT, False)
    if HAS_UP:
        y = y * tl.load(UP + r * stride_up + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + r * stride_y + c, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def act_bwd_kernel(DY, X, UP, DX, DUP, stride_dy, stride_x, stride_up, stride_dx, stride_dup, n_rows, n_cols,
                   ACT: tl.constexpr, LRP: tl.constexpr, HAS_UP: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r, c, mask = _tile(n_rows, n_cols, BLOCK_R, BLOCK_C)
    dy = tl.load(DY + r * stride_dy + c, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + r * stride_x + c, mask=mask, other=0.0).to(tl.float32)
    a, f = act_and_factor(x, ACT, LRP)
    if HAS_UP:
        if LRP:
            dy = 0.5 * dy
        tl.store(DUP + r * stride_dup + c, (dy * a).to(DUP.dtype.element_ty), mask=mask)
        f = f * tl.load(UP + r * stride_up + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + r * stride_dx + c, (dy * f).to(DX.dtype.element_ty), mask=mask)


def _as_rows(t):
    """(rows, cols) view over the last dim of t (a 0-d tensor is one element)."""
    t = t.reshape(1) if t.dim() == 0 else t
    return rows_2d(t, t.shape[-1])


def _grid(rows, cols):
    block_c = min(MAX_BLOCK_C, triton.next_power_of_2(max(cols, 1)))
    block_r = max(1, TILE_ELEMENTS // block_c)
    return (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c)), dict(BLOCK_R=block_r, BLOCK_C=block_c)


def _fwd(x, up, act):
    x2 = _as_rows(x)
    up2 = x2 if up is None else _as_rows(up)
    rows, cols = x2.shape
    y = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
    if y.numel() > 0 and launchable(x2):
        grid, blocks = _grid(rows, cols)
        with on_device(x2):
            act_fwd_kernel[grid](x2, up2, y, x2.stride(0), up2.stride(0), y.stride(0), rows, cols,
                                 ACT=ACT_IDS[act], HAS_UP=up is not None, **blocks)
    return y.reshape(x.shape)


def _bwd(dy, x, up, act, lrp):
    dy2, x2 = _as_rows(dy), _as_rows(x)
    up2 = x2 if up is None else _as_rows(up)
    rows, cols = x2.shape
    dx = torch.empty((rows, cols), dtype=x.dtype, device=x.device)
    dup = dx if up is None else torch.empty((rows, cols), dtype=up.dtype, device=x.device)
    if dx.numel() > 0 and launchable(x2):
        grid, blocks = _grid(rows, cols)
        with on_device(x2):
            act_bwd_kernel[grid](dy2, x2, up2, dx, dup, dy2.stride(0), x2.stride(0), up2.stride(0), dx.stride(0),
                                 dup.stride(0), rows, cols, ACT=ACT_IDS[act], LRP=bool(lrp), HAS_UP=up is not None,
                                 **blocks)
    return dx.reshape(x.shape), dup.reshape(x.shape)


def glu_fwd(gate, up, *, act="silu"):
    """act(gate) * up for gate, up of one shape (any row strides), in gate's dtype."""
    return _fwd(gate, up, act)


def glu_bwd(dout, gate, up, *, act="silu", lrp=False):
    """(dgate, dup) under the rule: exact, or (lrp) the uniform rule on the product with the identity rule on act."""
    return _bwd(dout, gate, up, act, lrp)


def activation_fwd(x, *, act="gelu"):
    """act(x) element-wise, in x's dtype."""
    return _fwd(x, None, act)


def activation_bwd(dy, x, *, act="gelu", lrp=False):
    """dx = dy * act'(x), or (lrp) dy * act(x) / x."""
    return _bwd(dy, x, None, act, lrp)[0]
