"""attnlrp-fast: AttnLRP explanations of transformers with fused Triton flash-attention kernels.

The core: attention (bindings/attention.py), lrp (lrp_patch.py), explain (explanation.py), low_memory (memory.py),
estimate_memory (estimate.py: the memory of one explanation, on meta tensors), the model maps (models/), the rules
index (rules.py) and the float64 oracles (reference.py). The long-document application lives in attnlrp_fast.app,
the evaluation in attnlrp_fast.evaluation.
"""

from .bindings.attention import attention
from .bindings.hf import register as _register_with_transformers
from .estimate import MemoryEstimate, estimate_memory
from .explanation import Explanation, explain
from .kernels.rules import RULES
from .lrp_patch import LRPHandle, lrp
from .memory import LowMemoryHandle, low_memory
from .models import UnsupportedModelError
from .targets import Contrast, contrast

__version__ = "0.1.0"

# attn_implementation="attnlrp_fast" for any HF model whose attention goes through AttentionInterface.
HF_REGISTERED = _register_with_transformers()

__all__ = ["attention", "lrp", "explain", "contrast", "Contrast", "Explanation", "LRPHandle", "UnsupportedModelError",
           "RULES", "low_memory", "LowMemoryHandle", "estimate_memory", "MemoryEstimate", "__version__"]
