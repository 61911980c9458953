"""Segment ids (packed sequences) and per-query key limits (image blocks that see ahead), Triton kernels (interpreter
on CPU) and the torch path, against the float64 oracle, for every rule: lengths off the block sizes, GQA 4/2,
queries after a cache, blocks that straddle segment and image-block edges, rows that see nothing, both dQ modes,
argument errors and the custom op's fake implementation."""

import math
import zlib

import pytest
import torch

import attnlrp_fast as af
from attnlrp_fast.bindings.attention import attention_fwd_op, segment_ids_from_cu_seqlens
from attnlrp_fast.kernels import interpreting
from attnlrp_fast.kernels.attention_bwd import attention_bwd
from attnlrp_fast.kernels.attention_fwd import attention_fwd, forward_variant
from attnlrp_fast.reference import attention_dense
from helpers import TOL, assert_close_all, dense_reference, make_qkv, rel_err, run_attention

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
BACKENDS = [pytest.param("triton", marks=needs_interpreter), "torch"]
RULES = ["grad", "attnlrp", "cp"]


def _seed(*key):
    return zlib.crc32(repr(key).encode())


def segments(B, M, cuts, g):
    """(B, M) int64 ids: batch 0 cut at `cuts` (ids 0, 1, ...), batch 1 cut at random places, ids shuffled
    (ids need not be ordered or contiguous numbers)."""
    ids = torch.zeros(B, M, dtype=torch.int64)
    for c in cuts:
        ids[0, c:] += 1
    for c in sorted(torch.randint(1, M, (3,), generator=g).tolist()):
        ids[1:, c:] += 1
    return ids * 7 - 3


def image_limits(B, N, M, blocks):
    """key_limit (B, N): causal (i + M - N) except inside the image blocks [a, b) of key positions, where a query
    sees every key up to b - 1 (Gemma 3); batch 1 has the blocks moved by 5."""
    pos = torch.arange(N) + (M - N)
    lim = pos.expand(B, N).clone()
    for bi in range(B):
        for a, b in blocks:
            a, b = a + 5 * bi, min(b + 5 * bi, M)
            inside = (pos >= a) & (pos < b)
            lim[bi, inside] = b - 1
    return lim


def _check(q, k, v, do, backend, rules=RULES, **kw):
    for rule in rules:
        outs = run_attention(af.attention, q, k, v, do, rule=rule, backend=backend, **kw)
        refs = dense_reference(q, k, v, do, rule=rule, **kw)
        assert_close_all(outs, refs, TOL[q.dtype], f"{sorted(kw)} {rule} {backend}")


SEGMENT_CASES = {
    # N = M, query blocks straddle segment edges (20, 50 are not multiples of 16 or 32), bidirectional
    "straddle": dict(N=77, M=77, cuts=(20, 50), kw={}),
    # queries after a cache (N < M, causal), segment edge in the cache and one among the queries, key padding
    "cache_causal_padding": dict(N=45, M=77, cuts=(11, 53), kw={"causal": True, "padding": True}),
    # every other feature at once, longer
    "window_softcap": dict(N=130, M=130, cuts=(40, 97), kw={"causal": True, "window": 29, "softcap": 2.5}),
}


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(SEGMENT_CASES))
def test_segments_match_reference(case, backend):
    c = SEGMENT_CASES[case]
    g = torch.Generator().manual_seed(_seed(case))
    B, N, M, D = 2, c["N"], c["M"], 16
    q, k, v = make_qkv(B, 4, 2, N, M, D, generator=g)
    do = torch.randn(B, 4, N, D, generator=g)
    kw = dict(c["kw"], segment_ids=segments(B, M, c["cuts"], g))
    if kw.pop("padding", False):
        kw["key_padding_mask"] = torch.rand(B, M, generator=g) > 0.2
    _check(q, k, v, do, backend, **kw)


