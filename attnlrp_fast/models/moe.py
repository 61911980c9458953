"""Mixture-of-experts layers, for every router transformers ships.

transformers (5.x) keeps the experts of every MoE family in one module with 3-D weights and describes its layout
with use_experts_implementation's flags: has_gate (gate_up_proj, else up_proj), is_concatenated (the gate and up
halves one after the other, else interleaved), is_transposed ((E, in, out) weights), has_bias, has_post_expert_norm,
and a class's own _apply_gate (clamped SwiGLU, GPT-OSS's (up + 1) * glu) where it differs from act(gate) * up. The
replacement computes the same thing expert by expert under the rules:
  act(gate) * up               the fused GLU op (SiLU, GELU) or the identity rule on act and the uniform rule
  a class's own _apply_gate    computed by the class, its relevance split evenly between the gate and up halves
                               (rules.split_product; checked to be a product f(gate) * h(up) first)
  routing weight * output      the uniform rule (as for Mixtral)
On the meta device (af.estimate_memory) the routing has no values and the worst case stands in (_assignments).
The router's choice of experts is taken as made (no gradient flows through the top-k selection; the routing weights'
own gradient flows through the router's softmax or sigmoid unchanged). A shared expert gated by sigmoid(gate(x))
(Qwen2-MoE style: the block's shared_expert_gate) takes the uniform rule on that product: half of the gradient to
each factor.
"""

import torch
import torch.nn.functional as F

from attnlrp_fast.bindings import glu_product
from attnlrp_fast.rules import identity_activation, split_product, uniform_product

from .common import _NO_MATCH, Replacement, UnsupportedModelError, _random, activation_name

_FUSED_GLU = ("silu", "gelu", "gelu_tanh")


def is_experts(module):
    """A transformers experts module: 3-D expert weights (gate_up_proj or up_proj, and down_proj)."""
    up = getattr(module, "gate_up_proj", getattr(module, "up_proj", None))
    down = getattr(module, "down_proj", None)
    return isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor) and up.dim() == 3 and down.dim() == 3


def _default_gate(module):
    fn = getattr(type(module), "_apply_gate", None)
    return fn is None or getattr(fn, "__name__", "") == "_default_apply_gate"


def _halves(gate_up, concatenated):
    return gate_up.chunk(2, dim=-1) if concatenated else (gate_up[..., ::2], gate_up[..., 1::2])


def _check_separable(module):
    """A class's own _apply_gate must be f(gate) * h(up) element-wise for split_product to apply: check
    z(g, u) z(g', u') == z(g, u') z(g', u) on random halves."""
    width = _inner(module)
    g = torch.Generator().manual_seed(1)
    a, b, c, d = (torch.randn(4, width, generator=g, dtype=torch.float64) for _ in range(4))

    def z(gate, up):
        both = torch.cat([gate, up], -1) if getattr(module, "is_concatenated", True) else \
            torch.stack([gate, up], -1).flatten(-2)
        return module._apply_gate(both)
    try:
        ok = torch.allclose(z(a, b) * z(c, d), z(a, d) * z(c, b), rtol=1e-6, atol=1e-9)
    except Exception as exc:   # noqa: BLE001 (whatever the class's gate does with float64 input)
        raise UnsupportedModelError(f"{type(module).__name__}._apply_gate could not be checked ({exc})") from exc
    if not ok:
        raise UnsupportedModelError(f"{type(module).__name__}._apply_gate is not a product of a function of the gate "
                                    "half and one of the up half; no rule for it")


def _inner(module):
    down = module.down_proj
    return down.shape[1] if getattr(module, "is_transposed", False) else down.shape[2]


def _hidden(module):
    down = module.down_proj
    return down.shape[2] if getattr(module, "is_transposed", False) else down.shape[1]


