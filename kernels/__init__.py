"""Triton kernels (installed as attnlrp_fast.kernels): launchers only, no autograd, no HF."""

from .attention_bwd import attention_bwd
from .attention_common import RULE_IDS, interpreting
from .attention_fwd import attention_fwd

__all__ = ["attention_fwd", "attention_bwd", "interpreting", "RULE_IDS"]
