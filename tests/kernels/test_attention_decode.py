"""The split-KV decode forward (kernels/attention_decode.py) against the float64 oracle: O and LSE for N = 1, 3, 16
query rows on caches whose lengths are multiples of neither the split nor the key block, several splits, GQA and
plain heads, key padding (a batch row with every key padded: O = 0, LSE = +inf), windows, softcap, causal and not,
fp32 and fp16, head dims 64 and 80, HF-layout views; the split choice and the splits a window leaves unlaunched;
attention_fwd's routing to it; the backward after it; a tiny Llama generating through it as with SDPA; and, marked
gpu, the compiled kernel in bf16 / fp16 on 4k and 33k caches."""

import math
import zlib

import pytest
import torch

import attnlrp_fast as af
from attnlrp_fast.kernels import attention_decode as dec
from attnlrp_fast.kernels import interpreting
from attnlrp_fast.kernels.attention_decode import attention_decode, split_plan, visible_keys
from attnlrp_fast.kernels.attention_fwd import attention_fwd, forward_variant
from attnlrp_fast.reference import attention_dense
from helpers import TOL, assert_close_all, dense_reference, make_qkv, rel_err, run_attention

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
LSE_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 2e-3}


def _seed(*key):
    return zlib.crc32(repr(key).encode())


def _padding(B, M, kind, g):
    """None, or a (B, M) bool mask: "random" (each key real with probability 0.7, the last real) and "empty" (the
    same with batch row 1 padded throughout)."""
    if kind is None:
        return None
    kpm = torch.rand(B, M, generator=g) > 0.3
    kpm[:, -1] = True
    if kind == "empty":
        kpm[1] = False
    return kpm


def _check(o, lse, q, k, v, kpm, what, **kw):
    """O and LSE against the float64 oracle: O within the dtype's tolerance, LSE finite exactly where the oracle's
    is (+inf elsewhere, with O = 0 there) and close where it is finite."""
    ref, ref_lse = attention_dense(q.double(), k.double(), v.double(), key_padding_mask=kpm, return_lse=True, **kw)
    assert o.dtype == q.dtype and o.shape == q.shape and lse.dtype == torch.float32
    assert rel_err(o, ref) < TOL[q.dtype], f"{what}: O {rel_err(o, ref)}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse)) and (lse[~finite] == float("inf")).all(), what
    assert (o[~finite] == 0).all(), what
    if finite.any():
        assert rel_err(lse[finite], ref_lse[finite]) < LSE_TOL[q.dtype], f"{what}: LSE"


# id: B, H, Hkv, N, M, D, dtype, mask arguments, padding, split (keys), layout
CASES = {
    "n1_causal_gqa": (2, 8, 2, 1, 300, 64, torch.float32, {"causal": True}, None, 64, "bnhd"),
    "n3_long_cache_padded": (1, 8, 2, 3, 1111, 80, torch.float16, {"causal": True}, "random", 128, "bnhd"),
    "n16_bidirectional_mha": (2, 4, 4, 16, 37, 64, torch.float32, {}, None, 32, "bhnd"),
    "n1_one_key": (2, 8, 2, 1, 1, 64, torch.float16, {"causal": True}, None, None, "bnhd"),
    "n3_window_softcap": (2, 8, 2, 3, 300, 80, torch.float32, {"causal": True, "window": 75, "softcap": 2.5}, None,
                          32, "bhnd"),
    "n16_bidirectional_window_empty_row": (2, 8, 2, 16, 300, 64, torch.float16, {"window": 70}, "empty", 64, "bnhd"),
    "n3_softcap_empty_row": (2, 4, 4, 3, 37, 80, torch.float32, {"softcap": 3.0}, "empty", 32, "bhnd"),
    "n16_fewer_keys_than_rows": (1, 8, 2, 16, 5, 64, torch.float32, {"causal": True}, None, None, "bhnd"),
    "n1_auto_split_padded": (2, 8, 2, 1, 300, 80, torch.float16, {"causal": True, "softcap": 5.0}, "empty", None,
                             "bnhd"),
}