class ExpertsReplacement(Replacement):
    """Experts with 3-D weights (any family; see the module docstring): one expert at a time under the rules."""
    kind = "experts"

    def spec_for(self, module, family):
        return None if type(module).__name__ in family.experts or is_experts(module) else _NO_MATCH

    def forward(self, module, spec, lrp, backend):
        has_gate = getattr(module, "has_gate", True) and hasattr(module, "gate_up_proj")
        transposed = getattr(module, "is_transposed", False)
        concatenated = getattr(module, "is_concatenated", True)
        own_gate = has_gate and not _default_gate(module)
        if own_gate:
            _check_separable(module)
            act = f = None
        else:
            child = getattr(module, "act_fn", None)
            if child is None:
                raise UnsupportedModelError(f"{type(module).__name__} has no act_fn")
            act = activation_name(child)
            f = (lambda t: type(child).forward(child, t)) if act not in _FUSED_GLU else None
        up_w = module.gate_up_proj if has_gate else module.up_proj
        up_b = getattr(module, "gate_up_proj_bias" if has_gate else "up_proj_bias", None) \
            if getattr(module, "has_bias", False) else None
        down_b = getattr(module, "down_proj_bias", None) if getattr(module, "has_bias", False) else None
        post_norm = getattr(module, "post_expert_norm", None) if getattr(module, "has_post_expert_norm", False) \
            else None

        def linear(x, w, b):
            y = x @ w if transposed else F.linear(x, w)
            return y if b is None else y + b

        def forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs):
            out = torch.zeros_like(hidden_states)
            for e, token_idx, top_k_pos in _assignments(top_k_index, module.num_experts):
                h = linear(hidden_states[token_idx], up_w[e], None if up_b is None else up_b[e])
                if not has_gate:
                    z = identity_activation(h, lambda t: type(module.act_fn).forward(module.act_fn, t), lrp)
                elif own_gate:
                    z = split_product(module._apply_gate(h), _halves(h, concatenated), lrp)
                else:
                    gate, up = _halves(h, concatenated)
                    z = glu_product(gate, up, act=act, lrp=lrp, backend=backend) if f is None else \
                        uniform_product(identity_activation(gate, f, lrp), up, lrp)
                h = linear(z, module.down_proj[e], None if down_b is None else down_b[e])
                if post_norm is not None:
                    h = post_norm(h)
                h = uniform_product(h, top_k_weights[token_idx, top_k_pos, None], lrp)
                out = out.index_add(0, token_idx, h.to(out.dtype))
            return out
        return forward

    def probe(self, module, spec, generator):
        x = _random((6, _hidden(module)), module, generator)
        idx = torch.randint(0, module.num_experts, (6, 2), generator=generator).to(x.device)
        return (x, idx, torch.rand(6, 2, generator=generator).to(x.device, x.dtype))


def _assignments(top_k_index, num_experts):
    """(expert, token indices, top-k slots) for each expert the router chose. On the meta device (af.estimate_memory)
    the choice has no values: the worst case stands in, top_k experts each taking every token (the same number of
    token-expert pairs as any routing, the largest load one expert can get)."""
    if top_k_index.is_meta:
        n, k = top_k_index.shape[0], top_k_index.shape[-1]
        for j in range(min(k, num_experts)):
            tokens = torch.arange(n, device=top_k_index.device)
            yield j, tokens, torch.full_like(tokens, j)
        return
    with torch.no_grad():
        hit = torch.unique(top_k_index)
    for e in hit.tolist():
        if 0 <= e < num_experts:
            yield (e, *torch.where(top_k_index == e))


def gated_shared_experts(model):
    """[(gate, shared)] of every block that multiplies a shared expert's output by sigmoid(shared_expert_gate(x))."""
    return [(m.shared_expert_gate, m.shared_expert) for m in model.modules()
            if isinstance(getattr(m, "shared_expert_gate", None), torch.nn.Module)
            and isinstance(getattr(m, "shared_expert", None), torch.nn.Module)]
