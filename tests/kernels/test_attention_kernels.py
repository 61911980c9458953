"""Attention forward and backward, Triton kernels (interpreter on CPU) and the torch path, against the
materialised float64 reference, for every rule and mask feature."""

import math
import zlib

import pytest
import torch

import attnlrp_fast as af
from attnlrp_fast.kernels import interpreting
from attnlrp_fast.kernels.attention_bwd import attention_bwd
from attnlrp_fast.kernels.attention_fwd import attention_fwd
from attnlrp_fast.reference import attention_dense
from helpers import TOL, assert_close_all, dense_reference, make_qkv, rel_err, run_attention

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")

BACKENDS = [pytest.param("triton", marks=needs_interpreter), "torch"]
RULES = ["grad", "attnlrp", "cp"]
FEATURES = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"window": 9},
    "causal_window": {"causal": True, "window": 13},
    "softcap": {"softcap": 2.5},
    "causal_softcap": {"causal": True, "softcap": 1.5},
    "padding": {"padding": True},
    "everything": {"causal": True, "window": 21, "softcap": 3.0, "padding": True},
}


def zlib_seed(*key):
    """A seed from the test's parameters, the same in every process (hash() of a str is not)."""
    return zlib.crc32(repr(key).encode())


def _case(feature, B, M, seed):
    kw = dict(FEATURES[feature])
    if kw.pop("padding", False):
        g = torch.Generator().manual_seed(seed + 1)
        kpm = torch.rand(B, M, generator=g) > 0.25
        kpm[:, -1] = True
        kw["key_padding_mask"] = kpm
    return kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("rule", RULES)
# the inner loop keeps "everything" (every feature at once); each feature alone is in the whole suite
@pytest.mark.parametrize("feature", [f if f == "everything" else pytest.param(f, marks=pytest.mark.slow)
                                     for f in FEATURES])
