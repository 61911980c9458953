"""Recurrent token mixers (state-space layers, gated delta-rule linear attention, RWKV): MambaLRP's rule.

Jafari et al., "MambaLRP: Explaining Selective State Space Sequence Models" (NeurIPS 2024): the recurrence's
input-dependent coefficients are taken as given (held constant in the backward), so that the mixer is linear in its
value stream, and the relevance passes through it as x * grad and is conserved; elsewhere in the mixer the rules of
the rest of the model hold (the mixer's own code runs under eager_rules.py's strict mode): the identity rule on
activations (the SiLU after the short convolution), the uniform rule on the output gate's product y * act(z), the
identity rule on the normaliser of the gated norm, the exact gradient of the (linear) convolution and projections.

What is a coefficient: the arguments of the scan function the mixer calls (transformers' torch implementations,
or the fused kernels that stand in for them, which take the same arguments) named in SCANS:
  Mamba (Mamba, Falcon-Mamba, Jamba):     dt, A, B, C and the dt bias      (value: the conv output x; D x skip)
  Mamba-2 (Nemotron-H, Falcon-H1, ...):   dt, A, B, C and the dt bias
  gated delta rule (Qwen3-Next, Qwen3.5, Lara): query, key, the decay g and beta        (value: v)
  RWKV's WKV:                             the decays and the key                        (value: v)
Held at the function's arguments, the coefficients are the same whatever order the function contracts them in
(Mamba-2's chunked form, the delta rule's chunked inverse): the relevance does not depend on the chunk size.
The mixer's forward is checked to have called its scan: one that ran another path (a fused kernel that takes the
projections themselves) raises UnsupportedModelError rather than pass a gradient without the rule.
"""

import functools
import inspect
import sys

import torch

from .common import UnsupportedModelError
from .eager_rules import wrap_forward
from attnlrp_fast.patching import Patches

# the scan functions of transformers' recurrent mixers -> their arguments that are coefficients of the recurrence
SCANS = {
    "mamba_selective_scan": ("dt", "A", "B", "C", "delta_bias"),
    "mamba_selective_state_update": ("dt", "A", "B", "C", "dt_bias"),
    "mamba2_chunk_scan": ("dt", "A", "B", "C", "dt_bias"),
    "mamba2_selective_state_update": ("dt", "A", "B", "C", "dt_bias"),
    "torch_chunk_gated_delta_rule": ("query", "key", "g", "beta"),
    "torch_recurrent_gated_delta_rule": ("query", "key", "g", "beta"),
    "rwkv_linear_attention": ("time_decay", "time_first", "key"),
}


def scan_functions(module):
    """{name: function} of the SCANS functions that `module`'s forward calls, looked up in its class's module."""
    namespace = vars(sys.modules.get(type(module).__module__, object()))
    return {name: namespace[name] for name in _called_scans(type(module)) if callable(namespace.get(name))}


@functools.lru_cache(maxsize=None)
def _called_scans(cls):
    """The SCANS names the source of cls.forward calls."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ()
    return tuple(name for name in SCANS if f"{name}(" in source)


def is_recurrent(module):
    """Whether `module` is a recurrent mixer this rule covers (its forward calls a known scan)."""
    return bool(scan_functions(module))


def recurrent_forward(name, module, forward, backend):
    """`forward` (the module's own) under MambaLRP's rule: its scan's coefficients detached, the rest under the strict
    rules mode. Without a gradient being recorded it is the module's own forward."""
    scans = scan_functions(module)
    if not scans:
        raise UnsupportedModelError(f"{name} ({type(module).__name__}) calls no scan function this library knows")
    ruled = wrap_forward(forward, "attnlrp", backend, elementwise=True, module=module)
    namespace = sys.modules[type(module).__module__]

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        calls = []
        with Patches() as patches:
            for fname, fn in scans.items():
                patches.set(namespace, fname, _coefficients_detached(fn, SCANS[fname], calls))
            try:
                out = ruled(*args, **kwargs)
            except UnsupportedModelError as e:
                raise UnsupportedModelError(f"{name} ({type(module).__name__}) runs its own code under the rules, "
                                            f"and there {e}") from None
        if not calls:
            raise UnsupportedModelError(
                f"{name} ({type(module).__name__}) ran without calling its scan ({', '.join(scans)}): the "
                "recurrence's coefficients could not be held constant (MambaLRP), so no rule applies")
        return out
    return run


def _coefficients_detached(fn, coefficients, calls):
    signature = inspect.signature(fn)

    def run(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        for key in coefficients:
            value = bound.arguments.get(key)
            if isinstance(value, torch.Tensor):
                bound.arguments[key] = value.detach()
        calls.append(fn)
        return fn(*bound.args, **bound.kwargs)
    return run