@needs_interpreter
@pytest.mark.parametrize("case", list(CASES))
def test_decode_matches_float64(case):
    B, H, Hkv, N, M, D, dtype, kw, padding, split, layout = CASES[case]
    g = torch.Generator().manual_seed(_seed(case))
    q, k, v = make_qkv(B, H, Hkv, N, M, D, dtype, layout=layout, generator=g)
    kpm = _padding(B, M, padding, g)
    scale = 1 / math.sqrt(D)
    o, lse = attention_decode(q, k, v, kpm, scale=scale, split=split, **kw)
    _check(o, lse, q, k, v, kpm, case, scale=scale, **kw)


@needs_interpreter
def test_several_row_blocks_and_small_tiles():
    """G * N = 64 rows in 16-row tiles (four row blocks, each its own program per split) and 16-key blocks, split
    by 48 keys (rounded up to 64): queries spread over heads and rows of several tiles, the window's edge inside a
    split."""
    g = torch.Generator().manual_seed(7)
    q, k, v = make_qkv(1, 8, 2, 8, 203, 64, generator=g)
    kw = {"causal": True, "window": 90, "scale": 0.125}
    o, lse = attention_decode(q, k, v, split=48, config={"decode": {"BLOCK_M": 16, "BLOCK_N": 16}}, **kw)
    _check(o, lse, q, k, v, None, "row blocks", **kw)


@needs_interpreter
def test_only_the_visible_splits_launch(monkeypatch):
    """With a window only the splits holding keys some row can see are launched (the grid starts at the window);
    an empty key cache launches the merge alone, which writes O = 0 and LSE = +inf."""
    grids = []
    real = dec.attention_decode_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    monkeypatch.setattr(dec, "attention_decode_kernel", Spy())
    g = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(1, 4, 2, 3, 300, 32, generator=g)
    kw = {"causal": True, "window": 50, "scale": 0.2}
    o, lse = attention_decode(q, k, v, split=32, **kw)
    first, end = visible_keys(3, 300, 50, 32)
    assert (first, end) == (224, 300) and grids == [(3, 2, 1)]   # keys 224..299: 3 splits of 32, not 10
    _check(o, lse, q, k, v, None, "window", **kw)
    grids.clear()
    o, lse = attention_decode(q, k[:, :, :0], v[:, :, :0], split=32)
    assert grids == [] and (o == 0).all() and (lse == float("inf")).all()


