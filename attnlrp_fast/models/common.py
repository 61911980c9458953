"""What a model map says and how each kind of module is rewired (one Replacement class per kind).

A FamilyMap names, for one HF model family, which module classes get which fused LRP op:
  rms_norms    class name -> RMSNormSpec (weight offset: 0 for Llama-style, 1 for Gemma-style)
  layer_norms  class names computing torch.nn.LayerNorm over the last dim
  glu_mlps     class name -> GLUSpec (where gate, up and down live)
  mlps         class name -> MLPSpec (models/generic.py: linear -> activation -> linear, or a GLU of any act)
  norms        class name -> NormSpec (models/generic.py: any affine norm over the last dim)
  experts      class names of fused mixture-of-experts modules (3-D weights; models/moe.py)
  containers   MLP / MoE classes whose own forward is linear around children that are patched (GPT2MLP)
Modules no map names are recognised by what they compute (models/generic.py, models/moe.py) and verified the same way.
  activations  handled for every family: any module whose class is in ACTIVATIONS (fused ops) or TORCH_ACTIVATIONS
Attention is not listed: it goes through attn_implementation="attnlrp_fast" for every family.

Every replacement is checked against the module's own forward on random input when it is installed (lrp_patch.py), so
a map that assumes the wrong formula fails loudly instead of explaining another model. The rules themselves live in
attnlrp_fast/rules.py and the fused ops; this file only wires modules to them.
"""

from dataclasses import dataclass, field

import torch

from attnlrp_fast.bindings import activation, glu_product, layer_norm, rms_norm
from attnlrp_fast.rules import GammaLinear


class UnsupportedModelError(ValueError):
    """The model (or a module in it) is not one this library knows how to explain."""


@dataclass(frozen=True)
class RMSNormSpec:
    offset: float = 0.0          # y = x * rstd * (offset + w)
    promote_output: bool = True  # Llama: w * x.to(dtype) promotes; Gemma: (x * (1 + w)).type_as(x)


@dataclass(frozen=True)
class GLUSpec:
    down: str = "down_proj"
    gate: str = "gate_proj"
    up: str = "up_proj"
    fused: str = ""              # Phi3: one projection whose output halves are (gate, up)
    act: str = "act_fn"


@dataclass(frozen=True)
class FamilyMap:
    name: str
    model_types: tuple
    rms_norms: dict = field(default_factory=dict)
    layer_norms: tuple = ()
    glu_mlps: dict = field(default_factory=dict)
    mlps: dict = field(default_factory=dict)          # class name -> generic.MLPSpec
    norms: dict = field(default_factory=dict)         # class name -> generic.NormSpec
    experts: tuple = ()
    containers: tuple = ()         # MLP/MoE classes whose own forward is linear around patched children
    final_logit_softcap: str = ""   # config attribute holding the final logit softcap, if any
    gamma_scope: str = ""           # submodule whose nn.Linear layers take the gamma rule when asked


