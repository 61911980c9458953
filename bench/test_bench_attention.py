"""pytest-benchmark suites: the attention engine against torch SDPA, the LXT-style approach and eager attention,
forward and forward+backward per rule, and one explanation of a Llama-shaped model against the LXT-style baseline.

    python -m pytest bench/test_bench_attention.py --benchmark-json=bench/results/pytest-benchmark.json  # on a GPU
    python -m pytest bench/test_bench_attention.py --benchmark-disable -q   # CPU: tiny sizes, each runs once

On CUDA the shapes are bf16, B*N = 16k tokens, H = 2048 / D; on CPU they are tiny fp32 ones on the torch path
(the suite is then a check that every benchmark runs, not a measurement). bench/gpu_check.py records the same
comparison with TFLOP/s and peak memory into one JSON.
"""


import pytest
import torch

from attnlrp_fast.baselines import lxt_style

if __package__:   # imported as bench.<module> (the tests)
    from . import e2e, gpu_check
else:             # run as a script (python bench/<module>.py): its folder is sys.path[0]
    import e2e
    import gpu_check

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
SHAPES = ([(16384 // n, 2048 // d, n, d) for d in (64, 128) for n in (1024, 4096, 16384)] if CUDA
          else [(1, 2, 96, 32)])
METHODS = gpu_check.methods(smoke=not CUDA, backend=None if CUDA else "torch")


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _inputs(B, H, N, D):
    g = torch.Generator().manual_seed(N + D)
    return [torch.randn(B, H, N, D, generator=g).to(DEVICE, DTYPE) for _ in range(3)]


def _skip_if_too_big(method, N):
    if method.startswith(("eager", "lxt_style[eager")) and N > 8192:
        pytest.skip("the N x N baselines stop at 8k in this suite (bench/gpu_check.py goes until they run out of memory)")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-H{s[1]}-N{s[2]}-D{s[3]}")
@pytest.mark.parametrize("method", list(METHODS))
def test_forward(benchmark, method, shape, causal, monkeypatch):
    _skip_if_too_big(method, shape[2])
    if "dq=atomic" in method:
        pytest.skip("the dQ mode changes the backward only")
    m = METHODS[method]
    q, k, v = _inputs(*shape)
    benchmark.group = f"forward {shape} causal={causal}"

    def run():
        with torch.no_grad():
            out = m.fn(q, k, v, causal)
        _sync()
        return out

    for name, value in m.env.items():   # e.g. the forward kernel
        monkeypatch.setenv(name, value)
    out = benchmark(run)
    assert out.shape == q.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-H{s[1]}-N{s[2]}-D{s[3]}")
@pytest.mark.parametrize("method", list(METHODS))
def test_forward_backward(benchmark, method, shape, causal, monkeypatch):
    _skip_if_too_big(method, shape[2])
    m = METHODS[method]
    if m.fwd_only:
        pytest.skip("a forward-only variant")
    for name, value in m.env.items():  # e.g. the backward's dQ mode
        monkeypatch.setenv(name, value)
    leaves = [x.requires_grad_() for x in _inputs(*shape)]
    do = torch.randn_like(leaves[0])
    benchmark.group = f"forward+backward ({m.rule} rule) {shape} causal={causal}"

    def run():
        for x in leaves:
            x.grad = None
        m.fn(*leaves, causal).backward(do)
        _sync()

    benchmark(run)
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in leaves)


@pytest.fixture(scope="module")
def llama():
    shape, n = ("llama3-8b", 8192) if CUDA else ("tiny", 64)
    model = e2e.build(shape, torch.device(DEVICE), DTYPE, max_positions=n)
    return model, e2e._shallow_patch_copy(model), n


@pytest.mark.parametrize("method", ["forward", "attnlrp_fast", "lxt_style"])
def test_explanation(benchmark, llama, method):
    model, baseline, n = llama
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    benchmark.group = f"one explanation, {n} tokens"
    rel, _, _ = benchmark.pedantic(e2e.run_once, args=(method, model, baseline, ids, None if CUDA else "torch"),
                                   rounds=3 if CUDA else 1, warmup_rounds=1 if CUDA else 0)
    if method != "forward":
        assert rel.shape == ids.shape and torch.isfinite(rel).all()
    assert lxt_style.NAME in baseline.config._attn_implementation
