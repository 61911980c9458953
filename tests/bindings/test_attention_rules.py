"""The rules themselves: relevance x * g(x) from the engine equals the paper's explicit propagation,
CP-LRP leaves Q and K without gradient, conservation where the rules conserve, and the exact rule
agrees with finite differences."""

import pytest
import torch

import attnlrp_fast as af
from attnlrp_fast.kernels import interpreting
from explicit_rules import attention_relevance
from helpers import make_qkv, rel_err, run_attention

BACKENDS = [pytest.param("triton", marks=pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1")),
            "torch"]
CASES = {
    "plain": {},
    "causal_gqa_padding": {"causal": True, "padding": True},
    "window_softcap": {"window": 11, "softcap": 2.0},
    "causal_softcap_window": {"causal": True, "softcap": 1.0, "window": 30},
}


def _inputs(seed, case, N=41, M=47):
    g = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(2, 4, 2, N, M, 24, generator=g)
    kw = dict(CASES[case])
    if kw.pop("padding", False):
        kw["key_padding_mask"] = torch.rand(2, M, generator=g) > 0.3
    return g, q, k, v, kw


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", ["attnlrp", "cp"])
@pytest.mark.parametrize("case", list(CASES))
def test_relevance_equals_explicit_rules(case, rule, backend):
    g, q, k, v, kw = _inputs(len(case), case)
    o = af.attention(q, k, v, backend="torch", **kw)
    r_out = torch.randn(o.shape, generator=g) * o.abs()  # any output relevance
    do = r_out / o  # g(O) = R_O / O
    _, dq, dk, dv = run_attention(af.attention, q, k, v, do, rule=rule, backend=backend, **kw)
    r_q, r_k, r_v = attention_relevance(q, k, v, r_out, rule=rule, **kw)
    for name, got, ref in (("R_Q", q * dq, r_q), ("R_K", k * dk, r_k), ("R_V", v * dv, r_v)):
        assert rel_err(got, ref) < 1e-4, f"{name} differs from the explicit {rule} rule"


@pytest.mark.parametrize("backend", BACKENDS)
def test_cp_gives_no_query_key_gradient(backend):
    _, q, k, v, kw = _inputs(1, "causal_gqa_padding")
    _, dq, dk, dv = run_attention(af.attention, q, k, v, torch.randn_like(q), rule="cp", backend=backend, **kw)
    assert dq.abs().max() == 0 and dk.abs().max() == 0
    assert dv.abs().max() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_attnlrp_is_scaled_gradient_without_softcap(backend):
    """Without a softcap AttnLRP is the exact gradient with dV halved and dQ, dK quartered."""
    _, q, k, v, kw = _inputs(2, "causal_gqa_padding")
    do = torch.randn_like(q)
    _, *exact = run_attention(af.attention, q, k, v, do, rule="grad", backend=backend, **kw)
    _, *lrp = run_attention(af.attention, q, k, v, do, rule="attnlrp", backend=backend, **kw)
    for got, ref, f in zip(lrp, exact, (0.25, 0.25, 0.5)):
        assert rel_err(got, f * ref) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_attnlrp_differs_from_gradient_under_softcap(backend):
    """With a softcap the identity rule replaces tanh's derivative: relevance is no longer a scaled gradient."""
    _, q, k, v, kw = _inputs(3, "window_softcap")
    do = torch.randn_like(q)
    _, dq_exact, _, _ = run_attention(af.attention, q, k, v, do, rule="grad", backend=backend, **kw)
    _, dq_lrp, _, _ = run_attention(af.attention, q, k, v, do, rule="attnlrp", backend=backend, **kw)
    assert rel_err(dq_lrp, 0.25 * dq_exact) > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", ["attnlrp", "cp"])
def test_value_relevance_is_conserved(rule, backend):
    """The uniform rule on P V gives V half of the output relevance (CP-LRP all of it)."""
    _, q, k, v, kw = _inputs(4, "causal_gqa_padding")
    do = torch.randn_like(q)
    o, dq, dk, dv = run_attention(af.attention, q, k, v, do, rule=rule, backend=backend, **kw)
    total = (o.double() * do).sum()
    share = 0.5 if rule == "attnlrp" else 1.0
    assert torch.allclose((v.double() * dv).sum(), share * total, rtol=1e-4, atol=1e-5)


def test_exact_rule_matches_finite_differences():
    """The torch path's explicit backward formulas against finite differences, float64."""
    g = torch.Generator().manual_seed(9)
    q, k, v = (x.double().requires_grad_() for x in make_qkv(1, 2, 1, 7, 9, 8, generator=g))
    kpm = torch.tensor([[True] * 7 + [False, True]])
    for kw in ({"causal": True, "window": 4}, {"softcap": 0.7, "key_padding_mask": kpm}):
        assert torch.autograd.gradcheck(lambda a, b, c: af.attention(a, b, c, backend="torch", **kw), (q, k, v))
