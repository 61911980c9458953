"""Property-based checks (hypothesis) over shapes, GQA ratios, N != M, padding, windows, softcaps, head dims
and rules: both backends against the float64 reference."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnlrp_fast as af
from attnlrp_fast.kernels import interpreting
from helpers import TOL, assert_close_all, dense_reference, make_qkv, run_attention


@st.composite
def attention_case(draw):
    hkv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3]))
    n = draw(st.integers(1, 70))
    m = draw(st.integers(1, 70))
    d = draw(st.sampled_from([8, 16, 20, 32, 48, 64, 80, 96]))
    kw = {"causal": draw(st.booleans()), "rule": draw(st.sampled_from(["grad", "attnlrp", "cp"]))}
    if draw(st.booleans()):
        kw["window"] = draw(st.integers(1, 80))
    if draw(st.booleans()):
        kw["softcap"] = draw(st.floats(0.5, 30.0))
    if draw(st.booleans()):
        kw["scale"] = draw(st.floats(0.05, 1.0))
    return draw(st.integers(1, 2)), hkv * group, hkv, n, m, d, draw(st.booleans()), draw(st.integers(0, 2**31 - 1)), kw


def _check(case, backend):
    B, H, Hkv, N, M, D, padded, seed, kw = case
    g = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(B, H, Hkv, N, M, D, generator=g, layout="bnhd" if seed % 2 else "bhnd")
    if padded:
        kw = {**kw, "key_padding_mask": torch.rand(B, M, generator=g) > 0.3}
    do = torch.randn(B, H, N, D, generator=g)
    outs = run_attention(af.attention, q, k, v, do, backend=backend, **kw)
    assert_close_all(outs, dense_reference(q, k, v, do, **kw), TOL[torch.float32], f"{case}")


@pytest.mark.slow
@pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1")
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attention_case())
def test_triton_matches_reference(case):
    _check(case, "triton")


@settings(max_examples=60, deadline=None)
@given(attention_case())
def test_torch_path_matches_reference(case):
    _check(case, "torch")
