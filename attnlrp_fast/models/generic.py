"""Rules by what a module computes, for modules no family map names.

Three kinds are recognised from a module's children and then verified against the module's own forward on random
input (lrp_patch.py), so a module that computes anything else is refused rather than explained wrongly:

  MLP    linear -> element-wise activation -> linear                 identity rule on the activation
  GLU    down(act(gate(x)) * up(x)), or gate and up as the halves of one projection (concatenated or interleaved,
         either order)                                              identity rule on act, uniform rule on the product
  norm   an affine map of (x - mean) / std or of x / rms over the last dim, with or without weight (offset 0 or 1)
         or bias                                                    identity rule on the normaliser
  activation  any element-wise activation module (transformers' *Activation classes, torch.nn's)

The activation of an MLP or GLU is its activation child when it has one, else one of ACTIVATION_FUNCTIONS (models
that call F.silu in their forward); SiLU and GELU go through the fused ops, any other through
rules.identity_activation.
"""

import inspect
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnlrp_fast.bindings import activation, glu_product
from .eager_rules import check_rules_cover, wrap_forward
from attnlrp_fast.rules import gated_split, identity_activation, plain_norm, uniform_product

from .common import _NO_MATCH, Replacement, UnsupportedModelError, _random, activation_name

ACTIVATION_FUNCTIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "mish": F.mish,
}
_FUSED_GLU = ("silu", "gelu", "gelu_tanh")
_FUSED_ACT = ("silu", "gelu", "gelu_tanh", "tanh", "relu")
_MLP_WORDS = ("mlp", "feedforward", "feed_forward", "ffn", "denseactdense", "densegatedactdense")
_EPS_ATTRS = ("variance_epsilon", "eps", "epsilon", "variance_eps", "layer_norm_eps", "norm_eps")


def linear_dims(module):
    """(in, out) of a linear layer (nn.Linear, transformers' Conv1D, quantized linears), else None."""
    if isinstance(module, torch.nn.Linear) or (hasattr(module, "in_features") and hasattr(module, "out_features")):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight.shape[0], weight.shape[1]
    return None


def is_activation_module(module):
    """A parameter-light module without children that transformers or torch.nn defines as an activation."""
    if list(module.children()) or linear_dims(module) is not None:
        return False
    cls = type(module)
    return cls.__name__.endswith("Activation") or cls.__module__.startswith("torch.nn.modules.activation") or \
        cls.__module__ == "transformers.activations"


@dataclass(frozen=True)
class MLPSpec:
    """How a generic MLP computes: pattern "mlp" (a -> act -> b), "glu" (b(act(a) * c)) or "fused" (halves of a, then
    b); act: "child:<name>" (its activation module) or a name in ACTIVATION_FUNCTIONS; split "chunk" | "interleave"
    and gate_first for "fused"; residual: the forward takes (hidden_states, residual) and adds the residual to its
    output (BLOOM, MPT)."""
    pattern: str
    a: str
    b: str
    c: str = ""
    act: str = "silu"
    split: str = "chunk"
    gate_first: bool = True
    residual: bool = False


def _act_callable(module, act):
    """(fused name or None, plain function) of an MLPSpec's act."""
    if act.startswith("child:"):
        child = getattr(module, act[6:])
        fused = activation_name(child)
        return fused, (lambda x: type(child).forward(child, x))
    return act, ACTIVATION_FUNCTIONS[act]


class MLPReplacement(Replacement):
    """Any MLP-named module whose forward is one of MLPSpec's patterns over its own linear children."""
    kind = "mlp"

    def spec_for(self, module, family):
        cls = type(module).__name__
        if cls in family.containers:
            return _NO_MATCH
        if cls in family.mlps:
            return family.mlps[cls]
        lowered = cls.lower()
        if not any(w in lowered for w in _MLP_WORDS):
            return _NO_MATCH
        return None if _last_linear(module) is not None else _NO_MATCH

    def candidates(self, spec, module=None):
        if spec is not None:
            return [spec]
        linears = _linears(module)
        acts = [f"child:{n}" for n, m in module.named_children() if is_activation_module(m)]
        acts += list(ACTIVATION_FUNCTIONS)
        residual = _takes_residual(module)
        found = []
        for (na, a), (nb, b) in itertools.permutations(linears.items(), 2):
            if a[0] == b[1] and a[1] == b[0]:
                found += [MLPSpec("mlp", na, nb, act=act, residual=residual) for act in acts]
            if a[0] == b[1] and a[1] == 2 * b[0]:
                found += [MLPSpec("fused", na, nb, act=act, split=split, gate_first=first)
                          for act in acts for split in ("chunk", "interleave") for first in (True, False)]
        for (ng, g), (nu, u), (nd, d) in itertools.permutations(linears.items(), 3):
            if g == u and g[0] == d[1] and g[1] == d[0]:
                found += [MLPSpec("glu", ng, nd, nu, act=act) for act in acts]
        # last: the module's own forward under the rules, operation by operation (eager_rules.py)
        return found + [MLPSpec("own", "", "", residual=residual)]

    def forward(self, module, spec, lrp, backend):
        if spec.pattern == "own":
            return self._own(module, spec, lrp, backend)
        fused, f = _act_callable(module, spec.act)
        first, last = getattr(module, spec.a), getattr(module, spec.b)

        def forward(x, *args, **kwargs):
            if spec.residual:
                residual = args[0] if args else kwargs["residual"]
                return _plain(x) + residual
            return _plain(x)

        def _plain(x):
            h = first(x)
            if spec.pattern == "mlp":
                if fused in _FUSED_ACT:
                    return last(activation(h, act=fused, lrp=lrp, backend=backend))
                return last(identity_activation(h, f, lrp))
            if spec.pattern == "glu":
                gate, up = h, getattr(module, spec.c)(x)
            elif spec.split == "chunk":
                gate, up = h.chunk(2, dim=-1)
            else:
                gate, up = h[..., ::2], h[..., 1::2]
            if not spec.gate_first:
                gate, up = up, gate
            if fused in _FUSED_GLU:
                return last(glu_product(gate, up, act=fused, lrp=lrp, backend=backend))
            return last(uniform_product(identity_activation(gate, f, lrp), up, lrp))
        return forward

    def _own(self, module, spec, lrp, backend):
        """The module's own forward under the rules (eager_rules.RulesMode, element-wise and strict), once a run on
        random input found a rule for every operation on an input-dependent tensor (else UnsupportedModelError
        naming the first without one)."""
        def own(*args, **kwargs):
            return type(module).forward(module, *args, **kwargs)
        rule = "attnlrp" if lrp else "grad"
        if lrp:
            try:
                check_rules_cover(module, own, self.probe(module, spec, torch.Generator().manual_seed(0)), rule)
            except UnsupportedModelError as e:
                raise UnsupportedModelError(f"{type(module).__name__} matches no MLP form, and in its own forward {e}")
        return wrap_forward(own, rule, backend, elementwise=True, module=module) if lrp else own

    def width(self, module, spec):
        if spec.pattern == "own":
            return linear_dims(_last_linear(module))[1]
        return linear_dims(getattr(module, spec.a))[0]

    def probe(self, module, spec, generator):
        x = _random((2, 5, self.width(module, spec)), module, generator) * 2
        if spec.residual:
            out = self.width(module, spec) if spec.pattern == "own" else linear_dims(getattr(module, spec.b))[1]
            return x, _random((2, 5, out), module, generator)
        return (x,)


