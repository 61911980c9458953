"""Triton kernels (installed as attnlrp_fast.kernels): launchers only, no autograd, no HF.

Each module holds one kernel family and its launcher: attention_fwd.attention_fwd, attention_bwd.attention_bwd,
norm.norm_fwd / norm_bwd, glu.glu_fwd / glu_bwd / activation_fwd / activation_bwd; rules.py the rules' numbers.
The package re-exports no launcher, so each module stays reachable under its own name."""

from . import interpreter_compat
from .attention_common import interpreting
from .rules import ATTENTION_FACTORS, RULE_IDS, RULES

interpreter_compat.install()

__all__ = ["interpreting", "RULES", "RULE_IDS", "ATTENTION_FACTORS"]