def activation_name(module):
    """The fused activation computing what `module` computes, or None."""
    cls = type(module).__name__
    if isinstance(module, torch.nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    return ACTIVATIONS.get(cls) or TORCH_ACTIVATIONS.get(cls)


ACTIVATIONS = {
    "SiLUActivation": "silu",
    "SiLU": "silu",
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
    "Tanh": "tanh",
    "ReLU": "relu",
}

# Activations no fused op computes: plain torch with the identity rule (quick_gelu below).
TORCH_ACTIVATIONS = {"QuickGELUActivation": "quick_gelu"}


def quick_gelu(x, lrp):
    """CLIP's QuickGELU x * sigmoid(1.702 x), as transformers computes it; under LRP the identity rule of the rules
    index ("identity (activation)"): g_in = g_out * f(x) / x = g_out * sigmoid(1.702 x) (the sigmoid held constant,
    so x * g_in == f(x) * g_out element-wise)."""
    s = torch.sigmoid(1.702 * x)
    return x * (s.detach() if lrp else s)


def compute_dtype_device(module):
    """The dtype and device a module computes in: its first floating-point parameter's dtype (a quantized weight's
    storage dtype, uint8 or int8, is not one: then a quantized layer's compute_dtype, else float32), and the device
    accelerate runs it on when it offloads the weights (the meta device holds them between calls), else its
    parameters' device."""
    params = list(module.parameters())
    floating = next((p for p in params if p.is_floating_point()), None)
    dtype = floating.dtype if floating is not None else next(
        (m.compute_dtype for m in module.modules() if isinstance(getattr(m, "compute_dtype", None), torch.dtype)),
        torch.float32)
    hook_device = next((getattr(m._hf_hook, "execution_device", None) for m in module.modules()
                        if hasattr(m, "_hf_hook")), None)
    if hook_device is not None:
        device = torch.device(hook_device if not isinstance(hook_device, int) else f"cuda:{hook_device}")
    else:
        device = next((p.device for p in params if not p.is_meta), params[0].device if params else torch.device("cpu"))
    return dtype, device


def _random(shape, module, generator):
    dtype, device = compute_dtype_device(module)
    return torch.randn(*shape, generator=generator).to(device, dtype)


class Replacement:
    """How one kind of module is rewired. spec_for(module, family) says whether the kind applies (returning its
    spec, or None when it applies with no spec); candidates(spec) lists the specs to try when the map leaves it
    open; forward(...) builds the fused forward; probe(...) a random input to check it against the module."""

    kind = ""

    def spec_for(self, module, family):
        raise NotImplementedError

    def candidates(self, spec, module=None):
        return [spec]

    def forward(self, module, spec, lrp, backend):
        raise NotImplementedError

    def probe(self, module, spec, generator):
        return (_random((2, 5, self.width(module, spec)), module, generator) * 2,)

    def width(self, module, spec):
        raise NotImplementedError


_NO_MATCH = object()


class RMSNormReplacement(Replacement):
    kind = "rms_norm"
    # a class the map names without a spec: Llama-style, then Gemma-style (weight offset 1)
    GENERIC = (RMSNormSpec(), RMSNormSpec(offset=1.0, promote_output=False))

    def spec_for(self, module, family):
        return family.rms_norms.get(type(module).__name__, _NO_MATCH)

    def candidates(self, spec, module=None):
        return [spec] if spec is not None else list(self.GENERIC)

    def forward(self, module, spec, lrp, backend):
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if eps is None:
            raise UnsupportedModelError(f"{type(module).__name__} has no variance_epsilon or eps attribute")

        def forward(x):
            w = module.weight
            out_dtype = torch.promote_types(x.dtype, w.dtype) if spec.promote_output else x.dtype
            return rms_norm(x, w, eps, offset=spec.offset, lrp=lrp, backend=backend, out_dtype=out_dtype)
        return forward

    def width(self, module, spec):
        return module.weight.shape[0]


class LayerNormReplacement(Replacement):
    kind = "layer_norm"

    def spec_for(self, module, family):
        return None if isinstance(module, torch.nn.LayerNorm) or type(module).__name__ in family.layer_norms \
            else _NO_MATCH

    def forward(self, module, spec, lrp, backend):
        shape = tuple(getattr(module, "normalized_shape", ()))
        if len(shape) != 1:
            raise UnsupportedModelError(f"{type(module).__name__} normalises over {shape}; only the last dim is "
                                        "supported")
        return lambda x: layer_norm(x, module.weight, module.bias, module.eps, lrp=lrp, backend=backend)

    def width(self, module, spec):
        return module.weight.shape[0] if getattr(module, "weight", None) is not None else module.normalized_shape[0]


class GLUMLPReplacement(Replacement):
    kind = "glu_mlp"

    def spec_for(self, module, family):
        return family.glu_mlps.get(type(module).__name__, _NO_MATCH)

    def forward(self, module, spec, lrp, backend):
        act = _act_of(module, spec.act)
        down = getattr(module, spec.down)

        def forward(x):
            if spec.fused:
                gate, up = getattr(module, spec.fused)(x).chunk(2, dim=-1)
            else:
                gate, up = getattr(module, spec.gate)(x), getattr(module, spec.up)(x)
            return down(glu_product(gate, up, act=act, lrp=lrp, backend=backend))
        return forward

    def width(self, module, spec):
        return getattr(module, spec.fused or spec.gate).in_features


class ActivationReplacement(Replacement):
    kind = "activation"

    def spec_for(self, module, family):
        return None if activation_name(module) is not None else _NO_MATCH

    def forward(self, module, spec, lrp, backend):
        act = activation_name(module)
        if act == "quick_gelu":
            return lambda x: quick_gelu(x, lrp)
        return lambda x: activation(x, act=act, lrp=lrp, backend=backend)

    def width(self, module, spec):
        return 24


def _act_of(module, attr):
    act = activation_name(getattr(module, attr))
    if act not in ("silu", "gelu", "gelu_tanh"):
        raise UnsupportedModelError(
            f"{type(module).__name__}.{attr} is {type(getattr(module, attr)).__name__}; GLU products take SiLU or GELU")
    return act


def gamma_linear_forward(module, gamma):
    """The forward of an nn.Linear under the gamma rule (rules.GammaLinear)."""
    return lambda x: GammaLinear.apply(x, module.weight, module.bias, gamma)