def test_split_choice():
    """Auto splits: a power-of-two number of key blocks per split, enough splits for 2 programs per SM (up to twice
    that); one block per split when the keys are few; whole keys split once or twice when the batch alone fills the
    GPU. A caller's split rounds up to whole blocks; bad ones are refused."""
    for keys, programs, block in ((4097, 8, 64), (33000, 24, 64), (33000, 8, 32), (1_000_000, 8, 64), (300, 2, 32)):
        split, splits = split_plan(keys, programs, block, 132)
        blocks = split // block
        assert split % block == 0 and blocks & (blocks - 1) == 0
        assert splits == -(-keys // split)
        want = -(-264 // programs)
        assert splits >= min(want, -(-keys // block)) and (blocks == 1 or splits < 2 * want + 2), (keys, split)
    assert split_plan(100, 600, 64, 132) == (64, 2)            # 600 programs per split: no need to split further
    assert split_plan(70_000, 600, 64, 132) == (65536, 2)
    assert split_plan(0, 8, 64, 132)[1] == 0
    assert split_plan(300, 8, 32, 132, split=50) == (64, 5)
    for bad in (0, -32, 1.5, True):
        with pytest.raises(ValueError, match="split .keys per split. must be a positive int"):
            split_plan(300, 8, 32, 132, split=bad)
    assert visible_keys(1, 1000, None, 64) == (0, 1000)
    assert visible_keys(4, 1000, 100, 64) == (896, 1000)       # 1000 - 4 - 100 + 1 = 897, down to a block


def test_decode_errors():
    q, k, v = make_qkv(1, 4, 2, 17, 40, 16)
    with pytest.raises(ValueError, match="at most 16 query rows per head, got N=17"):
        attention_decode(q, k, v)
    with pytest.raises(ValueError, match="decode config's BLOCK_M must be a power of two >= 16, got 24"):
        attention_decode(q[:, :, :2], k, v, config={"BLOCK_M": 24, "BLOCK_N": 32})
    with pytest.raises(ValueError, match="config keys must be kernel kinds"):
        attention_decode(q[:, :, :2], k, v, config={"decode": {"BLOCK_M": 16, "BLOCK_N": 16}, "prefill": {}})


def test_meta_tensors_allocate_and_launch_nothing():
    """On the meta device (af.estimate_memory) the launcher allocates its outputs and partials and launches nothing."""
    q, k, v = make_qkv(2, 8, 2, 1, 5000, 64, torch.float16, device="meta")
    o, lse = attention_decode(q, k, v, causal=True)
    assert o.is_meta and o.shape == q.shape and lse.shape == (2, 8, 1) and lse.dtype == torch.float32
    o, lse = attention_fwd(q, k, v, causal=True)
    assert o.is_meta and o.shape == q.shape


def test_forward_routing(monkeypatch):
    """attention_fwd's "auto" takes the decode kernel for N <= 16 against at least MIN_KEY_BLOCKS visible key blocks
    (a window counts what it leaves), never with segment_ids / key_limit or for N > 16, and not when a variant is
    asked for; variant="decode" or ATTNLRP_FAST_FWD=decode forces it and says why it cannot run; prefer="decode"
    takes it at any length."""
    block = dec.decode_config(None, 4, 16, 2)["BLOCK_N"]
    threshold = dec.MIN_KEY_BLOCKS * block
    q, k, v = make_qkv(1, 4, 2, 1, threshold, 16, torch.float16)
    short = k[:, :, 1:], v[:, :, 1:]
    assert forward_variant(q, k, v) == "decode"
    assert forward_variant(q, *short) != "decode"
    assert forward_variant(q, k, v, window=block) != "decode"           # a window leaves fewer keys to split
    assert forward_variant(q, k, v, variant="portable") == "portable"
    assert forward_variant(q, *short, prefer="decode") == "decode"
    assert forward_variant(q, k, v, segment_ids=torch.zeros(1, threshold, dtype=torch.int32)) == "portable"
    many = torch.randn(1, 4, 17, 16, dtype=torch.float16)
    assert forward_variant(many, k, v) != "decode" and forward_variant(many, k, v, prefer="decode") != "decode"
    with pytest.raises(ValueError, match="'decode' cannot run here: it takes at most 16 query rows per head"):
        forward_variant(many, k, v, variant="decode")
    with pytest.raises(ValueError, match="'decode' cannot run here: it takes no segment_ids or key_limit"):
        attention_fwd(q, k, v, causal=True, variant="decode", key_limit=torch.zeros(1, 1, dtype=torch.int64))
    monkeypatch.setenv("ATTNLRP_FAST_FWD", "decode")
    assert forward_variant(q, *short) == "decode"
    with pytest.raises(ValueError, match="at most 16 query rows"):
        attention_fwd(many, k, v)


@needs_interpreter
def test_auto_forward_runs_it(monkeypatch):
    """attention_fwd on a decode shape runs attention_decode (with the caller's config) and returns its results."""
    calls = []
    real = dec.attention_decode
    monkeypatch.setattr(dec, "attention_decode", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    g = torch.Generator().manual_seed(5)
    M = dec.MIN_KEY_BLOCKS * 32 + 9
    q, k, v = make_qkv(2, 4, 2, 2, M, 24, generator=g)
    kpm = _padding(2, M, "random", g)
    o, lse = attention_fwd(q, k, v, kpm, causal=True, scale=0.3, config={"fwd": {"BLOCK_M": 16, "BLOCK_N": 16}})
    assert len(calls) == 1 and calls[0]["config"] == {"fwd": {"BLOCK_M": 16, "BLOCK_N": 16}}
    _check(o, lse, q, k, v, kpm, "auto", causal=True, scale=0.3)


@needs_interpreter
@pytest.mark.parametrize("rule,kw,padding", [
    ("attnlrp", {"causal": True}, "empty"),
    ("attnlrp", {"window": 40, "softcap": 2.0}, "random"),
    ("grad", {"causal": True, "window": 60}, None),
])
def test_backward_after_decode(rule, kw, padding, monkeypatch):
    """af.attention (backend "triton") with the decode forward: the backward kernels read its LSE and O, and the
    gradients of the rule match the float64 oracle's."""
    calls = []
    real = dec.attention_decode
    monkeypatch.setattr(dec, "attention_decode", lambda *a, **k_: calls.append(1) or real(*a, **k_))
    monkeypatch.setenv("ATTNLRP_FAST_FWD", "decode")
    g = torch.Generator().manual_seed(_seed(rule, padding))
    B, H, Hkv, N, M, D = 2, 4, 2, 3, 100, 32
    q, k, v = make_qkv(B, H, Hkv, N, M, D, layout="bnhd", generator=g)
    do = torch.randn(B, H, N, D, generator=g)
    kpm = _padding(B, M, padding, g)
    if kpm is not None:
        kw = {**kw, "key_padding_mask": kpm}
    outs = run_attention(af.attention, q, k, v, do, rule=rule, backend="triton", **kw)
    assert calls, "the decode forward did not run"
    assert_close_all(outs, dense_reference(q, k, v, do, rule=rule, **kw), TOL[torch.float32], f"{rule} {kw}")


@pytest.mark.slow
@needs_interpreter
def test_llama_generation_through_the_decode_kernel(monkeypatch):
    """A tiny random Llama (GQA 4/2) generating greedily with attn_implementation="attnlrp_fast" on the Triton
    backend gives SDPA's tokens, for a batch with a left-padded prompt; the prompt (126 tokens) runs the flash
    forward, the steps past the decode threshold the decode kernel."""
    import transformers as tf

    from attnlrp_fast.bindings.hf import attention_modules
    from tiny_models import COMMON, VOCAB

    calls = []
    real = dec.attention_decode
    monkeypatch.setattr(dec, "attention_decode", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**{**COMMON, "max_position_embeddings": 256})).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 126), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    out = {}
    for implementation in ("sdpa", "attnlrp_fast"):
        model.set_attn_implementation(implementation)
        for module in attention_modules(model):
            module.attnlrp_fast_backend = "triton"
        with torch.no_grad():
            out[implementation] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12,
                                                 do_sample=False, pad_token_id=0)
    assert out["attnlrp_fast"].shape == (2, 138)
    assert torch.equal(out["attnlrp_fast"], out["sdpa"])
    steps = 12 - 1 - (dec.MIN_KEY_BLOCKS * 32 - 127)       # the steps that see at least 128 keys
    assert len(calls) == 2 * steps and all(shape[2] == 1 for shape in calls)   # two layers


# ---- compiled, on a GPU ---------------------------------------------------------------------------------------

@pytest.fixture
def _compiled():
    if interpreting():
        pytest.skip("GPU tests run the compiled kernels: unset TRITON_INTERPRET")


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("M", [4097, 33000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d).split(".")[-1])
def test_gpu_decode_long_cache(dtype, M, B, _compiled):
    """GQA 32/8, D = 128, HF layout, N = 1 and 4: causal, window + softcap, key padding (batch 3: a left-padded row
    and a row with nothing to see), auto and forced splits, against float64."""
    g = torch.Generator().manual_seed(_seed(dtype, M, B))
    kpm = None
    if B == 3:
        kpm = (torch.rand(B, M, generator=g) > 0.1).cuda()
        kpm[0, : M // 3] = False
        kpm[2] = False
    for N, kw, split in ((1, {"causal": True}, None), (4, {"causal": True, "window": 1500, "softcap": 30.0}, None),
                         (1, {}, 256)):
        q, k, v = make_qkv(B, 32, 8, N, M, 128, dtype, device="cuda", layout="bnhd", generator=g)
        o, lse = attention_decode(q, k, v, kpm, scale=128 ** -0.5, split=split, **kw)
        _check(o, lse, q, k, v, kpm, f"N={N} {kw} split={split}", scale=128 ** -0.5, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d).split(".")[-1])
def test_gpu_decode_routed_with_backward(dtype, monkeypatch, _compiled):
    """af.attention on a 4097-key cache takes the decode forward by itself; the AttnLRP backward after it matches
    float64."""
    calls = []
    real = dec.attention_decode
    monkeypatch.setattr(dec, "attention_decode", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    g = torch.Generator().manual_seed(11)
    q, k, v = make_qkv(1, 32, 8, 1, 4097, 128, dtype, device="cuda", layout="bnhd", generator=g)
    do = torch.randn(1, 32, 1, 128, generator=g).to("cuda", dtype)
    outs = run_attention(af.attention, q, k, v, do, causal=True, rule="attnlrp")
    assert calls
    assert_close_all(outs, dense_reference(q, k, v, do, causal=True, rule="attnlrp"), TOL[dtype], str(dtype))
