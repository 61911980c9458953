"""The attention checks on a CUDA device, compiled kernels (no interpreter), bf16 included.
Run with: TRITON_INTERPRET=0 python -m pytest tests -m gpu"""

import pytest
import torch

import attnlrp_fast as af
from attnlrp_fast.reference import attention_dense
from helpers import TOL, assert_close_all, dense_reference, make_qkv, rel_err, run_attention

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
FEATURES = {
    "plain": {},
    "causal": {"causal": True},
    "window_softcap": {"causal": True, "window": 257, "softcap": 30.0},
    "padding": {"padding": True},
}


@pytest.fixture(autouse=True)
def _not_interpreting():
    from attnlrp_fast.kernels import interpreting

    if interpreting():
        pytest.skip("GPU tests run the compiled kernels: unset TRITON_INTERPRET")


@pytest.mark.parametrize("D", [64, 128, 80])
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("rule", ["grad", "attnlrp", "cp"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_gpu_matches_float64(dtype, rule, feature, D):
    g = torch.Generator().manual_seed(D)
    B, H, Hkv, N, M = 2, 8, 2, 1000, 1037
    q, k, v = make_qkv(B, H, Hkv, N, M, D, dtype, device="cuda", layout="bnhd", generator=g)
    do = torch.randn(B, H, N, D, generator=g).to("cuda", dtype)
    kw = dict(FEATURES[feature])
    if kw.pop("padding", False):
        kw["key_padding_mask"] = (torch.rand(B, M, generator=g) > 0.2).cuda()
    outs = run_attention(af.attention, q, k, v, do, rule=rule, **kw)
    refs = dense_reference(q, k, v, do, rule=rule, **kw)
    assert_close_all(outs, refs, TOL[dtype], f"{dtype}/{rule}/{feature}/D={D}")


@pytest.mark.parametrize("D", [16, 32, 96, 256])
def test_gpu_head_dims(D):
    q, k, v = make_qkv(1, 4, 4, 300, 300, D, torch.bfloat16, device="cuda")
    do = torch.randn_like(q)
    outs = run_attention(af.attention, q, k, v, do, causal=True, rule="attnlrp")
    assert_close_all(outs, dense_reference(q, k, v, do, causal=True, rule="attnlrp"), TOL[torch.bfloat16], f"D={D}")


@pytest.mark.parametrize("N,M", [(1, 4097), (64, 4000), (4096, 4096)])
def test_gpu_decode_prefill_long(N, M):
    q, k, v = make_qkv(1, 32, 8, N, M, 128, torch.bfloat16, device="cuda")
    do = torch.randn_like(q)
    outs = run_attention(af.attention, q, k, v, do, causal=True, rule="grad")
    assert_close_all(outs, dense_reference(q, k, v, do, causal=True, rule="grad"), TOL[torch.bfloat16], f"{N}/{M}")


def test_gpu_agrees_with_sdpa():
    """Same precision baseline: torch SDPA's output and gradients in bf16."""
    q, k, v = make_qkv(2, 8, 8, 2048, 2048, 128, torch.bfloat16, device="cuda")
    do = torch.randn_like(q)
    ours = run_attention(af.attention, q, k, v, do, causal=True)
    sdpa = run_attention(lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(a, b, c, is_causal=True),
                         q, k, v, do)
    for a, b in zip(ours, sdpa):
        assert rel_err(a, b) < 2e-2


@pytest.mark.parametrize("feature", ["causal", "window_softcap", "padding"])
@pytest.mark.parametrize("rule", ["grad", "attnlrp"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=lambda d: str(d).split(".")[-1])
def test_gpu_atomic_dq_matches_float64(dtype, rule, feature, monkeypatch):
    """ATTNLRP_FAST_DQ=atomic: dQ summed by fp32 atomics in the dK/dV launch, GQA, D = 128."""
    monkeypatch.setenv("ATTNLRP_FAST_DQ", "atomic")
    g = torch.Generator().manual_seed(5)
    B, H, Hkv, N, M = 2, 8, 2, 1000, 1037
    q, k, v = make_qkv(B, H, Hkv, N, M, 128, dtype, device="cuda", layout="bnhd", generator=g)
    do = torch.randn(B, H, N, 128, generator=g).to("cuda", dtype)
    kw = dict(FEATURES[feature])
    if kw.pop("padding", False):
        kw["key_padding_mask"] = (torch.rand(B, M, generator=g) > 0.2).cuda()
    outs = run_attention(af.attention, q, k, v, do, rule=rule, **kw)
    assert_close_all(outs, dense_reference(q, k, v, do, rule=rule, **kw), TOL[dtype], f"atomic {rule}/{feature}")


def test_gpu_deterministic(monkeypatch):
    """The default dQ mode has no atomics: two backward passes give bit-identical gradients."""
    monkeypatch.setenv("ATTNLRP_FAST_DQ", "separate")
    q, k, v = make_qkv(1, 16, 4, 1500, 1500, 128, torch.bfloat16, device="cuda")
    do = torch.randn_like(q)
    first = run_attention(af.attention, q, k, v, do, causal=True, rule="attnlrp")
    second = run_attention(af.attention, q, k, v, do, causal=True, rule="attnlrp")
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_gpu_fully_masked_rows():
    q, k, v = make_qkv(2, 4, 4, 200, 100, 64, torch.float16, device="cuda")
    kpm = torch.ones(2, 100, dtype=torch.bool, device="cuda")
    kpm[1] = False
    o, dq, dk, dv = run_attention(af.attention, q, k, v, torch.randn_like(q), causal=True, key_padding_mask=kpm)
    assert (o[1] == 0).all() and (dq[1] == 0).all() and (o[0, :, :100] == 0).all()
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_second_device():
    """Layers of a device_map="auto" model live on several GPUs: the kernels launch on their tensors' device even
    when another one is current."""
    torch.cuda.set_device(0)
    q, k, v = make_qkv(2, 8, 2, 700, 700, 128, torch.bfloat16, device="cuda:1")
    do = torch.randn_like(q)
    outs = run_attention(af.attention, q, k, v, do, causal=True, rule="attnlrp")
    assert all(x.device == torch.device("cuda", 1) for x in outs)
    assert_close_all(outs, dense_reference(q, k, v, do, causal=True, rule="attnlrp"), TOL[torch.bfloat16], "cuda:1")


@pytest.mark.parametrize("D", [64, 128, 80])
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("variant", ["portable", "tma", "hopper"])
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bfloat16"])
def test_gpu_forward_variants(dtype, variant, feature, D):
    """Each forward kernel (pointer loads; TMA descriptors; TMA with the warp-specialised loop) against float64,
    HF-layout views, GQA, N and M not multiples of the block; a variant this machine cannot run is skipped with
    its reason (e.g. the warp-specialised loop needs Triton 3.6 and takes no key padding)."""
    from attnlrp_fast.kernels.attention_fwd import attention_fwd, descriptor_path_unsupported

    g = torch.Generator().manual_seed(D + 7)
    B, H, Hkv, N, M = 2, 8, 2, 1000, 1037
    q, k, v = make_qkv(B, H, Hkv, N, M, D, dtype, device="cuda", layout="bnhd", generator=g)
    kw = dict(FEATURES[feature])
    kpm = (torch.rand(B, M, generator=g) > 0.2).cuda() if kw.pop("padding", False) else None
    if variant != "portable":
        reason = descriptor_path_unsupported(q, k, v, kpm, warp_specialize=variant == "hopper")
        if reason:
            pytest.skip(reason)
    o, lse = attention_fwd(q, k, v, kpm, scale=D ** -0.5, variant=variant, **kw)
    ref = attention_dense(q.double(), k.double(), v.double(), key_padding_mask=kpm, **kw)
    assert rel_err(o, ref) < TOL[dtype], f"{variant}/{feature}/D={D}"


@pytest.mark.parametrize("variant", ["rel_bias", "sinks", "v_dim"])
@pytest.mark.parametrize("rule", ["grad", "attnlrp"])
def test_gpu_attention_variants(variant, rule):
    """T5/ALiBi-style relative bias (compiled Triton kernels), attention sinks and a value head dim of its own
    (MLA), bf16 against the float64 oracle."""
    g = torch.Generator().manual_seed(7)
    B, H, Hkv, N, M, D = 2, 8, 2, 700, 731, 64
    Dv = 32 if variant == "v_dim" else D
    q, k, v = make_qkv(B, H, Hkv, N, M, D, torch.bfloat16, device="cuda", layout="bnhd", generator=g)
    if variant == "v_dim":
        v = torch.randn(B, Hkv, M, Dv, generator=g).to("cuda", torch.bfloat16)
    kw = {"causal": True, "key_padding_mask": (torch.rand(B, M, generator=g) > 0.2).cuda()}
    if variant == "rel_bias":
        kw["rel_bias"] = (torch.randn(H, N + M - 1, generator=g) * 2).cuda()
    if variant == "sinks":
        kw["sinks"] = torch.randn(H, generator=g).cuda()
    do = torch.randn(B, H, N, Dv, generator=g).to("cuda", torch.bfloat16)
    outs = run_attention(af.attention, q, k, v, do, rule=rule, **kw)
    refs = dense_reference(q, k, v, do, rule=rule, **{k_: (t.double() if k_ in ("rel_bias", "sinks") else t)
                                                      for k_, t in kw.items()})
    assert_close_all(outs, refs, TOL[torch.bfloat16], f"{variant}/{rule}")
