"""af.lrp(model, rule=...): make one model instance compute its backward under an explanation rule.

    with af.lrp(model, rule="attnlrp"):
        ...                                   # forward/backward now give AttnLRP relevance as x * grad
    handle = af.lrp(model); ...; handle.remove()

What it changes, on this instance only (never a class):
- attention goes through the engine: attn_implementation="attnlrp_fast", the rule set on each attention module
  (BLOOM's and MPT's ALiBi attention, outside the attention interface, swapped for the engine: models/alibi.py);
- state-space, delta-rule and RWKV mixers take MambaLRP's rule (models/recurrent.py);
- RMSNorm / LayerNorm, GLU products, mixture-of-experts weighting and element-wise activations go through the
  fused ops (identity rule on norms and activations, uniform rule on products) per the model's family map;
- with gamma=..., the linear layers of a vision transformer's encoder take the gamma rule;
- every module is put in eval mode (dropout off).
Every replacement is checked against the module's own forward on random input when installed. remove()
(or leaving the with-block) restores the instance exactly: forwards, attention implementation, modes.
"""

import contextlib
import inspect

import torch

from attnlrp_fast.bindings.checks import check_rule
from attnlrp_fast.bindings.dispatch import check_backend
from attnlrp_fast.bindings.hf import (BACKEND_ATTR, ENGINE_CALLS, NAME, RULE_ATTR, RelativePositionBias,
                                     attention_modules, relative_bias_modules)
from attnlrp_fast.models.eager_rules import wrap_forward
from attnlrp_fast.models import FamilyMap, UnsupportedModelError, family_for, linear_dims, replacements_for
from attnlrp_fast.models.common import gamma_linear_forward
from attnlrp_fast.models import alibi
from attnlrp_fast.models.moe import gated_shared_experts
from attnlrp_fast.models.recurrent import is_recurrent, recurrent_forward
from attnlrp_fast.patching import Patches, hooks_paused
from attnlrp_fast.rules import half_gradient
from attnlrp_fast.selfcheck import rel_err

HANDLE_ATTR = "_attnlrp_fast_handle"
# class-name endings of modules that need a rule (or a known container): norms, MLPs, mixture-of-experts blocks
_SUSPICIOUS_ENDINGS = ("norm", "mlp", "moe", "experts", "expert", "moeblock", "moelayer", "feedforward", "ffn",
                       "moemlp")
# token mixers other than attention, which have products of input-dependent factors and no rule here: state-space
# layers, linear attention, gated short convolutions, recurrent cells
_NO_RULE_MIXERS = ("mamba", "mixer", "deltanet", "shortconv", "shortconvolution", "linearattention", "lightning",
                   "recurrent", "lstm", "rglru", "moa")   # (moa: JetMoE's mixture of attention heads)
_UNSET = object()


