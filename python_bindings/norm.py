"""torch.library custom ops for RMSNorm and LayerNorm: forward, backward per rule, autograd, dispatch.

  attnlrp_fast::rms_norm_fwd(x, weight?, eps, offset, out_dtype, lrp, backend) -> (y, rstd)
  attnlrp_fast::rms_norm_bwd(dy, x, weight?, rstd, offset, lrp, need_dw, backend) -> (dx, dweight)
  attnlrp_fast::layer_norm_fwd(x, weight?, bias?, eps, out_dtype, lrp, backend) -> (y, mean, rstd)
  attnlrp_fast::layer_norm_bwd(dy, x, weight?, mean, rstd, lrp, need_dw, need_db, backend) -> (dx, dweight, dbias)

The forward is the same in both modes; `lrp` picks the backward (identity rule on the normaliser: rstd
held constant; the exact gradient otherwise). The per-row statistics (fp32; fp64 for fp64 inputs) are kept
for the backward. dweight / dbias come back as (D,) sums in that statistics dtype, or empty (0,) tensors
when not asked for (a custom op cannot return None); the autograd formula casts them to the parameters'
dtypes. Dispatch: dispatch.py (CUDA -> Triton, CPU -> the torch path of torch_path.py, TRITON_INTERPRET=1 or
backend="triton" -> Triton on CPU, float64 -> torch); argument checks: checks.py.
"""

from typing import Optional

import torch

from ..kernels import norm as triton_norm
from . import torch_path
from .checks import FLOAT_DTYPES, check_flag, check_float_tensor, check_number, check_same_device
from .dispatch import check_backend, pick, uses_triton


def _check_norm_arguments(x, params, eps, lrp, backend, out_dtype):
    check_float_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape (..., D) with D >= 1, got {tuple(x.shape)}")
    D = x.shape[-1]
    for name, p in params:
        if p is None:
            continue
        check_float_tensor(name, p)
        if tuple(p.shape) != (D,):
            raise ValueError(f"{name} must have shape (D,) = ({D},) for x of shape {tuple(x.shape)}, "
                             f"got {tuple(p.shape)}")
        check_same_device(name, p, "x", x)
    check_number("eps", eps, non_negative=True)
    check_flag("lrp", lrp)
    check_backend(backend)
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be None or one of float16, bfloat16, float32, float64, got {out_dtype!r}")
    if D > triton_norm.MAX_D and uses_triton(x.device, x.dtype, backend or "auto"):
        raise ValueError(f"D={D} is larger than the Triton norm kernels support ({triton_norm.MAX_D}); "
                         "use backend='torch'")


def _fwd(x, backend):
    return pick(triton_norm.norm_fwd, torch_path.norm_fwd_torch, x, backend)


def _bwd(x, backend):
    return pick(triton_norm.norm_bwd, torch_path.norm_bwd_torch, x, backend)


def _sum_or_empty(s, x):
    return s if s is not None else x.new_empty((0,), dtype=torch_path.compute_dtype(x.dtype))


def _fake_sum(x, needed):
    return x.new_empty((x.shape[-1],) if needed else (0,), dtype=torch_path.compute_dtype(x.dtype))


def _param_grad(g, p, needed):
    return g.to(p.dtype) if needed else None


# ---- RMSNorm ----

@torch.library.custom_op("attnlrp_fast::rms_norm_fwd", mutates_args=())
def rms_norm_fwd_op(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, offset: float,
                    out_dtype: torch.dtype, lrp: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    y, _, rstd = _fwd(x, backend)(x, weight, None, eps, offset=offset, out_dtype=out_dtype, center=False)
    return y, rstd


@rms_norm_fwd_op.register_fake
def _(x, weight, eps, offset, out_dtype, lrp, backend):
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape[:-1], dtype=torch_path.compute_dtype(x.dtype))


@torch.library.custom_op("attnlrp_fast::rms_norm_bwd", mutates_args=())
def rms_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], rstd: torch.Tensor,
                    offset: float, lrp: bool, need_dw: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dw, _ = _bwd(x, backend)(dy, x, weight, None, rstd, offset=offset, lrp=lrp, need_dw=need_dw)
    return dx, _sum_or_empty(dw, x)


@rms_norm_bwd_op.register_fake
def _(dy, x, weight, rstd, offset, lrp, need_dw, backend):
    return x.new_empty(x.shape), _fake_sum(x, need_dw)


def _rms_setup_context(ctx, inputs, output):
    x, weight, eps, offset, out_dtype, lrp, backend = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.options = (offset, lrp, backend)
    ctx.mark_non_differentiable(output[1])


