"""GPT-2: LayerNorm, GELU (tanh form) MLP on Conv1D layers (linear: gradient unchanged)."""

from .common import FamilyMap

GPT2 = FamilyMap(name="gpt2", model_types=("gpt2",), layer_norms=("LayerNorm",), containers=("GPT2MLP",))
