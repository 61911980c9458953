"""The torch face of the kernels (installed as attnlrp_fast.bindings): custom ops, autograd, dispatch, the CPU path.

  attention.py   attention custom ops and the public attention() function (attention.attention)
  norm.py, glu.py  RMSNorm / LayerNorm, GLU products and activations as custom ops (rms_norm, layer_norm,
                 glu_product, activation_op: the public functions)
  torch_path.py  the torch path of every op      sdpa.py      its attention on torch's fused kernels (CPU, CUDA)
  dispatch.py    which implementation, device and dtype run (attention per call: attention_choice)
  dispatch_table.py  the measured table auto follows on a GPU (attnlrp_fast/data/dispatch.json)
  checks.py      the argument checks             hf.py        registration with transformers
Nothing here imports from attnlrp_fast above it (tests/project/test_layers.py walks the imports). The package re-exports
only names that differ from its modules' names, so every module stays reachable as itself.
"""

from .attention import attention_bwd_op, attention_fwd_op
from .dispatch import BACKENDS, triton_runs_on, uses_triton
from .glu import ACTIVATIONS, GLU_ACTIVATIONS, activation, glu_product
from .norm import layer_norm, rms_norm

__all__ = ["attention_fwd_op", "attention_bwd_op", "BACKENDS", "uses_triton", "triton_runs_on",
           "rms_norm", "layer_norm", "glu_product", "activation", "ACTIVATIONS", "GLU_ACTIVATIONS"]
