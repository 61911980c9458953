"""The rules applied to code a model runs itself, operation by operation, where no replacement computes the module:

- attention computed in a model's own code (models whose attention does not go through transformers'
  AttentionInterface: Falcon, BLOOM, MPT, GPT-Neo, GPT-1, XGLM, ...; attention modules with code of their own inside
  the others: LongT5's local attention, Pegasus-X's global-local one);
- MLP-like modules that none of models/generic.py's forms computes (BitNet's MLP with a norm inside, MiniMax-M3's
  clamped SwiGLU with (up + 1), CPM-Ant's nested GLU): `elementwise=True`, strict.

Inside those modules' forward (and only there) a torch function mode rewrites what the rules change:
  a product of two tensors that both depend on the input (Q K^T, P V, gate * up: matmul, bmm, baddbmm, einsum,
      element-wise mul)      -> the uniform rule: each factor's gradient halved (rules.half_gradient), as the kernels
      do (dV 1/2, dQ = dK 1/4 with the softmax between) and the fused GLU op does;
  softmax       -> unchanged (the Taylor rule is its exact gradient); under CP-LRP its output is a constant;
  F.scaled_dot_product_attention -> af.attention when it has no mask tensor (O(N) memory), else the same
      softmax(Q K^T scale + mask) V with the rules above;
  with elementwise=True: an element-wise nonlinearity of an input-dependent tensor (SiLU, GELU, ReLU, sigmoid, tanh,
      powers, clamps, exp, ...) -> the identity rule (rules.identity_activation); linear and structural operations
      (linear layers, convolutions, sums, cumulative sums, zero padding, scaling by constants, views, concatenation,
      dropout, solving A X = B for a constant A) -> unchanged; anything else on an
      input-dependent tensor (a division by one, a norm computed inline, ...) -> UnsupportedModelError naming it.
Tensors that do not depend on the input (masks, ALiBi or position biases, rotary cos/sin, frozen weights) do not
require grad and are left alone, so a product with them keeps its exact gradient (the epsilon rule). Modules inside
that af.lrp replaced (norms, activations) run as replaced: the mode steps aside for them (opaque). The scores are what
the model's own code materialises (B x H x N x M for eager attention): memory is the model's, not the engine's.
"""

import contextlib
import functools
import threading

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .common import UnsupportedModelError
from attnlrp_fast.patching import Patches
from attnlrp_fast.rules import gated_split, half_gradient, identity_activation, plain_norm

_PRODUCTS = {torch.matmul, torch.bmm, torch.mul, torch.einsum, torch.baddbmm, torch.Tensor.matmul,
             torch.Tensor.__matmul__, torch.Tensor.bmm, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__,
             torch.Tensor.baddbmm}
_SOFTMAX = {torch.softmax, F.softmax, torch.Tensor.softmax}
# element-wise nonlinearities (identity rule with elementwise=True)
# normalisers: the identity rule holds them constant (their output detached); inline norms through plain_norm
_NORMALISERS = {torch.norm, torch.Tensor.norm, torch.linalg.vector_norm, torch.linalg.norm, torch.rsqrt,
                torch.Tensor.rsqrt, torch.sqrt, torch.Tensor.sqrt, torch.var, torch.Tensor.var, torch.std,
                torch.Tensor.std}
_ELEMENTWISE = {F.silu, F.gelu, F.relu, torch.relu, torch.Tensor.relu, torch.sigmoid, torch.Tensor.sigmoid, F.sigmoid,
                torch.tanh, torch.Tensor.tanh, F.tanh, F.mish, F.softplus, F.elu, F.selu, F.leaky_relu, F.relu6,
                F.hardswish, F.hardsigmoid, torch.exp, torch.Tensor.exp, torch.clamp, torch.Tensor.clamp,
                torch.clamp_min, torch.Tensor.clamp_min, torch.clamp_max, torch.Tensor.clamp_max, torch.square,
                torch.Tensor.square, torch.pow, torch.Tensor.pow, torch.Tensor.__pow__, torch.erf, torch.Tensor.erf,
                torch.abs, torch.Tensor.abs}
