"""attnlrp-fast: AttnLRP explanations of transformers with fused Triton flash-attention kernels."""

from .attention import RULES, attention

__version__ = "0.1.0"

__all__ = ["attention", "RULES", "__version__"]
