"""Attention variants in the engine against the float64 oracle, in both backends: attention sinks (a learned logit per
head in the softmax denominator) and a value head dim other than the query/key head dim (multi-head latent attention).
Sizes are not multiples of any block size."""

import pytest
import torch

import attnlrp_fast as af
from attnlrp_fast.kernels import interpreting
from attnlrp_fast.reference import attention_dense
from helpers import rel_err

NEEDS_INTERPRETER = pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1")
BACKENDS = [pytest.param("triton", marks=NEEDS_INTERPRETER), "torch"]
# the wide grids: Triton's interpreter there is the slow part (one case of each runs in the inner loop below)
GRID_BACKENDS = [pytest.param("triton", marks=[NEEDS_INTERPRETER, pytest.mark.slow]), "torch"]
CASES = {"plain": {}, "causal_window_padding": {"causal": True, "window": 13, "padding": True},
         "softcap": {"softcap": 3.0, "causal": True}}


def _run(fn, q, k, v, do, sinks=None, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    extra = {}
    if sinks is not None:
        extra["sinks"] = sinks.detach().clone().requires_grad_()
    o = fn(*leaves, **extra, **kw)
    o.backward(do)
    return [o.detach()] + [t.grad for t in leaves] + ([extra["sinks"].grad] if sinks is not None else [])


def _inputs(seed, N=37, M=45, D=24, Dv=24, H=4, Hkv=2):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, H, N, D, generator=g)
    k = torch.randn(2, Hkv, M, D, generator=g)
    v = torch.randn(2, Hkv, M, Dv, generator=g)
    return g, q, k, v


def _case(g, case, M):
    kw = dict(CASES[case])
    if kw.pop("padding", False):
        kw["key_padding_mask"] = torch.rand(2, M, generator=g) > 0.3
    return kw


def _compare(q, k, v, do, backend, rule, sinks=None, tol=1e-4, **kw):
    got = _run(af.attention, q, k, v, do, sinks=sinks, rule=rule, backend=backend, **kw)
    ref = _run(attention_dense, *(t.double() for t in (q, k, v)), do.double(),
               sinks=None if sinks is None else sinks.double(), rule=rule, **kw)
    names = ["o", "dq", "dk", "dv", "dsinks"]
    for name, a, b in zip(names, got, ref):
        if name in ("dq", "dk", "dsinks") and rule == "cp":   # attention weights held constant
            assert a.abs().max() == 0, name
            continue
        assert rel_err(a.double(), b) < tol, f"{name} differs from the float64 oracle ({backend}, {rule})"


@pytest.mark.parametrize("backend", GRID_BACKENDS)
@pytest.mark.parametrize("rule", ["grad", "attnlrp", "cp"])
@pytest.mark.parametrize("case", list(CASES))
def test_sinks_match_oracle(case, rule, backend):
    g, q, k, v = _inputs(len(case) + len(rule))
    sinks = torch.randn(q.shape[1], generator=g) + 1.0
    kw = _case(g, case, k.shape[2])
    do = torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[3], generator=g)
    _compare(q, k, v, do, backend, rule, sinks=sinks, **kw)


def test_sinks_take_probability_mass():
    """A large sink logit drains the row: the output shrinks by exp(lse) / (exp(lse) + exp(sink))."""
    _, q, k, v = _inputs(3)
    plain = af.attention(q, k, v, backend="torch")
    drained = af.attention(q, k, v, backend="torch", sinks=torch.full((q.shape[1],), 30.0))
    assert drained.abs().max() < 1e-6 * plain.abs().max()
    same = af.attention(q, k, v, backend="torch", sinks=torch.full((q.shape[1],), -60.0))
    assert rel_err(same, plain) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dims", [(24, 16), (16, 40)], ids=["v_smaller", "v_larger"])
@pytest.mark.parametrize("rule", ["grad", "attnlrp"])
def test_value_head_dim_differs(dims, rule, backend):
    D, Dv = dims
    g, q, k, v = _inputs(D + Dv, D=D, Dv=Dv)
    kw = _case(g, "causal_window_padding", k.shape[2])
    do = torch.randn(q.shape[0], q.shape[1], q.shape[2], Dv, generator=g)
    _compare(q, k, v, do, backend, rule, **kw)


def test_variant_arguments_are_checked():
    _, q, k, v = _inputs(4)
    with pytest.raises(ValueError, match=r"sinks must have shape \(H,\) = \(4,\)"):
        af.attention(q, k, v, sinks=torch.zeros(3))
    with pytest.raises(TypeError, match="sinks"):
        af.attention(q, k, v, sinks=[0.0] * 4)
    with pytest.raises(ValueError, match="same \\(B, Hkv, M\\)"):
        af.attention(q, k, v[:, :, :-1])


