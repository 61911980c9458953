"""Shared pieces of the attention tests: inputs, running a backend, the float64 oracle, errors."""

import torch

from attnlrp_fast.reference import attention_dense

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64; the absolute norm of out where ref is all zeros."""
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite values in the output"
    denom = ref.norm()
    return ((out - ref).norm() / denom).item() if denom > 0 else out.norm().item()


def make_qkv(B, H, Hkv, N, M, D, dtype=torch.float32, device="cpu", layout="bhnd", generator=None):
    """Fresh random q, k, v. layout "bnhd" gives the (B, N, H, D).transpose(1, 2) views HF passes."""
    def one(h, n):
        if layout == "bnhd":
            return torch.randn(B, n, h, D, generator=generator).to(device=device, dtype=dtype).transpose(1, 2)
        return torch.randn(B, h, n, D, generator=generator).to(device=device, dtype=dtype)

    return one(H, N), one(Hkv, M), one(Hkv, M)


def run_attention(fn, q, k, v, do, **kw):
    """Output and (dq, dk, dv) of fn(q, k, v, **kw) for upstream gradient do."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o = fn(*leaves, **kw)
    o.backward(do)
    grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]
    return o.detach(), *grads


def dense_reference(q, k, v, do, **kw):
    """The float64 materialised reference on the same (rounded) inputs."""
    return run_attention(attention_dense, q.double(), k.double(), v.double(), do.double(), **kw)


def assert_close_all(outs, refs, tol, what=""):
    names = ("o", "dq", "dk", "dv")
    errs = {n: rel_err(a, b) for n, a, b in zip(names, outs, refs)}
    bad = {n: e for n, e in errs.items() if not e < tol}
    assert not bad, f"{what}: relative errors over {tol}: {bad}"
