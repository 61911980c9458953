"""The rules applied operation by operation (attnlrp_fast/models/eager_rules.py), on small functions whose relevance
is known in closed form: products take the uniform rule, element-wise nonlinearities and inline normalisers the
identity rule, linear operations their exact gradient, anything else is refused by name."""

import pytest
import torch
import torch.nn.functional as F

from attnlrp_fast.models import UnsupportedModelError
from attnlrp_fast.models.eager_rules import RulesMode, is_router, replaced_children_opaque
from attnlrp_fast.reference import layer_norm_dense, rms_norm_dense


def _relevance(fn, *xs, seed=0):
    leaves = [x.clone().requires_grad_() for x in xs]
    with RulesMode("attnlrp", None, elementwise=True):
        y = fn(*leaves)
    r_y = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(seed)) * y.detach().abs()
    grads = torch.autograd.grad(y, leaves, r_y / y.detach())
    return y.detach(), r_y, [x.detach() * g for x, g in zip(leaves, grads)]


def _x(*shape, seed=1):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_product_of_two_input_dependent_factors_splits_evenly():
    a, b = _x(4, 6), _x(4, 6, seed=2)
    y, r_y, (r_a, r_b) = _relevance(lambda a, b: a * torch.tanh(b), a, b)
    assert torch.allclose(r_a, r_y / 2) and torch.allclose(r_b, r_y / 2)   # uniform, then identity through tanh


def test_inline_normalisers_are_held_constant():
    x, w = _x(3, 8), _x(8, seed=3)
    for fn in (lambda x: F.normalize(x, dim=-1) * 8 ** 0.5 * w,
               lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w,
               lambda x: x / x.norm(dim=-1, keepdim=True) * w):
        y, r_y, (r_x,) = _relevance(fn, x)
        assert torch.allclose(y, fn(x)) and torch.allclose(r_x, r_y)   # y_d = c x_d w_d with c constant


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
def test_inline_norm_functions_take_the_identity_rule(kind):
    x, w, b = _x(3, 8), _x(8, seed=4), _x(8, seed=5)
    fn = (lambda x: F.layer_norm(x, (8,), w, b, 1e-5)) if kind == "layer_norm" else \
        (lambda x: F.rms_norm(x, (8,), w, 1e-5))
    xg = x.clone().requires_grad_()
    with RulesMode("attnlrp", None, elementwise=True):
        y = fn(xg)
    do = torch.randn_like(y)
    (got,) = torch.autograd.grad(y, xg, do)
    xr = x.clone().requires_grad_()
    ref = layer_norm_dense(xr, w, b, 1e-5, lrp=True) if kind == "layer_norm" else rms_norm_dense(xr, w, 1e-5, lrp=True)
    (want,) = torch.autograd.grad(ref, xr, do)
    assert torch.allclose(y, fn(x)) and torch.allclose(got, want)


def test_an_operation_without_a_rule_is_refused_by_name():
    with pytest.raises(UnsupportedModelError, match="logsumexp on an input-dependent tensor has no rule"):
        _relevance(lambda x: x * torch.logsumexp(x, -1, keepdim=True), _x(2, 5))
    with pytest.raises(UnsupportedModelError, match="division by an input-dependent tensor"):
        _relevance(lambda a, b: a / b.exp(), _x(2, 5), _x(2, 5, seed=6))


def test_routers_and_replaced_children_run_outside_the_rules():
    """A router's sigmoid keeps its exact gradient inside a block run under the rules."""
    class TopKRouter(torch.nn.Module):
        def forward(self, x):
            return torch.sigmoid(x)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.router = TopKRouter()

        def forward(self, x):
            return self.router(x)

    block = Block()
    assert is_router(block.router) and not is_router(block)
    x = _x(2, 5).requires_grad_()
    with replaced_children_opaque(block), RulesMode("attnlrp", None, elementwise=True):
        y = block(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    s = torch.sigmoid(x.detach())
    assert torch.allclose(g, s * (1 - s))   # exact, not the identity rule's sigmoid(x) / x
    assert "forward" not in block.router.__dict__   # restored


def test_convolutions_padding_cumsum_and_solves_with_a_constant_matrix_are_linear():
    x = _x(2, 6, 9)
    w = _x(6, 1, 3, seed=7)
    a = torch.eye(9, dtype=torch.float64) + _x(9, 9, seed=8).tril(-1) * 0.1
    for fn in (lambda x: F.conv1d(x, w, padding=2, groups=6),
               lambda x: F.pad(x, (1, 2)).cumsum(-1),
               lambda x: torch.linalg.solve_triangular(a, x.transpose(-1, -2), upper=False)):
        y, r_y, (r_x,) = _relevance(fn, x)
        xg = x.clone().requires_grad_()
        (exact,) = torch.autograd.grad(fn(xg), xg, r_y / y)
        assert torch.allclose(y, fn(x)) and torch.allclose(r_x, x * exact)   # the exact gradient


def test_a_solve_whose_matrix_depends_on_the_input_is_refused():
    b = _x(4, 2)
    with pytest.raises(UnsupportedModelError, match="linalg_solve_triangular on an input-dependent tensor"):
        _relevance(lambda m: torch.linalg.solve_triangular(m.tril() + 4 * torch.eye(4, dtype=m.dtype), b,
                                                           upper=False), _x(4, 4))


def test_a_mode_entered_inside_opaque_code_applies_its_rules():
    """A child that runs its own code under the rules (opaque to its parent's mode) keeps its own mode's rules."""
    from attnlrp_fast.models.eager_rules import opaque

    def child(a, b):
        with RulesMode("attnlrp", None, elementwise=True):
            return a * torch.tanh(b)

    a, b = _x(3, 4), _x(3, 4, seed=9)
    y, r_y, (r_a, r_b) = _relevance(lambda a, b: opaque(child)(a, b) + 0 * a, a, b)
    assert torch.allclose(r_a, r_y / 2) and torch.allclose(r_b, r_y / 2)


@pytest.mark.parametrize("dim", [1, -1])
def test_torch_glu_splits_the_relevance_between_its_halves(dim):
    """F.glu (in code under the rules) and an nn.GLU module (af.lrp's gated_split replacement): a * sigmoid(b) with
    the uniform rule, the identity rule on the sigmoid: each half gets half of the output's relevance."""
    from attnlrp_fast.models.generic import GatedSplitReplacement

    x = _x(3, 6, 8)
    y, r_y, (r_x,) = _relevance(lambda x: F.glu(x, dim), x)
    r_a, r_b = r_x.chunk(2, dim=dim)
    assert torch.allclose(y, F.glu(x, dim)) and torch.allclose(r_a, r_y / 2) and torch.allclose(r_b, r_y / 2)
    module = torch.nn.GLU(dim)
    replacement = GatedSplitReplacement()
    assert replacement.spec_for(module, None) is None
    xg = x.clone().requires_grad_()
    out = replacement.forward(module, None, True, None)(xg)
    (g,) = torch.autograd.grad(out, xg, r_y / y)
    assert torch.allclose(out, module(x)) and torch.allclose(x * g, r_x)
