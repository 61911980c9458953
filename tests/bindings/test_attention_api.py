"""af.attention's contract: argument errors, empty rows, empty inputs, torch.compile, linear memory."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnlrp_fast as af
from attnlrp_fast.bindings import dispatch as bindings_dispatch
from attnlrp_fast.kernels import interpreting
from helpers import assert_close_all, dense_reference, make_qkv, rel_err, run_attention

BACKENDS = [pytest.param("triton", marks=pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1")),
            "torch"]


def _qkv(**kw):
    return make_qkv(2, 4, 2, 10, 12, 16, generator=torch.Generator().manual_seed(0), **kw)


@pytest.mark.parametrize(
    "change,error,words",
    [
        (lambda q, k, v, kw: (q[0], k, v, kw), ValueError, "q must have 4 dimensions"),
        (lambda q, k, v, kw: (q, k, v[:, :, :5], kw), ValueError, "k and v must have the same \\(B, Hkv, M\\)"),
        (lambda q, k, v, kw: (q[:1], k, v, kw), ValueError, "batch size"),
        (lambda q, k, v, kw: (q[..., :8], k, v, kw), ValueError, "head dim"),
        (lambda q, k, v, kw: (q[:, :3], k, v, kw), ValueError, "multiple of the number of key/value heads"),
        (lambda q, k, v, kw: (q, k.double(), v, kw), TypeError, "k has dtype torch.float64"),
        (lambda q, k, v, kw: (q.int(), k, v, kw), TypeError, "q has dtype torch.int32"),
        (lambda q, k, v, kw: (q.numpy(), k, v, kw), TypeError, "q must be a torch.Tensor"),
        (lambda q, k, v, kw: (q, k, v, {**kw, "rule": "lrp"}), ValueError, "rule must be one of"),
        (lambda q, k, v, kw: (q, k, v, {**kw, "window": 0}), ValueError, "window must be a positive int"),
        (lambda q, k, v, kw: (q, k, v, {**kw, "window": 2.5}), ValueError, "window must be a positive int"),
        (lambda q, k, v, kw: (q, k, v, {**kw, "softcap": -1.0}), ValueError, "softcap must be a positive number"),
        (lambda q, k, v, kw: (q, k, v, {**kw, "scale": float("nan")}), ValueError, "scale must be a finite number"),
        (lambda q, k, v, kw: (q, k, v, {**kw, "causal": 1}), TypeError, "causal must be a bool"),
        (lambda q, k, v, kw: (q, k, v, {**kw, "backend": "cuda"}), ValueError, "backend must be"),
        (lambda q, k, v, kw: (q, k, v, {**kw, "key_padding_mask": torch.ones(2, 12)}), TypeError,
         "key_padding_mask must have dtype torch.bool"),
        (lambda q, k, v, kw: (q, k, v, {**kw, "key_padding_mask": torch.ones(2, 10, dtype=torch.bool)}), ValueError,
         "key_padding_mask must have shape"),
        (lambda q, k, v, kw: (q, k, v, {**kw, "key_padding_mask": torch.ones(2, 12, dtype=torch.bool, device="meta")}),
         ValueError, "key_padding_mask is on meta"),
        (lambda q, k, v, kw: (q, k.to("meta"), v.to("meta"), kw), ValueError, "k is on meta"),
    ],
)
def test_bad_arguments_raise_clear_errors(change, error, words):
    q, k, v = _qkv()
    q, k, v, kw = change(q, k, v, {})
    with pytest.raises(error, match=words):
        af.attention(q, k, v, **kw)


def test_head_dim_over_kernel_limit():
    q, k, v = make_qkv(1, 1, 1, 4, 4, 320)
    if interpreting():
        with pytest.raises(ValueError, match="head dim 320 is larger than the Triton kernels support"):
            af.attention(q, k, v)
    o = af.attention(q, k, v, backend="torch")
    assert o.shape == q.shape


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(bindings_dispatch, "interpreting", lambda: False)
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        af.attention(q, k, v, backend="triton")
    with pytest.raises(TypeError, match="float64"):
        af.attention(q.double(), k.double(), v.double(), backend="triton")
    assert torch.isfinite(af.attention(q, k, v)).all()  # auto falls back to the torch path on CPU


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", ["grad", "attnlrp", "cp"])
def test_rows_without_visible_keys_are_zero(rule, backend):
    g = torch.Generator().manual_seed(1)
    q, k, v = make_qkv(2, 2, 1, 40, 15, 16, generator=g)
    kpm = torch.ones(2, 15, dtype=torch.bool)
    kpm[1] = False  # batch 1: every key is padding
    o, dq, dk, dv = run_attention(af.attention, q, k, v, torch.randn_like(q), causal=True, rule=rule,
                                  key_padding_mask=kpm, backend=backend)
    assert (o[1] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    # causal with N > M: the first N - M queries of batch 0 see nothing either
    assert (o[0, :, :25] == 0).all() and (dq[0, :, :25] == 0).all()
    assert o[0, :, 25:].abs().amin(-1).gt(0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_sequences(backend):
    q, k, v = make_qkv(1, 2, 2, 0, 5, 16)
    assert af.attention(q, k, v, backend=backend).shape == (1, 2, 0, 16)
    q, k, v = make_qkv(1, 2, 2, 3, 0, 16)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    o = af.attention(*leaves, backend=backend)
    o.sum().backward()
    assert (o == 0).all() and (leaves[0].grad == 0).all()


def test_float64_goes_through_the_torch_path(monkeypatch):
    """float64 takes the torch path (Triton has no float64 dot) whatever the device: the torch functions run, the
    Triton launchers do not, and the output is the oracle's to float64 precision."""
    from attnlrp_fast.bindings import attention as ops
    from attnlrp_fast.bindings import torch_path

    ran = []
    for name in ("attention_fwd_torch", "attention_bwd_torch"):
        real = getattr(torch_path, name)
        monkeypatch.setattr(torch_path, name, lambda *a, _real=real, _n=name, **kw: ran.append(_n) or _real(*a, **kw))
    for name in ("triton_fwd", "triton_bwd"):
        monkeypatch.setattr(ops, name, lambda *a, **kw: pytest.fail("a Triton launcher ran on float64"))
    q, k, v = (x.double() for x in _qkv())
    do = torch.randn_like(q)
    outs = run_attention(af.attention, q, k, v, do, causal=True, rule="attnlrp")
    assert outs[0].dtype == torch.float64 and ran == ["attention_fwd_torch", "attention_bwd_torch"]
    assert rel_err(outs[0], dense_reference(q, k, v, do, causal=True)[0]) < 1e-12
    # the saved log-sum-exp is fp32 on every path (the contract), so the gradients carry fp32's 1e-7
    assert_close_all(outs, dense_reference(q, k, v, do, causal=True, rule="attnlrp"), 1e-6, "float64")


@pytest.mark.parametrize("rule", ["grad", "attnlrp"])
def test_torch_compile_traces_the_op(rule):
    """fullgraph=True fails on any graph break; the fake implementations make the op traceable."""
    q, k, v = _qkv()
    kpm = torch.ones(2, 12, dtype=torch.bool)

    def f(q, k, v):
        return (af.attention(q, k, v, causal=True, rule=rule, key_padding_mask=kpm) * 2).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    compiled(*leaves).backward()
    ref = [x.clone().requires_grad_() for x in (q, k, v)]
    f(*ref).backward()
    for a, b in zip(leaves, ref):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_torch_path_memory_is_linear_at_16k():
    """At N = M = 16k no op of the CPU path (forward and every rule's backward) makes an N x N tensor."""
    N, D = 16384, 16
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 1, 1, N, N, D))
    mode = _LargestAllocation()
    with mode:
        o = af.attention(q, k, v, causal=True, rule="attnlrp", backend="torch")
        o.backward(torch.ones_like(o))
    assert torch.isfinite(q.grad).all()
    assert mode.largest <= N * N // 16, f"an op allocated {mode.largest} elements (N*N = {N * N})"