def _rms_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    offset, lrp, backend = ctx.options
    need_dw = weight is not None and ctx.needs_input_grad[1]
    dx, dw = rms_norm_bwd_op(dy, x, weight, rstd, offset, lrp, need_dw, backend)
    return dx, _param_grad(dw, weight, need_dw), None, None, None, None, None


torch.library.register_autograd("attnlrp_fast::rms_norm_fwd", _rms_backward, setup_context=_rms_setup_context)


def rms_norm(x, weight, eps, *, offset=0.0, lrp=False, backend=None, out_dtype=None):
    """RMSNorm over the last dim: x * rstd * (offset + weight), rstd = 1 / sqrt(mean(x^2) + eps), in fp32.

    x (..., D) of a float dtype; weight (D,) or None (factor 1); offset 0.0 (Llama, Mistral, Qwen, Phi3,
    Mixtral) or 1.0 (Gemma). Returns x's shape in out_dtype (default x.dtype).
    lrp=False: exact gradients. lrp=True: the identity rule on the normaliser (rstd held constant):
    dx = dy * (offset + weight) * rstd, so x * dx == y * dy element-wise. dweight is exact in both modes.
    backend: None (auto) | "triton" | "torch".
    """
    _check_norm_arguments(x, (("weight", weight),), eps, lrp, backend, out_dtype)
    check_number("offset", offset)
    y, _ = rms_norm_fwd_op(x, weight, float(eps), float(offset), out_dtype or x.dtype, lrp, backend or "auto")
    return y


# ---- LayerNorm ----

@torch.library.custom_op("attnlrp_fast::layer_norm_fwd", mutates_args=())
def layer_norm_fwd_op(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                      out_dtype: torch.dtype, lrp: bool,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd(x, backend)(x, weight, bias, eps, out_dtype=out_dtype, center=True)


@layer_norm_fwd_op.register_fake
def _(x, weight, bias, eps, out_dtype, lrp, backend):
    stats = x.new_empty(x.shape[:-1], dtype=torch_path.compute_dtype(x.dtype))
    return x.new_empty(x.shape, dtype=out_dtype), stats, torch.empty_like(stats)


@torch.library.custom_op("attnlrp_fast::layer_norm_bwd", mutates_args=())
def layer_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], mean: torch.Tensor,
                      rstd: torch.Tensor, lrp: bool, need_dw: bool, need_db: bool,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = _bwd(x, backend)(dy, x, weight, mean, rstd, lrp=lrp, need_dw=need_dw, need_db=need_db)
    return dx, _sum_or_empty(dw, x), _sum_or_empty(db, x)


@layer_norm_bwd_op.register_fake
def _(dy, x, weight, mean, rstd, lrp, need_dw, need_db, backend):
    return x.new_empty(x.shape), _fake_sum(x, need_dw), _fake_sum(x, need_db)


def _ln_setup_context(ctx, inputs, output):
    x, weight, bias, eps, out_dtype, lrp, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.options = (lrp, backend)
    ctx.mark_non_differentiable(mean, rstd)


def _ln_backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    lrp, backend = ctx.options
    need_dw = weight is not None and ctx.needs_input_grad[1]
    need_db = bias is not None and ctx.needs_input_grad[2]
    dx, dw, db = layer_norm_bwd_op(dy, x, weight, mean, rstd, lrp, need_dw, need_db, backend)
    return dx, _param_grad(dw, weight, need_dw), _param_grad(db, bias, need_db), None, None, None, None


torch.library.register_autograd("attnlrp_fast::layer_norm_fwd", _ln_backward, setup_context=_ln_setup_context)


def layer_norm(x, weight, bias, eps, *, lrp=False, backend=None, out_dtype=None):
    """LayerNorm over the last dim: (x - mean) * rstd * weight + bias, rstd = 1 / sqrt(var + eps) (biased).

    x (..., D) of a float dtype; weight, bias (D,) or None. Returns x's shape in out_dtype (default x.dtype).
    lrp=False: exact gradients. lrp=True: rstd held constant (centering stays linear):
    dx = rstd * (gy - mean(gy)) with gy = dy * weight. dweight, dbias are exact in both modes.
    backend: None (auto) | "triton" | "torch".
    """
    _check_norm_arguments(x, (("weight", weight), ("bias", bias)), eps, lrp, backend, out_dtype)
    y, _, _ = layer_norm_fwd_op(x, weight, bias, float(eps), out_dtype or x.dtype, lrp, backend or "auto")
    return y