class LRPHandle:
    """The patches af.lrp() applied to one model; remove() undoes them (also on leaving a with-block)."""

    def __init__(self, model, rule="attnlrp", *, backend=None, gamma=None, family=None):
        check_rule(rule)
        check_backend(backend)
        if gamma is not None and (not isinstance(gamma, (int, float)) or gamma < 0):
            raise ValueError(f"gamma must be a non-negative number or None, got {gamma!r}")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (a HuggingFace model), got {type(model).__name__}")
        if family is not None and not isinstance(family, FamilyMap):
            raise TypeError(f"family must be an af.FamilyMap, got {type(family).__name__}")
        model = unwrap(model)
        if getattr(model, HANDLE_ATTR, None) is not None:
            raise RuntimeError("this model is already inside af.lrp(); leave it (or call .remove()) first")
        self.model, self.rule, self.backend, self.gamma = model, rule, backend, gamma
        self.family = family if family is not None else family_for(model)
        self.final_logit_softcap = getattr(getattr(model, "config", None), self.family.final_logit_softcap, None) \
            if self.family.final_logit_softcap else None
        self._patches = Patches()   # forwards and attention attributes
        self._hooks = []            # the attention modules' hooks that notice attention computed outside the engine
        self.bypassed = {}          # attention module name -> class: ran without the engine, and a gradient reached it
        self.eager_attention = False   # the model's own attention code runs under the rules (eager_rules.py)
        self._modes = []
        self._attn = _UNSET        # the attention implementation to put back
        self._specs = {}           # module class -> the spec its check confirmed (the family map stays as it is)
        self.patched = {}          # module name -> what it became
        try:
            self._apply()
        except BaseException:
            self.remove()
            raise
        setattr(model, HANDLE_ATTR, self)

    # --- applying -------------------------------------------------------------------------------------
    def _set_forward(self, name, module, forward, what):
        self._patches.set(module, _forward_attr(module), forward)
        self.patched[name] = what

    def _apply(self):
        model, lrp = self.model, self.rule != "grad"
        self._modes = [(m, m.training) for m in model.modules()]
        model.eval()
        self._route_attention()
        # children before their parents: a module run under the rules operation by operation (eager_rules.py) finds
        # the norms and activations inside it already replaced
        for name, module in reversed(list(model.named_modules())):
            cls = type(module).__name__
            if is_recurrent(module):   # a state-space layer, delta-rule or RWKV mixer: MambaLRP (models/recurrent.py)
                own = getattr(module, _forward_attr(module))
                self._set_forward(name, module, recurrent_forward(name, module, own, self.backend) if lrp else own,
                                  "recurrence")
                continue
            if cls not in self._specs:
                found = replacements_for(module, self.family)
                if not found:
                    continue
                self._specs[cls] = self._first_fitting(name, module, found)
            replacement, spec = self._specs[cls]
            forward = _own_code(name, module, lrp, self.backend) if replacement is OWN_CODE else \
                replacement.forward(module, spec, lrp, self.backend)
            self._set_forward(name, module, forward, replacement.kind)
        if lrp:
            self._apply_shared_expert_gates()
        if self.gamma is not None:
            self._apply_gamma()
        self._check_coverage()

    def _apply_shared_expert_gates(self):
        """sigmoid(shared_expert_gate(x)) * shared_expert(x) in a MoE block: the uniform rule, half of the gradient to
        each factor (each feeds only that product), on the outputs of the two modules."""
        for gate, shared in gated_shared_experts(self.model):
            for module in (gate, shared):
                inner = module.forward
                self._patches.set(module, "forward", _halved(inner))

    def _route_attention(self):
        model = self.model
        can_set = getattr(type(model), "_can_set_attn_implementation", None)
        if not hasattr(model, "set_attn_implementation") or (can_set is not None and not can_set()):
            if not self._alibi_attention():
                self._eager_attention()
            return
        self._attn = _attn_tree(model.config)
        model.set_attn_implementation(NAME)
        modules = _attention_modules(model)
        for module in modules:
            self._patches.set(module, RULE_ATTR, self.rule)
        attention_backend(model, self.backend, self._patches)
        innermost = _innermost(modules)
        # attention in code of its own (LongT5's local attention, Pegasus-X's global-local): the rules there; linear
        # attention stays refused (by the watch below)
        own = [m for m in innermost if not _calls_interface(m) and not _no_rule_mixer(m)]
        self._attention_under_rules(own)
        self._watch_attention([m for m in innermost if all(m is not o for o in own)])
        self._check_has_mixer(modules)

    def _alibi_attention(self):
        """BLOOM / MPT: their ALiBi attention modules swapped for the engine (models/alibi.py), their masks built as
        KernelMasks; False (nothing changed) when the model has other attention modules."""
        modules = _innermost(_attention_modules(self.model))
        names = {id(m): n for n, m in self.model.named_modules()}
        forwards = [alibi.engine_forward(m, names[id(m)]) for m in modules]
        if not modules or any(f is None for f in forwards):
            return False
        alibi.register()
        self._patches.set(self.model.config, "_attn_implementation_internal", alibi.MASK_NAME)
        for module, forward in zip(modules, forwards):
            self._patches.set(module, RULE_ATTR, self.rule)
            self._set_forward(names[id(module)], module, forward, "alibi_attention")
        attention_backend(self.model, self.backend, self._patches)
        return True

    def _eager_attention(self):
        """A model whose attention does not go through transformers' AttentionInterface: its innermost attention
        modules run their own code under the rules (eager_rules.py); memory is then what that code takes."""
        modules = _innermost(_attention_modules(self.model))
        self._check_has_mixer(modules)
        self.eager_attention = True
        self._attention_under_rules(modules)

    def _check_has_mixer(self, attention):
        """UnsupportedModelError for a model with neither attention nor a recurrent mixer (models/recurrent.py)."""
        if not attention and not any(is_recurrent(m) for m in self.model.modules()):
            raise UnsupportedModelError(f"{type(self.model).__name__}: no attention module found (nor a state-space, "
                                        "delta-rule or RWKV mixer)")

    def _attention_under_rules(self, modules):
        """These attention modules run their own code under the rule, operation by operation (eager_rules.py)."""
        if self.rule == "grad":
            return
        for module in modules:
            attr = _forward_attr(module)
            self._patches.set(module, attr, wrap_forward(getattr(module, attr), self.rule, self.backend))

    def _watch_attention(self, modules):
        """Hooks on these (innermost) attention modules: one that runs without the engine being called computed its
        attention itself (LongT5's local attention, ...), without the rules; when a gradient then reaches its output
        (it matters to the target: a vision tower's unused pooling head does not), check_engine_used() says so."""
        names = {id(m): n for n, m in self.model.named_modules()}
        for module in modules:
            start = []
            self._hooks.append(module.register_forward_pre_hook(
                lambda m, a, s=start: None if torch.compiler.is_compiling() else s.append(ENGINE_CALLS[0])))

            def after(m, args, out, s=start, name=names.get(id(module), "?")):
                if not s or torch.compiler.is_compiling() or ENGINE_CALLS[0] != s.pop():
                    return
                for t in (out if isinstance(out, (tuple, list)) else (out,)):
                    if isinstance(t, torch.Tensor) and t.requires_grad:
                        t.register_hook(lambda g, n=name, c=type(m).__name__: self._reached(n, c, g))
            self._hooks.append(module.register_forward_hook(after))

    def _reached(self, name, cls, grad):
        if bool((grad != 0).any()):
            self.bypassed[name] = cls

    def check_engine_used(self):
        """UnsupportedModelError when an attention module computed its attention outside the engine and the last
        backward pass went through it (its rules would be missing from the explanation)."""
        if self.bypassed:
            name, cls = next(iter(self.bypassed.items()))
            self.bypassed = {}
            raise UnsupportedModelError(f"{name} ({cls}) computes its attention itself, outside transformers' "
                                        "AttentionInterface, so the attention rules cannot be applied there")

    def _first_fitting(self, name, module, found):
        """(replacement, spec) of the first kind in `found` whose check passes (a generic map's Llama-style GLU that
        does not fit the module falls through to the generic MLP readings); the last one's error when none does."""
        for i, (replacement, spec) in enumerate(found):
            try:
                return replacement, self._checked_spec(name, module, replacement, spec)
            except UnsupportedModelError as e:
                if not self.family.name.startswith("generic"):
                    raise
                if i == len(found) - 1:
                    if "in its own forward" in str(e) or not _own_code_eligible(module):
                        raise
                    return OWN_CODE, None   # a norm or experts module of no form: its own code under the rules
        raise AssertionError("unreachable")

    def _checked_spec(self, name, module, replacement, spec):
        """The spec (of the map's, or the candidates a generic entry leaves open) whose replacement computes what
        the module computes on random input; UnsupportedModelError when none does."""
        candidates = replacement.candidates(spec, module)
        for candidate in candidates:
            try:
                forward = replacement.forward(module, candidate, self.rule != "grad", self.backend)
                if self._matches(module, replacement, forward, candidate):
                    return candidate
            except UnsupportedModelError as e:
                if str(e).startswith(f"{name} "):
                    raise
                raise UnsupportedModelError(f"{name} ({type(module).__name__}): {e}") from None
            except Exception:   # noqa: BLE001 (a candidate that cannot even run on the probe does not fit)
                continue
        cls = type(module).__name__
        if spec is None and replacement.kind == "rms_norm":
            raise UnsupportedModelError(f"{name} ({cls}) is not an RMSNorm this library knows")
        if spec is None:
            raise UnsupportedModelError(
                f"{name} ({cls}) computes no {replacement.kind} form this library knows "
                f"({len(candidates)} tried against its forward); pass af.lrp(..., family=af.FamilyMap(...)) "
                "naming it as a container if it is linear around its children")
        raise UnsupportedModelError(
            f"{name} ({cls}): the fused {replacement.kind} replacement does not compute what the "
            f"module computes; the map for '{self.family.name}' does not fit this model")

    def _matches(self, module, replacement, forward, spec):
        probe = replacement.probe(module, spec, torch.Generator().manual_seed(0))
        with torch.no_grad(), Patches() as patches, hooks_paused():
            if _forward_attr(module) == "forward":
                got = forward(*probe)
                try:
                    want = type(module).forward(module, *probe)
                except (RuntimeError, NotImplementedError):
                    if not got.is_meta:
                        raise
                    # on the meta device a module that routes by value (experts) cannot run its own forward: the
                    # replacement, which stands in the worst routing, is taken at the shape of its input
                    return got.shape == probe[0].shape and got.dtype == probe[0].dtype
            else:   # offloaded by accelerate: its hook brings the weights for the module's own forward and for ours
                want = module.forward(*probe)
                patches.set(module, "_old_forward", forward)
                got = module.forward(*probe)
        if got.is_meta:   # a model on the meta device (af.estimate_memory): shapes and dtypes are all there is
            return got.shape == want.shape and got.dtype == want.dtype
        tol = 1e-4 if probe[0].dtype in (torch.float32, torch.float64) else 3e-2
        return got.shape == want.shape and rel_err(got, want) < tol

    def _apply_gamma(self):
        scope = self.family.gamma_scope
        if not scope:
            raise ValueError(f"gamma applies to vision transformers' linear layers; '{self.family.name}' has none")
        for name, module in self.model.named_modules():
            in_scope = name == scope or name.endswith("." + scope) or ("." + scope + ".") in name \
                or name.startswith(scope + ".")
            if in_scope and isinstance(module, torch.nn.Linear):
                self._set_forward(name, module, gamma_linear_forward(module, float(self.gamma)), "gamma_linear")

    def _check_coverage(self):
        """Norm, MLP and expert modules the map neither patched nor knows as linear containers would carry
        unchecked rules: refuse them."""
        missing = []
        lrp = self.rule != "grad"
        # attention modules and recurrent mixers: a module holding one (a layer, a whole model) has its parts checked
        attention = set(map(id, attention_modules(self.model))) | \
            {id(m) for n, m in self.model.named_modules() if self.patched.get(n) == "recurrence"}
        experts = [n for n, what in self.patched.items() if what == "experts"]
        for name, module in self.model.named_modules():
            cls = type(module).__name__
            lowered = cls.lower()
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                continue   # affine in eval mode (running statistics)
            suspicious = _needs_rule(lowered) or (_no_rule_mixer(module) and linear_dims(module) is None)
            if not suspicious or name in self.patched or cls in self.family.containers:
                continue
            if any(id(m) in attention for m in module.modules()):
                continue   # a layer or a whole model (Qwen2MoeDecoderLayer): its parts are checked one by one
            if any(e.startswith(name + ".") for e in experts):
                continue   # a MoE block around patched experts: route, weight (uniform rule), sum
            if _own_code_eligible(module):   # its own code under the rules, operation by operation
                self._set_forward(name, module, _own_code(name, module, lrp, self.backend), OWN_CODE.kind)
                continue
            missing.append(f"{name} ({cls})")
        if missing:
            raise UnsupportedModelError(
                f"no LRP rule for these modules of '{self.family.name}': {', '.join(missing[:8])}"
                f"{' ...' if len(missing) > 8 else ''}. Add a model map for this family (attnlrp_fast/models/).")

    # --- undoing --------------------------------------------------------------------------------------
    def remove(self):
        """Restore the model exactly as it was. Safe to call twice."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._patches.restore()
        if self._attn is not _UNSET:
            self.model.set_attn_implementation(self._attn)
            self._attn = _UNSET
        for module, mode in self._modes:
            module.training = mode
        self._modes = []
        if getattr(self.model, HANDLE_ATTR, None) is self:
            self.model.__dict__.pop(HANDLE_ATTR, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def __repr__(self):
        kinds = {}
        for what in self.patched.values():
            kinds[what] = kinds.get(what, 0) + 1
        return f"LRPHandle(rule={self.rule!r}, family={self.family.name!r}, patched={kinds})"


def _attn_tree(config):
    """The attention implementation of a config and of each of its sub-configs (a vision-language model's vision and
    text parts may differ), in the form set_attn_implementation takes back."""
    subs = {k: _attn_tree(getattr(config, k)) for k in getattr(config, "sub_configs", {}) or {}
            if getattr(config, k, None) is not None}
    return {"": config._attn_implementation, **subs} if subs else config._attn_implementation


def _forward_attr(module):
    """Where a replacement forward goes: accelerate's hooked modules (device_map, CPU or disk offload) keep their own
    forward as `_old_forward` and run it between the hook's weight loading and unloading; the replacement goes
    there, inside the hook, so the weights are in place when it runs. Elsewhere: `forward`."""
    return "_old_forward" if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward") else "forward"


def lrp(model, rule="attnlrp", *, backend=None, gamma=None, family=None) -> LRPHandle:
    """Patch this model instance so that its backward follows `rule` ("attnlrp" | "cp" | "grad").
    Use as a context manager, or keep the handle and call .remove(). See the module docstring.
    family: an af.FamilyMap naming this model's module classes, for a model the built-in maps and the generic
    rules do not cover (it replaces the built-in map; its replacements are checked like those)."""
    return LRPHandle(model, rule, backend=backend, gamma=gamma, family=family)


class _OwnCode:
    """A norm, MLP, experts or mixture-of-experts module that no reading computes: its own forward under the rules,
    operation by operation (models/eager_rules.py, strict: an operation with no rule is refused, naming the module and
    the operation, when it runs). _own_code builds the forward."""
    kind = "own code"


OWN_CODE = _OwnCode()


def _own_code(name, module, lrp, backend):
    own = getattr(module, _forward_attr(module))
    if not lrp:
        return own
    ruled = wrap_forward(own, "attnlrp", backend, elementwise=True, module=module)

    def forward(*args, **kwargs):
        try:
            return ruled(*args, **kwargs)
        except UnsupportedModelError as e:
            raise UnsupportedModelError(f"{name} ({type(module).__name__}) runs its own code under the rules, and "
                                        f"there {e}") from None
    return forward


def _own_code_eligible(module):
    """Norm, MLP, experts and mixture-of-experts modules (not token mixers without a rule: state-space layers,
    linear attention, recurrent cells), holding no attention module."""
    if _no_rule_mixer(module) or any(type(m).__name__.endswith("Attention") for m in module.modules()):
        return False
    lowered = type(module).__name__.lower()
    return _needs_rule(lowered) or "norm" in lowered


def _needs_rule(lowered):
    """Whether a (lower-cased) class name is a norm's, an MLP's or a mixture of experts' (they need a rule, or a map
    naming them linear containers)."""
    return lowered.endswith(_SUSPICIOUS_ENDINGS) or "sparsemoe" in lowered or "mlp" in lowered


def _no_rule_mixer(module):
    """A token mixer other than attention without a rule here (_NO_RULE_MIXERS)."""
    return any(w in type(module).__name__.lower() for w in _NO_RULE_MIXERS)


def _calls_interface(module):
    """Whether the module's class calls transformers' attention interface in its forward (read from its source)."""
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return True
    return "ATTENTION_FUNCTIONS" in source or "attention_interface" in source


def _attention_modules(model):
    """The model's attention modules (bindings/hf.py), less the recurrent mixers among them (RWKV's "attention":
    its rule is models/recurrent.py's)."""
    return [m for m in attention_modules(model) if not is_recurrent(m)]