KEY_LIMIT_CASES = {
    # image blocks [25, 45) and [60, 71): across the 32-key block edge and the 64 one
    "images": dict(N=77, M=77, blocks=[(25, 45), (60, 71)], kw={}),
    # queries after a cache, an image block that starts in the cache, with segments and key padding
    "cache_segments_padding": dict(N=50, M=83, blocks=[(30, 47), (62, 75)],
                                   kw={"segments": (40,), "padding": True}),
    # window and softcap
    "window_softcap": dict(N=99, M=99, blocks=[(10, 40), (70, 98)], kw={"window": 33, "softcap": 3.0}),
}


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(KEY_LIMIT_CASES))
def test_key_limit_matches_reference(case, backend):
    c = KEY_LIMIT_CASES[case]
    g = torch.Generator().manual_seed(_seed(case))
    B, N, M, D = 2, c["N"], c["M"], 16
    q, k, v = make_qkv(B, 4, 2, N, M, D, generator=g)
    do = torch.randn(B, 4, N, D, generator=g)
    kw = dict(c["kw"], causal=True, key_limit=image_limits(B, N, M, c["blocks"]))
    if "segments" in kw:
        kw["segment_ids"] = segments(B, M, kw.pop("segments"), g).int()
    if kw.pop("padding", False):
        kw["key_padding_mask"] = torch.rand(B, M, generator=g) > 0.2
    _check(q, k, v, do, backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_forward(backend):
    g = torch.Generator().manual_seed(5)
    B, N, M, D = 2, 70, 93, 32
    q, k, v = make_qkv(B, 4, 2, N, M, D, torch.float16, generator=g)
    seg = segments(B, M, (30, 61), g)
    for kw in ({"segment_ids": seg}, {"causal": True, "key_limit": image_limits(B, N, M, [(40, 66)]),
                                      "segment_ids": seg, "softcap": 4.0}):
        o = af.attention(q, k, v, backend=backend, **kw)
        ref = attention_dense(q.double(), k.double(), v.double(), **kw)
        assert o.dtype == torch.float16 and rel_err(o, ref) < TOL[torch.float16], f"{sorted(kw)}"


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_that_see_nothing(backend):
    """A segment whose keys are all padded, and left padding under key limits: those rows output 0 and get zero
    gradients (dQ; their keys' dK, dV get nothing from them)."""
    g = torch.Generator().manual_seed(9)
    B, N, M, D = 2, 77, 77, 16
    q, k, v = make_qkv(B, 4, 2, N, M, D, generator=g)
    do = torch.randn(B, 4, N, D, generator=g)
    seg = segments(B, M, (20, 50), g)
    kpm = torch.ones(B, M, dtype=torch.bool)
    kpm[0, 20:50] = False                       # segment 1 of batch 0: no real key
    lim = image_limits(B, N, M, [(30, 45)])
    left = torch.ones(B, M, dtype=torch.bool)
    left[:, :12] = False                        # left padding: causal rows 0..11 see nothing
    for kw, rows in (({"segment_ids": seg, "key_padding_mask": kpm}, (0, slice(20, 50))),
                     ({"causal": True, "key_limit": lim, "key_padding_mask": left}, (slice(None), slice(0, 12)))):
        for rule in ("attnlrp",):
            outs = run_attention(af.attention, q, k, v, do, rule=rule, backend=backend, **kw)
            o, dq = outs[0], outs[1]
            b, r = rows
            assert (o[b, :, r] == 0).all() and (dq[b, :, r] == 0).all(), f"{sorted(kw)} {rule}"
            assert_close_all(outs, dense_reference(q, k, v, do, rule=rule, **kw), TOL[torch.float32], rule)


@pytest.mark.slow
@needs_interpreter
@pytest.mark.parametrize("blocks,dq_mode", [((16, 16), "separate"), ((16, 16), "atomic"), ((32, 16), "separate")],
                         ids=str)
def test_kernels_small_blocks_both_dq_modes(blocks, dq_mode):
    """The kernels' loop bounds with many blocks per row and column: image blocks crossing 16-wide block edges
    (the forward's and dQ's in-kernel key bound, the dK/dV query bound from the host table), a limit past M
    (clamped), segments, N < M, every rule, separate and atomic dQ."""
    g = torch.Generator().manual_seed(_seed(blocks, dq_mode))
    B, N, M, D = 2, 53, 61, 16
    q, k, v = make_qkv(B, 4, 2, N, M, D, generator=g)
    do = torch.randn(B, 4, N, D, generator=g)
    lim = image_limits(B, N, M, [(13, 35), (50, 58)])
    lim[1, -3:] = 10**6                          # sees every key: clamped to M - 1
    cases = ({"causal": True, "key_limit": lim},
             {"segment_ids": segments(B, M, (17, 40), g), "causal": True, "key_limit": lim, "window": 19})
    config = {"BLOCK_M": blocks[0], "BLOCK_N": blocks[1]}
    scale = 1 / math.sqrt(D)
    for kw in cases:
        o, lse = attention_fwd(q, k, v, None, scale=scale, config=config, **kw)
        for rule in RULES:
            grads = attention_bwd(do, q, k, v, o, lse, None, scale=scale, rule=rule, config=config, dq_mode=dq_mode,
                                  **kw)
            refs = dense_reference(q, k, v, do, rule=rule, **kw)
            assert_close_all((o, *grads), refs, TOL[torch.float32], f"{sorted(kw)} {rule}")


@needs_interpreter
def test_atomic_dq_through_the_environment(monkeypatch):
    monkeypatch.setenv("ATTNLRP_FAST_DQ", "atomic")
    g = torch.Generator().manual_seed(12)
    B, N, M, D = 2, 40, 66, 16
    q, k, v = make_qkv(B, 4, 2, N, M, D, generator=g)
    do = torch.randn(B, 4, N, D, generator=g)
    kw = {"segment_ids": segments(B, M, (30, 47), g), "causal": True, "key_limit": image_limits(B, N, M, [(44, 60)])}
    _check(q, k, v, do, "triton", rules=("attnlrp",), **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_varlen_equals_separate_sequences(backend):
    """Packed sequences with segment_ids_from_cu_seqlens give each sequence's own causal attention."""
    cu = torch.tensor([0, 20, 33, 70], dtype=torch.int32)
    ids = segment_ids_from_cu_seqlens(cu, 75)
    assert ids.shape == (1, 75) and ids.dtype == torch.int32
    assert ids[0].tolist() == [0] * 20 + [1] * 13 + [2] * 37 + [3] * 5
    g = torch.Generator().manual_seed(2)
    q, k, v = make_qkv(1, 4, 2, 75, 75, 16, generator=g)
    do = torch.randn_like(q)
    packed = run_attention(af.attention, q, k, v, do, causal=True, rule="attnlrp", segment_ids=ids, backend=backend)
    for a, b in zip(cu[:-1].tolist() + [70], cu[1:].tolist() + [75]):
        alone = run_attention(af.attention, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], do[:, :, a:b], causal=True,
                              rule="attnlrp", backend="torch")
        for x, y in zip(packed, alone):
            assert rel_err(x[:, :, a:b], y) < TOL[torch.float32], (a, b)


def test_segments_and_key_limits_leave_the_fused_path(monkeypatch):
    from attnlrp_fast.bindings import sdpa, torch_path

    monkeypatch.setitem(sdpa.KERNELS, "cpu", (lambda *a, **kw: pytest.fail("fused path with segments"), None))
    q, k, v = make_qkv(1, 2, 1, 20, 20, 16)
    ids = torch.zeros(1, 20, dtype=torch.int64)
    lim = torch.arange(20)[None]
    do = torch.randn_like(q)
    for kw in ({"segment_ids": ids}, {"causal": True, "key_limit": lim}):
        assert not torch_path.fused(q, k, segment_ids=kw.get("segment_ids"), key_limit=kw.get("key_limit"))
        outs = run_attention(af.attention, q, k, v, do, backend="torch", **kw)
        assert_close_all(outs, dense_reference(q, k, v, do, **kw), TOL[torch.float32], f"{sorted(kw)}")


def test_argument_errors():
    q, k, v = make_qkv(2, 4, 2, 6, 9, 16)
    ids = torch.zeros(2, 9, dtype=torch.int64)
    lim = torch.arange(6).expand(2, 6) + 3
    bad = [
        (TypeError, "segment_ids must have dtype torch.int32 or torch.int64", {"segment_ids": ids.float()}),
        (TypeError, "segment_ids must be an int32 or int64 tensor", {"segment_ids": [0] * 9}),
        (ValueError, r"segment_ids must have shape \(B, M\) = \(2, 9\)", {"segment_ids": ids[:, :6]}),
        (ValueError, "segment_ids is on meta", {"segment_ids": ids.to("meta")}),
        (TypeError, "key_limit must have dtype torch.int32 or torch.int64", {"causal": True, "key_limit": lim > 0}),
        (ValueError, r"key_limit must have shape \(B, N\) = \(2, 6\)", {"causal": True, "key_limit": lim.T}),
        (ValueError, "key_limit is on meta", {"causal": True, "key_limit": lim.to("meta")}),
        (ValueError, "key_limit replaces the causal bound: it needs causal=True", {"key_limit": lim}),
    ]
    for exc, match, kw in bad:
        with pytest.raises(exc, match=match):
            af.attention(q, k, v, **kw)
    with pytest.raises(ValueError, match="segment_ids needs N <= M"):
        af.attention(k, q[:, :2], q[:, :2], segment_ids=torch.zeros(2, 6, dtype=torch.int32))
    with pytest.raises(ValueError, match="takes no segment_ids or key_limit"):
        forward_variant(q.half(), k.half(), v.half(), variant="tma", segment_ids=ids)
    assert forward_variant(q.half(), k.half(), v.half(), variant="auto", key_limit=lim) == "portable"
    with pytest.raises(TypeError, match="cu_seqlens must be an int32 or int64 tensor"):
        segment_ids_from_cu_seqlens(torch.tensor([0.0, 3.0]), 3)
    with pytest.raises(ValueError, match=r"cu_seqlens must have shape \(S \+ 1,\)"):
        segment_ids_from_cu_seqlens(torch.zeros(2, 2, dtype=torch.int32), 3)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_with_segments_and_key_limit(backend):
    """Fake implementation, schema, autograd registration and AOT dispatch of the forward op with the new
    arguments (positional after backend), on HF-layout strides."""
    g = torch.Generator().manual_seed(4)
    B, H, Hkv, N, D = 2, 4, 2, 13, 16
    q = torch.randn(B, N, H, D, generator=g).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(B, N, Hkv, D, generator=g).transpose(1, 2).requires_grad_() for _ in range(2))
    ids = torch.tensor([[0] * 5 + [1] * 8, [2] * 9 + [0] * 4])
    lim = image_limits(B, N, N, [(3, 8)])
    torch.library.opcheck(attention_fwd_op, (q, k, v, None, True, 0.25, 0, 0.0, "attnlrp", backend, ids, lim))