def _last_linear(module):
    """The last linear layer among the module's descendants (an MLP's output projection), or None."""
    found = [m for m in module.modules() if m is not module and linear_dims(m) is not None]
    return found[-1] if found else None


def _takes_residual(module):
    try:
        return "residual" in inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return False


def _linears(module):
    return {n: dims for n, m in module.named_children() if (dims := linear_dims(m)) is not None}


@dataclass(frozen=True)
class NormSpec:
    """A generic norm: center (LayerNorm) or not (RMSNorm), the weight offset (Gemma-style 1), eps; l2: the sum of
    squares in place of their mean (nGPT's L2 norm)."""
    center: bool
    offset: float = 0.0
    eps: float = 1e-6
    l2: bool = False


class NormReplacement(Replacement):
    """Any other *Norm module: plain_norm with the candidates NormSpec allows, checked against its forward."""
    kind = "norm"

    def spec_for(self, module, family):
        cls = type(module).__name__
        if cls in family.norms:
            return family.norms[cls]
        if "norm" not in cls.lower() or list(module.children()) or cls in family.containers:
            return _NO_MATCH
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            return _NO_MATCH   # in eval mode an affine map with the running statistics: the exact gradient is the rule
        return None

    def candidates(self, spec, module=None):
        if spec is not None:
            return [spec]
        eps = next((getattr(module, a) for a in _EPS_ATTRS if isinstance(getattr(module, a, None), float)), None)
        if eps is None and isinstance(module, torch.nn.RMSNorm):
            eps = torch.finfo(torch.float32).eps
        epsilons = [eps] if eps is not None else [1e-5, 1e-6, 1e-12, 1e-8]
        offsets = (0.0, 1.0) if _param(module, "weight") is not None else (0.0,)
        return [NormSpec(center, offset, e) for center in (False, True) for offset in offsets for e in epsilons] + \
            [NormSpec(False, offset, e, l2=True) for offset in offsets for e in epsilons]

    def forward(self, module, spec, lrp, backend):
        def forward(x, *args, **kwargs):
            return plain_norm(x, _param(module, "weight"), _param(module, "bias"), spec.eps, center=spec.center,
                              offset=spec.offset, lrp=lrp, l2=spec.l2)
        return forward

    def probe(self, module, spec, generator):
        weight = _param(module, "weight")
        if weight is not None:
            shape = tuple(weight.shape)
        else:
            shape = tuple(getattr(module, "normalized_shape", ())) or (24,)
        return (_random((2, 5, *shape), module, generator) * 2 + 0.5,)


def _param(module, name):
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None


class GatedSplitReplacement(Replacement):
    """torch's GLU module (a * sigmoid(b), the halves of its input along a dim: Granite-Speech's conformer): the
    uniform rule on the product, the identity rule on the sigmoid (rules.gated_split)."""
    kind = "gated_split"

    def spec_for(self, module, family):
        return None if isinstance(module, torch.nn.GLU) else _NO_MATCH

    def forward(self, module, spec, lrp, backend):
        return lambda x: gated_split(x, module.dim, lrp)

    def probe(self, module, spec, generator):
        return (_random((2, 6, 8), module, generator) * 2,)   # even along every dim the halves may be taken


class AnyActivationReplacement(Replacement):
    """An element-wise activation module no fused op computes (ReLU^2, xIELU, ...): the identity rule."""
    kind = "activation"

    def spec_for(self, module, family):
        if isinstance(module, torch.nn.GLU):
            return _NO_MATCH
        return None if is_activation_module(module) and activation_name(module) is None else _NO_MATCH

    def forward(self, module, spec, lrp, backend):
        own = type(module).forward
        return lambda x: identity_activation(x, lambda t: own(module, t), lrp)

    def width(self, module, spec):
        return 24
