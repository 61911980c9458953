"""torch.library custom ops for GLU products and element-wise activations: forward, backward per rule, autograd.

  attnlrp_fast::glu_fwd(gate, up, act, lrp, backend) -> act(gate) * up
  attnlrp_fast::glu_bwd(dout, gate, up, act, lrp, backend) -> (dgate, dup)
  attnlrp_fast::activation_fwd(x, act, lrp, backend) -> act(x)
  attnlrp_fast::activation_bwd(dy, x, act, lrp, backend) -> dx

The forward is the same in both modes; `lrp` picks the backward: for the GLU product the uniform rule (each
factor's gradient halved) with the identity rule on act (act'(x) -> act(x) / x), for an activation the identity
rule. Only the inputs are saved; act is recomputed in the backward. Dispatch: dispatch.py.
"""

import torch

from ..kernels import glu as triton_glu
from . import torch_path
from .checks import check_flag, check_float_tensor, check_same_device
from .dispatch import check_backend, pick

ACTIVATIONS = tuple(triton_glu.ACT_IDS)
GLU_ACTIVATIONS = triton_glu.GLU_ACTS


def _check_common(act, valid, lrp, backend):
    if act not in valid:
        raise ValueError(f"act must be one of {valid}, got {act!r}")
    check_flag("lrp", lrp)
    check_backend(backend)


# ---- GLU product ----

@torch.library.custom_op("attnlrp_fast::glu_fwd", mutates_args=())
def glu_fwd_op(gate: torch.Tensor, up: torch.Tensor, act: str, lrp: bool, backend: str) -> torch.Tensor:
    return pick(triton_glu.glu_fwd, torch_path.glu_fwd_torch, gate, backend)(gate, up, act=act)


@glu_fwd_op.register_fake
def _(gate, up, act, lrp, backend):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("attnlrp_fast::glu_bwd", mutates_args=())
def glu_bwd_op(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: str, lrp: bool,
               backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return pick(triton_glu.glu_bwd, torch_path.glu_bwd_torch, gate, backend)(dout, gate, up, act=act, lrp=lrp)


@glu_bwd_op.register_fake
def _(dout, gate, up, act, lrp, backend):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _glu_setup_context(ctx, inputs, output):
    gate, up, act, lrp, backend = inputs
    ctx.save_for_backward(gate, up)
    ctx.options = (act, lrp, backend)


def _glu_backward(ctx, dout):
    gate, up = ctx.saved_tensors
    dgate, dup = glu_bwd_op(dout, gate, up, *ctx.options)
    return dgate, dup, None, None, None


torch.library.register_autograd("attnlrp_fast::glu_fwd", _glu_backward, setup_context=_glu_setup_context)


def glu_product(gate, up, *, act="silu", lrp=False, backend=None):
    """act(gate) * up element-wise (the GLU MLP product), in gate's dtype.

    gate, up: one shape, dtype and device; any strides (e.g. the halves of a fused gate_up projection from
    .chunk(2, -1), read in place). act: "silu" | "gelu" (exact, erf) | "gelu_tanh".
    lrp=False: exact gradients. lrp=True: uniform rule on the product and identity rule on act:
    dup = dout * act(gate) / 2, dgate = dout * up * act(gate) / gate / 2, so that
    gate * dgate + up * dup == out * dout element-wise. backend: None (auto) | "triton" | "torch".
    """
    check_float_tensor("gate", gate)
    check_float_tensor("up", up)
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got gate {tuple(gate.shape)} and up {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise TypeError(f"up has dtype {up.dtype} but gate has {gate.dtype}; they must match")
    check_same_device("up", up, "gate", gate)
    _check_common(act, GLU_ACTIVATIONS, lrp, backend)
    return glu_fwd_op(gate, up, act, lrp, backend or "auto")


# ---- element-wise activation ----

@torch.library.custom_op("attnlrp_fast::activation_fwd", mutates_args=())
def activation_fwd_op(x: torch.Tensor, act: str, lrp: bool, backend: str) -> torch.Tensor:
    return pick(triton_glu.activation_fwd, torch_path.activation_fwd_torch, x, backend)(x, act=act)


@activation_fwd_op.register_fake
def _(x, act, lrp, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op("attnlrp_fast::activation_bwd", mutates_args=())
def activation_bwd_op(dy: torch.Tensor, x: torch.Tensor, act: str, lrp: bool, backend: str) -> torch.Tensor:
    return pick(triton_glu.activation_bwd, torch_path.activation_bwd_torch, x, backend)(dy, x, act=act, lrp=lrp)


@activation_bwd_op.register_fake
def _(dy, x, act, lrp, backend):
    return x.new_empty(x.shape)


def _act_setup_context(ctx, inputs, output):
    x, act, lrp, backend = inputs
    ctx.save_for_backward(x)
    ctx.options = (act, lrp, backend)


def _act_backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return activation_bwd_op(dy, x, *ctx.options), None, None, None


torch.library.register_autograd("attnlrp_fast::activation_fwd", _act_backward, setup_context=_act_setup_context)


def activation(x, *, act="gelu", lrp=False, backend=None):
    """act(x) element-wise, in x's dtype; act: "silu" | "gelu" (exact) | "gelu_tanh" | "tanh" | "relu".

    lrp=False: exact gradient. lrp=True: identity rule, dx = dy * act(x) / x (limit at 0: 1/2 for silu and
    both gelus, 1 for tanh; relu: 1 for x > 0, else 0), so x * dx == y * dy element-wise.
    backend: None (auto) | "triton" | "torch".
    """
    check_float_tensor("x", x)
    _check_common(act, ACTIVATIONS, lrp, backend)
    return activation_fwd_op(x, act, lrp, backend or "auto")
