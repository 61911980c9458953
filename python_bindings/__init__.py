"""The torch face of the kernels (installed as attnlrp_fast.bindings): custom ops, autograd, dispatch."""

from .attention import BACKENDS, attention_bwd_op, attention_fwd_op, uses_triton

__all__ = ["BACKENDS", "attention_fwd_op", "attention_bwd_op", "uses_triton"]

# The attribute `glu` of this package is the function, not the module: `from attnlrp_fast.bindings.glu import
# glu_fwd_op` reaches the module (as does importlib.import_module), `import attnlrp_fast.bindings.glu as m` does not.
from .glu import ACTIVATIONS, GLU_ACTIVATIONS, activation, glu  # noqa: E402
from .norm import layer_norm, rms_norm  # noqa: E402

__all__ += ["rms_norm", "layer_norm", "glu", "activation", "ACTIVATIONS", "GLU_ACTIVATIONS"]