def _innermost(modules):
    """The modules of the list that hold no other module of the list."""
    ids = set(map(id, modules))
    return [m for m in modules if not any(id(c) in ids for c in m.modules() if c is not m)]


def _relative_bias_of(compute_bias):
    def patched(query_length, key_length, device=None, past_seen_tokens=0):
        return RelativePositionBias(compute_bias, past_seen_tokens)
    return patched


def _halved(forward):
    return lambda *args, **kwargs: half_gradient(forward(*args, **kwargs))


def attention_backend(model, backend, patches=None) -> Patches:
    """Route every attention module of `model` to `backend` (as in af.attention; None: auto), through `patches` (new
    ones when None), which are returned: `with attention_backend(model, "torch"): ...` puts back what each module
    had. The one place a backend goes onto a model: af.lrp, generation and the evaluation's forwards route here.
    T5-style attention modules also compute their relative position bias as the table's (H, N + M - 1) offsets
    (bindings/hf.py RelativePositionBias) for the duration, never as an N x M tensor."""
    check_backend(backend)
    patches = Patches() if patches is None else patches
    for module in attention_modules(model):
        patches.set(module, BACKEND_ATTR, backend)
    for module in relative_bias_modules(model):   # T5: its bias from the table in the kernel, never N x M
        patches.set(module, "compute_bias", _relative_bias_of(module.compute_bias))
    return patches


