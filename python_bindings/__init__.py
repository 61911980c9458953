"""The torch face of the kernels (installed as attnlrp_fast.bindings): custom ops, autograd, dispatch."""

from .attention import BACKENDS, attention_bwd_op, attention_fwd_op, uses_triton

__all__ = ["BACKENDS", "attention_fwd_op", "attention_bwd_op", "uses_triton"]
