"""What a model map says and how each kind of module is rewired (one Replacement class per kind).

A FamilyMap names, for one HF model family, which module classes get which fused LRP op:
  rms_norms    class name -> RMSNormSpec (weight offset: 0 for Llama-style, 1 for Gemma-style)
  layer_norms  class names computing torch.nn.LayerNorm over the last dim
  glu_mlps     class name -> GLUSpec (where gate, up and down live)
  experts      class names of fused mixture-of-experts modules (Mixtral-style 3-D weights)
  containers   MLP / MoE classes whose own forward is linear around children that are patched (GPT2MLP)
  activations  handled for every family: any module whose class is in ACTIVATIONS (fused ops) or TORCH_ACTIVATIONS
Attention is not listed: it goes through attn_implementation="attnlrp_fast" for every family.

Every replacement is checked against the module's own forward on random input when it is installed (lrp_patch.py), so
a map that assumes the wrong formula fails loudly instead of explaining another model. The rules themselves live in
attnlrp_fast/rules.py and the fused ops; this file only wires modules to them.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from attnlrp_fast.bindings import activation, glu_product, layer_norm, rms_norm
from attnlrp_fast.rules import GammaLinear, uniform_product


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

    def candidates(self, spec):
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

    def candidates(self, spec):
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


class ExpertsReplacement(Replacement):
    """Mixtral-style experts (3-D gate_up_proj / down_proj weights): the GLU through the fused op and the routing
    weight times expert output under the uniform rule."""
    kind = "experts"

    def spec_for(self, module, family):
        return None if type(module).__name__ in family.experts else _NO_MATCH

    def forward(self, module, spec, lrp, backend):
        act = _act_of(module, "act_fn")

        def forward(hidden_states, top_k_index, top_k_weights):
            out = torch.zeros_like(hidden_states)
            with torch.no_grad():
                hit = torch.unique(top_k_index)
            for e in hit.tolist():
                if e >= module.num_experts:
                    continue
                token_idx, top_k_pos = torch.where(top_k_index == e)
                gate, up = F.linear(hidden_states[token_idx], module.gate_up_proj[e]).chunk(2, dim=-1)
                h = F.linear(glu_product(gate, up, act=act, lrp=lrp, backend=backend), module.down_proj[e])
                h = uniform_product(h, top_k_weights[token_idx, top_k_pos, None], lrp)
                out = out.index_add(0, token_idx, h.to(out.dtype))
            return out
        return forward

    def probe(self, module, spec, generator):
        x = _random((6, module.gate_up_proj.shape[-1]), module, generator)
        idx = torch.randint(0, module.num_experts, (6, 2), generator=generator).to(x.device)
        return (x, idx, torch.rand(6, 2, generator=generator).to(x.device, x.dtype))


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


# In the order replacement_for tries them on each module.
REPLACEMENTS = (RMSNormReplacement(), LayerNormReplacement(), GLUMLPReplacement(), ExpertsReplacement(),
                ActivationReplacement())


def replacement_for(module, family):
    """(Replacement, spec) for a module the family map (or the generic rules) covers, else None."""
    for replacement in REPLACEMENTS:
        spec = replacement.spec_for(module, family)
        if spec is not _NO_MATCH:
            return replacement, spec
    return None


def _act_of(module, attr):
    act = activation_name(getattr(module, attr))
    if act not in ("silu", "gelu", "gelu_tanh"):
        raise UnsupportedModelError(
            f"{type(module).__name__}.{attr} is {type(getattr(module, attr)).__name__}; GLU products take SiLU or GELU")
    return act


def gamma_linear_forward(module, gamma):
    """The forward of an nn.Linear under the gamma rule (rules.GammaLinear)."""
    return lambda x: GammaLinear.apply(x, module.weight, module.bias, gamma)