def test_matches_float64_reference(feature, rule, dtype, backend):
    g = torch.Generator().manual_seed(zlib_seed(feature, rule))
    B, H, Hkv, N, M, D = 2, 2, 1, 45, 71, 24
    q, k, v = make_qkv(B, H, Hkv, N, M, D, dtype, generator=g)
    do = torch.randn(B, H, N, D, generator=g).to(dtype)
    kw = _case(feature, B, M, seed=N)
    outs = run_attention(af.attention, q, k, v, do, rule=rule, backend=backend, **kw)
    assert all(x.dtype == dtype for x in outs)
    refs = dense_reference(q, k, v, do, rule=rule, **kw)
    assert_close_all(outs, refs, TOL[dtype], f"{feature}/{rule}/{backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [8, 16, 24, 80, 96, 128, 256])
def test_head_dims(D, backend):
    g = torch.Generator().manual_seed(D)
    q, k, v = make_qkv(1, 2, 1, 37, 41, D, generator=g)
    do = torch.randn(1, 2, 37, D, generator=g)
    kw = dict(causal=True, rule="attnlrp", softcap=4.0)
    outs = run_attention(af.attention, q, k, v, do, backend=backend, **kw)
    assert_close_all(outs, dense_reference(q, k, v, do, **kw), TOL[torch.float32], f"D={D}")


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "H,Hkv,N,M,causal",
    [
        (4, 1, 1, 77, True),     # single-token decode against a cache, GQA 4:1
        (4, 4, 19, 83, True),    # prefill with a cache (queries aligned to the end of the keys)
        (6, 2, 50, 20, True),    # N > M: the first N - M queries see no key
        (6, 3, 70, 5, False),    # fewer keys than one block
        (2, 2, 65, 65, True),    # one past two blocks
    ],
)
def test_shapes_and_gqa(H, Hkv, N, M, causal, backend):
    g = torch.Generator().manual_seed(N * 100 + M)
    D = 32
    q, k, v = make_qkv(2, H, Hkv, N, M, D, generator=g)
    do = torch.randn(2, H, N, D, generator=g)
    for rule in RULES:
        outs = run_attention(af.attention, q, k, v, do, causal=causal, rule=rule, backend=backend)
        assert_close_all(outs, dense_reference(q, k, v, do, causal=causal, rule=rule), TOL[torch.float32],
                         f"{H}/{Hkv}/{N}/{M}/{rule}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_and_broadcast_gradient(backend):
    """HF passes (B, N, H, D).transpose(1, 2) views; o.sum() sends a stride-0 gradient."""
    g = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(2, 4, 2, 40, 40, 32, layout="bnhd", generator=g)
    assert not q.is_contiguous()
    for rule in RULES:
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        o = af.attention(*leaves, causal=True, rule=rule, backend=backend)
        o.sum().backward()
        outs = (o.detach(), *[x.grad for x in leaves])
        refs = dense_reference(q, k, v, torch.ones_like(o), causal=True, rule=rule)
        assert_close_all(outs, refs, TOL[torch.float32], rule)


@pytest.mark.slow
@needs_interpreter
@pytest.mark.parametrize("rule", RULES)
def test_kernels_with_small_blocks(rule):
    """16 x 16 blocks: many blocks per row and column, every boundary case of the loop bounds."""
    g = torch.Generator().manual_seed(11)
    q, k, v = make_qkv(1, 4, 2, 53, 61, 40, generator=g)
    do = torch.randn(1, 4, 53, 40, generator=g)
    kpm = torch.rand(1, 61, generator=g) > 0.3
    config = {"BLOCK_M": 16, "BLOCK_N": 16}
    for kw in ({"causal": True, "window": 17}, {"window": 10}, {"softcap": 2.0}):
        scale = 1 / math.sqrt(40)
        o, lse = attention_fwd(q, k, v, kpm, scale=scale, config=config, **kw)
        dq, dk, dv = attention_bwd(do, q, k, v, o, lse, kpm, scale=scale, rule=rule, config=config, **kw)
        refs = dense_reference(q, k, v, do, key_padding_mask=kpm, rule=rule, **kw)
        assert_close_all((o, dq, dk, dv), refs, TOL[torch.float32], f"{kw}")


@pytest.mark.slow
@needs_interpreter
@pytest.mark.parametrize("blocks", [(16, 16), (32, 16)], ids=str)
@pytest.mark.parametrize("N,M", [(75, 75), (40, 54), (40, 93), (93, 40), (1, 70)])
def test_unmasked_block_split(blocks, N, M):
    """The loops split into whole, fully visible blocks (no mask) and masked ones (diagonal, last partial
    block): unequal query and key blocks, N = M, N < M (prefill after a cache), N > M (rows that see
    nothing), causal or not, with and without key padding. M - N = 14 with 16-wide blocks puts a block edge
    one position from the diagonal, where an off-by-one in the split would unmask a hidden key."""
    g = torch.Generator().manual_seed(N * 1000 + M + blocks[0])
    D = 24
    q, k, v = make_qkv(1, 2, 1, N, M, D, generator=g)
    do = torch.randn(1, 2, N, D, generator=g)
    kpm = torch.rand(1, M, generator=g) > 0.2
    kpm[:, -1] = True
    config = {"BLOCK_M": blocks[0], "BLOCK_N": blocks[1]}
    scale = 1 / math.sqrt(D)
    for causal, mask in ((True, None), (False, None), (True, kpm)):
        o, lse = attention_fwd(q, k, v, mask, causal=causal, scale=scale, config=config)
        for rule in RULES:
            grads = attention_bwd(do, q, k, v, o, lse, mask, causal=causal, scale=scale, rule=rule, config=config)
            refs = dense_reference(q, k, v, do, key_padding_mask=mask, causal=causal, rule=rule)
            assert_close_all((o, *grads), refs, TOL[torch.float32], f"causal={causal} kpm={mask is not None} {rule}")


@pytest.mark.slow
@needs_interpreter
@pytest.mark.parametrize("rule", RULES)
def test_atomic_dq_mode(rule, monkeypatch):
    """dq_mode="atomic" (dQ added by the dK/dV launch with atomics) against float64: GQA, every mask feature
    at once and none, 16-wide blocks so several key blocks add into each dQ row; also through
    ATTNLRP_FAST_DQ and af.attention."""
    g = torch.Generator().manual_seed(23)
    D = 40
    q, k, v = make_qkv(1, 4, 2, 53, 61, D, generator=g)
    do = torch.randn(1, 4, 53, D, generator=g)
    kpm = torch.rand(1, 61, generator=g) > 0.3
    scale = 1 / math.sqrt(D)
    for kw, mask in (({"causal": True, "window": 17, "softcap": 2.0}, kpm), ({}, None)):
        o, lse = attention_fwd(q, k, v, mask, scale=scale, config={"BLOCK_M": 16, "BLOCK_N": 16}, **kw)
        grads = attention_bwd(do, q, k, v, o, lse, mask, scale=scale, rule=rule, dq_mode="atomic",
                              config={"BLOCK_M": 16, "BLOCK_N": 16}, **kw)
        refs = dense_reference(q, k, v, do, key_padding_mask=mask, rule=rule, **kw)
        assert_close_all((o, *grads), refs, TOL[torch.float32], f"atomic {kw} {rule}")
    monkeypatch.setenv("ATTNLRP_FAST_DQ", "atomic")
    outs = run_attention(af.attention, q, k, v, do, causal=True, rule=rule, backend="triton")
    assert_close_all(outs, dense_reference(q, k, v, do, causal=True, rule=rule), TOL[torch.float32], "env")


def test_dq_mode_is_checked(monkeypatch):
    from attnlrp_fast.kernels.attention_bwd import dq_mode_default

    q, k, v = make_qkv(1, 2, 2, 8, 8, 16)
    o, lse = torch.zeros_like(q), torch.zeros(1, 2, 8)
    with pytest.raises(ValueError, match="dq_mode must be one of separate, atomic, got 'fast'"):
        attention_bwd(q, q, k, v, o, lse, dq_mode="fast")
    monkeypatch.setenv("ATTNLRP_FAST_DQ", "Atomic")
    assert dq_mode_default() == "atomic"
    monkeypatch.setenv("ATTNLRP_FAST_DQ", "sometimes")
    with pytest.raises(ValueError, match="ATTNLRP_FAST_DQ must be one of separate, atomic, got 'sometimes'"):
        dq_mode_default()


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_sum_exp(backend):
    from attnlrp_fast.bindings import attention_fwd_op

    g = torch.Generator().manual_seed(5)
    q, k, v = make_qkv(1, 2, 2, 30, 12, 16, generator=g)
    kpm = torch.ones(1, 12, dtype=torch.bool)
    kpm[0, 5:] = False
    _, lse = attention_fwd_op(q, k, v, kpm, True, 0.25, 0, 0.0, "grad", backend)
    _, ref = attention_dense(q.double(), k.double(), v.double(), causal=True, scale=0.25, key_padding_mask=kpm,
                             return_lse=True)
    assert lse.dtype == torch.float32
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(lse)) and (lse[~finite] == float("inf")).all()
    assert rel_err(lse[finite], ref[finite]) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_chunking_matches(backend):
    """The chunked torch path gives the same result for every chunk size (rows split across chunks)."""
    from attnlrp_fast.bindings.torch_path import attention_bwd_torch, attention_fwd_torch

    g = torch.Generator().manual_seed(8)
    q, k, v = make_qkv(1, 4, 2, 37, 50, 16, generator=g)
    do = torch.randn_like(q)
    kw = dict(causal=True, scale=0.3, window=20, softcap=2.0)
    o1, l1 = attention_fwd_torch(q, k, v, **kw, chunk=37)
    o2, l2 = attention_fwd_torch(q, k, v, **kw, chunk=5)
    assert torch.allclose(o1, o2, atol=1e-6) and torch.allclose(l1, l2, atol=1e-6)
    for rule in RULES:
        g1 = attention_bwd_torch(do, q, k, v, o1, l1, **kw, rule=rule, chunk=37)
        g2 = attention_bwd_torch(do, q, k, v, o1, l1, **kw, rule=rule, chunk=6)
        for a, b in zip(g1, g2):
            assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.slow