# linear or structural: their exact gradient is the rule (epsilon rule, or no arithmetic at all)
_LINEAR_NAMES = {
    "linear", "add", "__add__", "__radd__", "__iadd__", "add_", "sub", "__sub__", "__rsub__", "neg", "__neg__",
    "sum", "mean", "view", "reshape", "view_as", "reshape_as", "transpose", "permute", "contiguous", "__getitem__",
    "chunk", "split", "tensor_split", "unbind", "cat", "concat", "stack", "unsqueeze", "squeeze", "flatten",
    "unflatten", "expand", "expand_as", "repeat", "repeat_interleave", "to", "type", "type_as", "float", "half",
    "bfloat16", "double", "clone", "detach", "dropout", "narrow", "select", "index_select", "gather", "roll", "flip",
    "movedim", "swapaxes", "t", "masked_fill", "where", "zeros_like", "ones_like", "empty_like", "new_zeros",
    "new_empty", "new_ones", "copy_", "__setitem__", "index_add", "index_add_", "__get__", "__len__", "size", "dim",
    "numel", "element_size", "stride", "is_contiguous", "data_ptr", "__contains__", "__bool__", "__eq__", "__ne__",
    "__lt__", "__le__", "__gt__", "__ge__", "argmax", "argmin", "topk", "sort", "max", "min", "any", "all",
    "conv1d", "conv2d", "conv3d", "pad", "cumsum", "tril", "triu",
}
# solving A X = B (the delta rule's chunked form, with its coefficients held constant): linear in B for a constant A
_SOLVES = {"linalg_solve_triangular", "solve_triangular", "linalg_solve", "solve"}
_OPAQUE = threading.local()


def _grad(t):
    return isinstance(t, torch.Tensor) and t.requires_grad


def opaque(forward):
    """`forward` with the rules mode stepping aside while it runs (a module af.lrp replaced runs as replaced)."""
    @functools.wraps(forward)
    def run(*args, **kwargs):
        _OPAQUE.depth = getattr(_OPAQUE, "depth", 0) + 1
        try:
            return forward(*args, **kwargs)
        finally:
            _OPAQUE.depth -= 1
    return run


def is_router(module):
    """A mixture-of-experts router (its softmax or sigmoid keeps its exact gradient, as in models/moe.py)."""
    lowered = type(module).__name__.lower()
    return "router" in lowered or "gating" in lowered or lowered.endswith("topkgate")


@contextlib.contextmanager
def replaced_children_opaque(module):
    """For the duration: every descendant of `module` that af.lrp replaced (an instance forward), and every router,
    runs opaque."""
    with Patches() as patches:
        for child in module.modules():
            if child is not module and ("forward" in child.__dict__ or is_router(child)):
                patches.set(child, "forward", opaque(child.forward))
        yield


