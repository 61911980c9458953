"""torch.library custom ops for attention: forward, backward per rule, autograd, backend dispatch.

  attnlrp_fast::attention_fwd(q, k, v, kpm?, causal, scale, window, softcap, rule, backend) -> (o, lse)
  attnlrp_fast::attention_bwd(do, q, k, v, o, lse, kpm?, causal, scale, window, softcap, rule, backend)
      -> (dq, dk, dv)

`window` 0 and `softcap` 0.0 mean "none" (the schema has no optional scalars). The forward is the same
for every rule; the rule only picks the backward. Both ops have fake implementations, so torch.compile
traces through them without graph breaks.

Dispatch ("auto"): CUDA tensors -> Triton kernels; CPU tensors -> the chunked torch path, or the
Triton kernels in the interpreter when TRITON_INTERPRET=1 was set before import. float64 always takes
the torch path (Triton has no float64 tensor-core dot). "triton" / "torch" force one side.
"""

from typing import Optional

import torch

from attnlrp_fast import reference
from attnlrp_fast.kernels import attention_bwd as triton_bwd
from attnlrp_fast.kernels import attention_fwd as triton_fwd
from attnlrp_fast.kernels import interpreting

BACKENDS = ("auto", "triton", "torch")


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors on `device`: CUDA, or any device under TRITON_INTERPRET=1."""
    return device.type == "cuda" or interpreting()


def uses_triton(device: torch.device, dtype: torch.dtype, backend: str) -> bool:
    """Whether `backend` means the Triton kernels for tensors on `device` of `dtype`."""
    if backend == "torch":
        return False
    if backend == "triton":
        if dtype == torch.float64:
            raise TypeError("backend='triton' does not take float64 tensors; use backend='torch' for float64")
        if not triton_runs_on(device):
            raise RuntimeError(
                f"backend='triton' on {device.type} tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
                "before importing attnlrp_fast (or use backend='torch' / move the tensors to CUDA)")
        return True
    if dtype == torch.float64:
        return False
    return triton_runs_on(device)


def _opt(window: int, softcap: float):
    return (window if window > 0 else None), (softcap if softcap > 0 else None)


@torch.library.custom_op("attnlrp_fast::attention_fwd", mutates_args=())
def attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                     causal: bool, scale: float, window: int, softcap: float, rule: str,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    win, cap = _opt(window, softcap)
    fwd = triton_fwd if uses_triton(q.device, q.dtype, backend) else reference.attention_fwd_torch
    return fwd(q, k, v, key_padding_mask, causal=causal, scale=scale, window=win, softcap=cap)


@attention_fwd_op.register_fake
def _(q, k, v, key_padding_mask, causal, scale, window, softcap, rule, backend):
    B, H, N, D = q.shape
    return q.new_empty((B, H, N, D)), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("attnlrp_fast::attention_bwd", mutates_args=())
def attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                     lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor], causal: bool, scale: float,
                     window: int, softcap: float, rule: str,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    win, cap = _opt(window, softcap)
    bwd = triton_bwd if uses_triton(q.device, q.dtype, backend) else reference.attention_bwd_torch
    return bwd(do, q, k, v, o, lse, key_padding_mask, causal=causal, scale=scale, window=win, softcap=cap,
               rule=rule)


@attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, key_padding_mask, causal, scale, window, softcap, rule, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, causal, scale, window, softcap, rule, backend = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, key_padding_mask)
    ctx.options = (causal, scale, window, softcap, rule, backend)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = attention_bwd_op(do, q, k, v, o, lse, key_padding_mask, *ctx.options)
    return dq, dk, dv, None, None, None, None, None, None, None


torch.library.register_autograd("attnlrp_fast::attention_fwd", _backward, setup_context=_setup_context)