@needs_interpreter
@pytest.mark.parametrize("variant", ["tma", "hopper"])
@pytest.mark.parametrize("feature", ["plain", "causal", "causal_window", "causal_softcap", "padding", "everything"])
def test_descriptor_forward_variants(variant, feature):
    """The tensor-descriptor forwards (TMA; "hopper" adds the warp-specialised loop, a no-op in the interpreter,
    where it runs its single always-masked loop) against float64: fp16, HF-layout views, GQA, N and M not
    multiples of the block, head dims padded (24 -> 32, 80 -> 128)."""
    g = torch.Generator().manual_seed(zlib_seed(variant, feature))
    for D in (24, 80):
        q, k, v = make_qkv(2, 4, 2, 45, 71, D, torch.float16, layout="bnhd", generator=g)
        kw = _case(feature, 2, 71, seed=D)
        o, lse = attention_fwd(q, k, v, kw.pop("key_padding_mask", None), scale=1 / math.sqrt(D), variant=variant, **kw)
        ref, ref_lse = attention_dense(q.double(), k.double(), v.double(), return_lse=True,
                                       key_padding_mask=_case(feature, 2, 71, seed=D).get("key_padding_mask"), **kw)
        assert rel_err(o, ref) < TOL[torch.float16], f"{variant} {feature} D={D}"
        finite = torch.isfinite(ref_lse)
        assert torch.equal(finite, torch.isfinite(lse)) and rel_err(lse[finite], ref_lse[finite]) < 1e-3