def _t5_buckets(N, M, num_buckets=8, max_distance=20, bidirectional=True):
    """T5's bucket of each offset j - i (transformers' formula, written again), from -(N - 1) to M - 1."""
    rel = torch.arange(-(N - 1), M)
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = -torch.clamp(rel, max=0)
    exact = num_buckets // 2
    large = exact + (torch.log(rel.float() / exact) / torch.log(torch.tensor(max_distance / exact))
                     * (num_buckets - exact)).long()
    return buckets + torch.where(rel < exact, rel, large.clamp(max=num_buckets - 1))


@pytest.mark.parametrize("backend", GRID_BACKENDS)
@pytest.mark.parametrize("rule", ["grad", "attnlrp", "cp"])
@pytest.mark.parametrize("kind", ["t5", "alibi"])
@pytest.mark.parametrize("case", list(CASES))
def test_relative_bias_matches_oracle(case, kind, rule, backend):
    """A bias that depends on the head and the offset j - i only, given as (H, N + M - 1): T5's bucketed table
    (bidirectional) or ALiBi's -slope_h |j - i|."""
    g, q, k, v = _inputs(len(case) + len(kind) + len(rule))
    H, N, M = q.shape[1], q.shape[2], k.shape[2]
    if kind == "t5":
        table = torch.randn(8, H, generator=g)
        rel_bias = table[_t5_buckets(N, M)].T.contiguous()
    else:
        slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1) / H)
        rel_bias = -slopes[:, None] * torch.arange(-(N - 1), M).abs()[None, :].float()
    kw = _case(g, case, M)
    do = torch.randn(q.shape, generator=g)
    got = _run(af.attention, q, k, v, do, rel_bias=rel_bias, rule=rule, backend=backend, **kw)
    ref = _run(attention_dense, q.double(), k.double(), v.double(), do.double(), rel_bias=rel_bias.double(),
               rule=rule, **kw)
    for name, a, b in zip(["o", "dq", "dk", "dv"], got, ref):
        if name in ("dq", "dk") and rule == "cp":
            assert a.abs().max() == 0
            continue
        assert rel_err(a.double(), b) < 1e-4, f"{name} differs from the float64 oracle ({backend}, {rule})"
    plain = af.attention(q, k, v, backend=backend, **kw)
    assert rel_err(got[0], plain) > 1e-3   # the bias does change the output


def test_relative_bias_is_checked():
    _, q, k, v = _inputs(5)
    with pytest.raises(ValueError, match=r"rel_bias must have shape \(H, N \+ M - 1\) = \(4, 81\)"):
        af.attention(q, k, v, rel_bias=torch.zeros(4, 80))


@NEEDS_INTERPRETER
def test_triton_variants_one_case_each():
    """The inner loop's share of the Triton grids above: sinks and a T5 bias, AttnLRP, causal with a window and
    padding."""
    test_sinks_match_oracle("causal_window_padding", "attnlrp", "triton")
    test_relative_bias_matches_oracle("causal_window_padding", "t5", "attnlrp", "triton")


@pytest.mark.parametrize("rule", ["grad", "attnlrp", "cp"])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_a_4d_mask_the_model_built_itself_takes_the_rules(rule, kind):
    """transformers' attention interface given a 4-D mask a model built itself (Doge, Switch Transformers): dense
    attention under the module's rule, equal to the float64 oracle of the same visibility."""
    from attnlrp_fast.bindings.hf import RULE_ATTR, attnlrp_fast_attention

    g, q, k, v = _inputs(17, N=23, M=23)
    keep = torch.ones(23, 23, dtype=torch.bool).tril()[None, None].expand(2, 1, 23, 23)
    mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    module = torch.nn.Module()
    setattr(module, RULE_ATTR, rule)
    do = torch.randn(q.shape, generator=g)

    def via_interface(q, k, v):
        return attnlrp_fast_attention(module, q, k, v, mask, scaling=0.3)[0].transpose(1, 2)
    got = _run(via_interface, q, k, v, do)
    ref = _run(attention_dense, q.double(), k.double(), v.double(), do.double(), causal=True, scale=0.3, rule=rule)
    for name, a, b in zip(["o", "dq", "dk", "dv"], got, ref):
        if name in ("dq", "dk") and rule == "cp":
            assert a is None or a.abs().max() == 0   # (no gradient reaches them)
            continue
        assert rel_err(a.double(), b) < 1e-4, name
