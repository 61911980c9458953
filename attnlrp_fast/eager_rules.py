"""AttnLRP's attention rules on attention a model computes in its own code (models whose attention does not go
through transformers' AttentionInterface: Falcon, BLOOM, MPT, GPT-Neo, GPT-1, XGLM, ...).

Inside those attention modules' forward (and only there) a torch function mode rewrites what the rules change:
  a product of two tensors that both depend on the input (Q K^T, P V: matmul, bmm, baddbmm, einsum, element-wise
      mul)      -> the uniform rule: each factor's gradient halved (rules.half_gradient), as the kernels do
      (dV 1/2, dQ = dK 1/4 with the softmax between);
  softmax       -> unchanged (the Taylor rule is its exact gradient); under CP-LRP its output is a constant;
  F.scaled_dot_product_attention -> af.attention when it has no mask tensor (O(N) memory), else the same
      softmax(Q K^T scale + mask) V with the rules above.
Tensors that do not depend on the input (masks, ALiBi or position biases, rotary cos/sin, frozen weights) do not
require grad and are left alone, so a product with them keeps its exact gradient (the epsilon rule). The scores are
what the model's own code materialises (B x H x N x M for eager attention): memory is the model's, not the engine's.
"""

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from attnlrp_fast.rules import half_gradient

_PRODUCTS = {torch.matmul, torch.bmm, torch.mul, torch.einsum, torch.baddbmm, torch.Tensor.matmul,
             torch.Tensor.__matmul__, torch.Tensor.bmm, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__,
             torch.Tensor.baddbmm}
_SOFTMAX = {torch.softmax, F.softmax, torch.Tensor.softmax}


def _grad(t):
    return isinstance(t, torch.Tensor) and t.requires_grad


class AttentionRules(TorchFunctionMode):
    """The mode above, for rule "attnlrp" or "cp" (rule "grad" needs none)."""

    def __init__(self, rule, backend=None):
        super().__init__()
        self.rule, self.backend = rule, backend

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._sdpa(*args, **kwargs)
        if self.rule == "cp" and func in _SOFTMAX:
            return func(*args, **kwargs).detach()
        if self.rule == "attnlrp" and func in _PRODUCTS:
            args = _halved_operands(func, args)
        return func(*args, **kwargs)

    def _sdpa(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, **_):
        from attnlrp_fast.bindings.attention import attention

        if attn_mask is None and q.shape[-1] == k.shape[-1] and q.dim() == 4:
            return attention(q, k, v, causal=bool(is_causal), scale=scale, rule=self.rule, backend=self.backend)
        if k.shape[-3] != q.shape[-3]:
            k, v = (t.repeat_interleave(q.shape[-3] // t.shape[-3], dim=-3) for t in (k, v))
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        if self.rule == "attnlrp":
            q, k, v = half_gradient(q), half_gradient(k), half_gradient(v)
        s = (q @ k.transpose(-1, -2)) * scale
        if is_causal:
            n, m = s.shape[-2], s.shape[-1]
            s = s.masked_fill(torch.ones(n, m, dtype=torch.bool, device=s.device).tril(m - n).logical_not(),
                              float("-inf"))
        if attn_mask is not None:
            s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
        p = torch.softmax(s.float(), dim=-1).to(q.dtype)
        if self.rule == "cp":
            p = p.detach()
        elif self.rule == "attnlrp":
            p = half_gradient(p)
        return p @ v


def _halved_operands(func, args):
    """args with the two input-dependent factors of a product under the uniform rule (none when fewer than two
    factors depend on the input)."""
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


def wrap_forward(forward, rule, backend=None):
    """`forward` run under AttentionRules(rule)."""
    def wrapped(*args, **kwargs):
        with AttentionRules(rule, backend):
            return forward(*args, **kwargs)
    return wrapped
