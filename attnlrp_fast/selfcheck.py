"""Comparing the engine with the float64 oracle, written once: the relative error every check reports (tests,
`attnlrp-fast check`, the GPU spot check, af.lrp's check of each module replacement) and one attention
comparison that runs the engine and attnlrp_fast.reference on the same (rounded) inputs."""

import torch

from attnlrp_fast.bindings.attention import attention
from attnlrp_fast.reference import attention_dense

OUTPUTS = ("o", "dq", "dk", "dv")


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64; inf when out holds a non-finite value; ||out|| where ref is all zeros
    (cp's dQ and dK: anything but zeros is an error)."""
    out, ref = out.detach().double(), ref.detach().double().to(out.device)
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm()
    return ((out - ref).norm() / denom).item() if denom > 0 else out.norm().item()


def run_attention(fn, q, k, v, do, **kw):
    """Output and (dq, dk, dv) of fn(q, k, v, **kw) for the upstream gradient do (zeros where no gradient flows)."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o = fn(*leaves, **kw)
    o.backward(do)
    grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]
    return o.detach(), *grads


def dense_reference(q, k, v, do, **kw):
    """The float64 oracle's output and gradients on the same (rounded) inputs."""
    return run_attention(attention_dense, q.double(), k.double(), v.double(), do.double(), **kw)


def attention_errors(q, k, v, do, *, backend=None, **kw) -> dict:
    """{"o", "dq", "dk", "dv"} -> relative error of af.attention (the engine, `backend`) against the oracle, for the
    rule and mask arguments in kw."""
    got = run_attention(lambda *a, **k_: attention(*a, backend=backend, **k_), q, k, v, do, **kw)
    want = dense_reference(q, k, v, do, **kw)
    return {name: rel_err(a, b) for name, a, b in zip(OUTPUTS, got, want)}
