"""attnlrp-fast: AttnLRP explanations of transformers with fused Triton flash-attention kernels."""

from .attention import RULES, attention
from .bindings.hf import register as _register_with_transformers
from .explain import Contrast, Explanation, contrast, explain
from .lrp import LRPHandle, lrp
from .memory import LowMemoryHandle, low_memory
from .models import UnsupportedModelError

__version__ = "0.1.0"

# attn_implementation="attnlrp_fast" for any HF model whose attention goes through AttentionInterface.
HF_REGISTERED = _register_with_transformers()

__all__ = ["attention", "lrp", "explain", "contrast", "Contrast", "Explanation", "LRPHandle", "UnsupportedModelError",
           "RULES", "low_memory", "LowMemoryHandle", "__version__"]