def lrp_scope(model, rule=None, backend=None, *, caller, family=None):
    """A context manager with the model under rules: af.lrp(model, rule or "attnlrp", backend, family=family) for the
    block, or, when the model is already inside af.lrp, that one (left as it is on exit); a different rule or backend
    asked of it by `caller` is a ValueError naming both."""
    handle = active_handle(model)
    if handle is None:
        return lrp(model, rule or "attnlrp", backend=backend, family=family)
    if family is not None and family is not handle.family:
        raise ValueError(f"the model is inside af.lrp() with the map '{handle.family.name}'; {caller} got another")
    if rule is not None and rule != handle.rule:
        raise ValueError(f"the model is inside af.lrp(rule={handle.rule!r}) but {caller} was asked for rule={rule!r}")
    if backend is not None and backend != handle.backend:
        raise ValueError(f"the model is inside af.lrp(backend={handle.backend!r}); {caller} got backend={backend!r}")
    return contextlib.nullcontext(handle)


def active_handle(model):
    """The LRPHandle the model is inside, or None."""
    return getattr(unwrap(model), HANDLE_ATTR, None)


def unwrap(model):
    """The model inside a torch.compile wrapper (OptimizedModule), else the model: the patches and the handle go on
    the model itself, so that nothing is left on a wrapper that forwards attribute writes to it, and later calls
    see them whether they go through the wrapper or not."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, torch.nn.Module) and type(model).__name__ == "OptimizedModule" else model