def test_forward_variant_choice(monkeypatch):
    from attnlrp_fast.kernels.attention_fwd import forward_variant

    q, k, v = make_qkv(1, 2, 1, 8, 8, 16, torch.float16)
    assert forward_variant(q, k, v, variant="portable") == "portable"
    monkeypatch.setenv("ATTNLRP_FAST_FWD", "portable")
    assert forward_variant(q, k, v) == "portable"
    monkeypatch.setenv("ATTNLRP_FAST_FWD", "fastest")
    with pytest.raises(ValueError, match="one of auto, portable, tma, hopper, decode, got 'fastest'"):
        forward_variant(q, k, v)
    monkeypatch.delenv("ATTNLRP_FAST_FWD")
    if interpreting():
        assert forward_variant(q, k, v) == "portable"          # auto under the interpreter
        with pytest.raises(ValueError, match="float16 or bfloat16 inputs, not torch.float32"):
            forward_variant(q.float(), k.float(), v.float(), variant="tma")
        odd = torch.randn(1, 8, 2, 17, dtype=torch.float16)[..., :16].transpose(1, 2)   # rows 34 bytes apart
        with pytest.raises(ValueError, match="q needs a contiguous last dim and 16-byte aligned"):
            forward_variant(odd, k, v, variant="hopper")
    else:
        with pytest.raises(ValueError, match="cannot run here"):
            forward_variant(q, k, v, variant="tma")          # CPU tensors, no interpreter


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("N,M,causal,padding", [
    (45, 71, True, False),      # prefill after a cache: two key segments merged by log-sum-exp
    (45, 71, True, True),       # ... with key padding (left padding: the first rows of a row may see nothing)
    (70, 31, True, True),       # N > M: the first N - M queries see no key
    (33, 33, False, True),
    (1, 64, True, False),       # decode
])
def test_torch_path_on_fused_cpu_attention(rule, N, M, causal, padding, monkeypatch):
    """Without a window or softcap the CPU path runs on torch's fused attention: GQA, causal aligned to the end
    of the keys, key padding (a batch entry with every key padded, rows that see nothing), against float64."""
    from attnlrp_fast.bindings import sdpa, torch_path

    calls = []
    real, real_bwd = sdpa.KERNELS["cpu"]
    monkeypatch.setitem(sdpa.KERNELS, "cpu", (lambda *a, **kw: calls.append(1) or real(*a, **kw), real_bwd))
    g = torch.Generator().manual_seed(zlib_seed(rule, N, M, causal, padding))
    q, k, v = make_qkv(3, 6, 2, N, M, 16, generator=g)
    do = torch.randn(3, 6, N, 16, generator=g)
    kw = {"causal": causal}
    if padding:
        kpm = torch.rand(3, M, generator=g) > 0.3
        kpm[0, : M // 2] = False          # left padding
        kpm[1] = False                    # nothing to see at all
        kw["key_padding_mask"] = kpm
    outs = run_attention(af.attention, q, k, v, do, rule=rule, backend="torch", **kw)
    assert calls, "the fused path did not run"
    assert_close_all(outs, dense_reference(q, k, v, do, rule=rule, **kw), TOL[torch.float32], f"{rule} {N} {M}")
    if padding:
        assert (outs[0][1] == 0).all() and (outs[1][1] == 0).all()
    o, lse = torch_path.attention_fwd_torch(q, k, v, kw.get("key_padding_mask"), causal=causal, scale=0.25)
    ref_o, ref_lse = attention_dense(q.double(), k.double(), v.double(), scale=0.25, return_lse=True, **kw)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse)) and (lse[~finite] == float("inf")).all()
    assert rel_err(lse[finite], ref_lse[finite]) < 1e-6


def test_window_and_softcap_keep_the_chunked_path(monkeypatch):
    from attnlrp_fast.bindings import sdpa

    monkeypatch.setitem(sdpa.KERNELS, "cpu", (lambda *a, **kw: pytest.fail("fused path with a window"), None))
    q, k, v = make_qkv(1, 2, 1, 20, 20, 16)
    for kw in ({"window": 5}, {"softcap": 3.0}):
        outs = run_attention(af.attention, q, k, v, torch.randn_like(q), causal=True, backend="torch", **kw)
        assert torch.isfinite(outs[0]).all()
