"""What a model map says and how each kind of module is rewired.

A FamilyMap names, for one HF model family, which module classes get which fused LRP op:
  rms_norms    class name -> RMSNormSpec (weight offset: 0 for Llama-style, 1 for Gemma-style)
  layer_norms  class names computing torch.nn.LayerNorm over the last dim
  glu_mlps     class name -> GLUSpec (where gate, up and down live)
  experts      class names of fused mixture-of-experts modules (Mixtral-style 3-D weights)
  containers   MLP / MoE classes whose own forward is linear around children that are patched (GPT2MLP)
  activations  handled for every family: any module whose class is in ACTIVATIONS
Attention is not listed: it goes through attn_implementation="attnlrp_fast" for every family.

Every replacement is checked against the module's own forward on random input when it is installed, so
a map that assumes the wrong formula fails loudly instead of explaining another model.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


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
    return ACTIVATIONS.get(cls)


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


def rms_norm_forward(module, spec, lrp, backend):
    from attnlrp_fast.bindings import rms_norm

    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if eps is None:
        raise UnsupportedModelError(f"{type(module).__name__} has no variance_epsilon or eps attribute")

    def forward(x):
        w = module.weight
        out_dtype = torch.promote_types(x.dtype, w.dtype) if spec.promote_output else x.dtype
        return rms_norm(x, w, eps, offset=spec.offset, lrp=lrp, backend=backend, out_dtype=out_dtype)

    return forward


def layer_norm_forward(module, lrp, backend):
    from attnlrp_fast.bindings import layer_norm

    shape = tuple(getattr(module, "normalized_shape", ()))
    if len(shape) != 1:
        raise UnsupportedModelError(f"{type(module).__name__} normalises over {shape}; only the last dim is supported")

    def forward(x):
        return layer_norm(x, module.weight, module.bias, module.eps, lrp=lrp, backend=backend)

    return forward


def activation_forward(module, lrp, backend):
    from attnlrp_fast.bindings import activation

    act = activation_name(module)

    def forward(x):
        return activation(x, act=act, lrp=lrp, backend=backend)

    return forward


def _act_of(module, attr):
    act = activation_name(getattr(module, attr))
    if act not in ("silu", "gelu", "gelu_tanh"):
        raise UnsupportedModelError(
            f"{type(module).__name__}.{attr} is {type(getattr(module, attr)).__name__}; GLU products take SiLU or GELU")
    return act


def glu_mlp_forward(module, spec, lrp, backend):
    from attnlrp_fast.bindings import glu

    act = _act_of(module, spec.act)
    down = getattr(module, spec.down)

    def forward(x):
        if spec.fused:
            gate, up = getattr(module, spec.fused)(x).chunk(2, dim=-1)
        else:
            gate, up = getattr(module, spec.gate)(x), getattr(module, spec.up)(x)
        return down(glu(gate, up, act=act, lrp=lrp, backend=backend))

    return forward


def uniform_product(a, b, lrp):
    """a * b; under LRP the uniform rule: each factor gets half of the gradient."""
    if not lrp:
        return a * b
    half = lambda x: x * 0.5 + (x * 0.5).detach()  # noqa: E731  identity forward, half gradient
    return half(a) * half(b)


def experts_forward(module, lrp, backend):
    """Mixtral-style experts (3-D gate_up_proj / down_proj weights): the GLU through the fused op and the
    routing weight times expert output under the uniform rule."""
    from attnlrp_fast.bindings import glu

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
            h = F.linear(glu(gate, up, act=act, lrp=lrp, backend=backend), module.down_proj[e])
            h = uniform_product(h, top_k_weights[token_idx, top_k_pos, None], lrp)
            out = out.index_add(0, token_idx, h.to(out.dtype))
        return out

    return forward


class _GammaLinear(torch.autograd.Function):
    """y = W x + b; backward: the gamma rule g_x = (W + g W+)^T (y * g_y / z), z = (W + g W+) x + (b + g b+)."""

    @staticmethod
    def forward(ctx, x, weight, bias, gamma):
        ctx.save_for_backward(x, weight, bias)
        ctx.gamma = gamma
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, gy):
        x, weight, bias = ctx.saved_tensors
        w_g = weight + ctx.gamma * weight.clamp(min=0)
        b_g = None if bias is None else bias + ctx.gamma * bias.clamp(min=0)
        y = F.linear(x, weight, bias).float()
        z = F.linear(x, w_g, b_g).float()
        z = z + 1e-6 * torch.where(z >= 0, 1.0, -1.0)
        gx = F.linear((y * gy.float() / z).to(x.dtype), w_g.t())
        return gx, None, None, None


def gamma_linear_forward(module, gamma):
    def forward(x):
        return _GammaLinear.apply(x, module.weight, module.bias, gamma)

    return forward


def probe_input(module, kind, spec=None):
    """A small random input for checking a replacement against the module's own forward, or None."""
    p = next(module.parameters(), None)
    dtype = p.dtype if p is not None else torch.float32
    device = p.device if p is not None else "cpu"
    g = torch.Generator().manual_seed(0)
    if kind in ("rms_norm", "layer_norm"):
        dim = module.weight.shape[0] if getattr(module, "weight", None) is not None else module.normalized_shape[0]
    elif kind == "glu_mlp":
        proj = getattr(module, spec.fused or spec.gate)
        dim = proj.in_features
    elif kind == "activation":
        dim = 24
    elif kind == "experts":
        dim = module.gate_up_proj.shape[-1]
        x = torch.randn(6, dim, generator=g).to(device, dtype)
        idx = torch.randint(0, module.num_experts, (6, 2), generator=g).to(device)
        w = torch.rand(6, 2, generator=g).to(device, dtype)
        return (x, idx, w)
    else:
        return None
    return (torch.randn(2, 5, dim, generator=g).to(device, dtype) * 2,)