class RulesMode(TorchFunctionMode):
    """The mode above, for rule "attnlrp" or "cp" (rule "grad" needs none); elementwise=True adds the identity rule
    on element-wise nonlinearities and refuses operations it has no rule for."""

    def __init__(self, rule, backend=None, elementwise=False):
        super().__init__()
        self.rule, self.backend, self.elementwise = rule, backend, elementwise
        self._base = 0

    def __enter__(self):
        # opaque code steps this mode aside, not a mode entered inside it (a replaced child that runs its own code
        # under the rules: the gated norm inside a state-space mixer)
        self._base = getattr(_OPAQUE, "depth", 0)
        return super().__enter__()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(_OPAQUE, "depth", 0) > self._base:
            return func(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            return self._sdpa(*args, **kwargs)
        if func in _SOFTMAX:
            out = func(*args, **kwargs)
            return out.detach() if self.rule == "cp" else out
        if func in _PRODUCTS:
            return func(*_halved_operands(func, args), **kwargs)
        if not self.elementwise:
            return func(*args, **kwargs)
        if func in _ELEMENTWISE and args and _grad(args[0]):
            rest = args[1:]
            return identity_activation(args[0], lambda t: func(t, *rest, **kwargs), True)
        if func is F.glu and args and _grad(args[0]):
            return gated_split(args[0], kwargs.get("dim", args[1] if len(args) > 1 else -1), True)
        if func in _NORMALISERS:
            return func(*args, **kwargs).detach()
        if func in (F.layer_norm, F.rms_norm) and args and _grad(args[0]):
            return _inline_norm(func, *args, **kwargs)
        if func is F.normalize and args and _grad(args[0]):
            x, p, dim = args[0], kwargs.get("p", args[1] if len(args) > 1 else 2.0), kwargs.get("dim", -1)
            eps = kwargs.get("eps", 1e-12)
            return x / x.norm(p=p, dim=dim, keepdim=True).clamp_min(eps).detach()
        name = getattr(func, "__name__", "")
        if name in ("div", "__truediv__", "true_divide", "__itruediv__") and len(args) > 1 and _grad(args[1]):
            raise UnsupportedModelError(f"a division by an input-dependent tensor ({name}) has no rule here")
        if name in _SOLVES and args and not _grad(args[0]):   # A^-1 B for a constant A: linear in B
            return func(*args, **kwargs)
        if name in _LINEAR_NAMES or name in ("div", "__truediv__", "true_divide") or \
                isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) or \
                not any(map(_grad, _tensors(args, kwargs))):
            return func(*args, **kwargs)
        raise UnsupportedModelError(f"{name or func} on an input-dependent tensor has no rule here")

    def _sdpa(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, **_):
        from attnlrp_fast.bindings.attention import attention
        from attnlrp_fast.bindings.hf import dense_attention

        if attn_mask is None and q.shape[-1] == k.shape[-1] and q.dim() == 4:
            return attention(q, k, v, causal=bool(is_causal), scale=scale, rule=self.rule, backend=self.backend)
        return dense_attention(q, k, v, rule=self.rule, scale=scale, mask=attn_mask, causal=bool(is_causal))


def _inline_norm(func, x, normalized_shape, weight=None, bias=None, eps=None):
    """F.layer_norm / F.rms_norm over the last dim with the identity rule on the normaliser (rules.plain_norm)."""
    if len(tuple(normalized_shape)) != 1:
        raise UnsupportedModelError(f"{func.__name__} over {tuple(normalized_shape)} (more than the last dim) has no "
                                    "rule here")
    if func is F.rms_norm:
        bias, eps = None, (weight if isinstance(weight, float) else eps)
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    return plain_norm(x, weight, bias, eps, center=func is F.layer_norm, lrp=True)


def _tensors(args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))


def _halved_operands(func, args):
    """args with the input-dependent factors of a product under the uniform rule (none when fewer than two factors
    depend on the input)."""
    if func in (torch.einsum,):
        operands = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
        if sum(map(_grad, operands)) < 2:
            return args
        halved = [half_gradient(t) if _grad(t) else t for t in operands]
        return (args[0], halved) if len(args) == 2 and isinstance(args[1], (list, tuple)) else (args[0], *halved)
    if func in (torch.baddbmm, torch.Tensor.baddbmm):   # bias + alpha * (batch1 @ batch2): the bias is not a factor
        bias, factors = args[0], list(args[1:3])
        if sum(map(_grad, factors)) < 2:
            return args
        return (bias, *[half_gradient(t) for t in factors], *args[3:])
    factors = args[:2]
    if len(factors) < 2 or sum(map(_grad, factors)) < 2:
        return args
    return (*[half_gradient(t) for t in factors], *args[2:])


def wrap_forward(forward, rule, backend=None, elementwise=False, module=None):
    """`forward` run under RulesMode(rule) (when a gradient is being recorded: without one there is nothing to
    change); with elementwise, `module`'s replaced descendants run opaque."""
    def wrapped(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        with _children(module, elementwise), RulesMode(rule, backend, elementwise):
            return forward(*args, **kwargs)
    return wrapped


def _children(module, elementwise):
    return replaced_children_opaque(module) if elementwise and module is not None else contextlib.nullcontext()


def check_rules_cover(module, forward, probe, rule):
    """Run `forward` on `probe` (its first tensor made input-dependent) under the strict mode: UnsupportedModelError
    naming the first operation no rule covers."""
    with torch.enable_grad():
        x = probe[0].detach().requires_grad_(True)
        with replaced_children_opaque(module), RulesMode(rule, None, True):
            forward(x, *probe[1:])
