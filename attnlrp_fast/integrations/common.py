"""What the Captum and Inseq front-ends share: the AttnLRP rules applied for one attribution call, and input checks.
Imports neither Captum nor Inseq."""

import contextlib
import importlib

import torch

from attnlrp_fast.lrp_patch import lrp_scope
from attnlrp_fast.patching import Patches
from attnlrp_fast.rules import final_softcap_identity


INSTALL = {"captum": "pip install captum==0.9.0 --no-deps",
           "inseq": "pip install --no-deps captum==0.9.0 inseq==0.7.1 jaxtyping wadler-lindig treescope "
                    "'typeguard<=2.13.3'"}


def require(name):
    """Import the optional package `name` (captum or inseq), or raise an ImportError that says how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"this attnlrp_fast integration needs {name}: {INSTALL[name]}") from e


def check_causal_lm(model):
    """Raise a clear error unless `model` is a HuggingFace causal LM (what Captum's LLM classes and Inseq's
    decoder-only models call and generate with)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a HuggingFace causal LM (torch.nn.Module), got {type(model).__name__}")
    name = type(model).__name__
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) or \
            name not in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) or not hasattr(model, "generate"):
        raise ValueError(f"{name} is not a HuggingFace causal LM (AutoModelForCausalLM class): the Captum LLM and "
                         "Inseq integrations explain next-token scores of decoder-only language models; for other "
                         "models use AttnLRPAttribution with your own forward_func, or af.explain")


class _SoftcapIdentity(torch.autograd.Function):
    """c * tanh(pre / c) (the model's own final logit softcap, same operations) with the identity rule's gradient."""

    @staticmethod
    def forward(ctx, pre, cap):
        capped = torch.tanh(pre / cap) * cap
        ctx.save_for_backward(pre, capped)
        return capped

    @staticmethod
    def backward(ctx, g):
        pre, capped = ctx.saved_tensors
        return final_softcap_identity(g, capped, pre), None


@contextlib.contextmanager
def _softcap_identity(model, cap):
    """Move the final logit softcap into a hook on the output embedding that applies the identity rule, as
    af.explain does (Gemma2/3); config and hook restored on exit."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has a final logit softcap but no output embedding module")
    with Patches() as patches:
        patches.set(model.config, "final_logit_softcapping", None)
        hook = head.register_forward_hook(lambda module, args, out: _SoftcapIdentity.apply(out, float(cap)))
        try:
            yield
        finally:
            hook.remove()


@contextlib.contextmanager
def rules_applied(model, rule="attnlrp", backend=None):
    """The model under af.lrp(model, rule, backend) for the block (reusing an active af.lrp of the same rule), plus
    the identity rule on a final logit softcap as in af.explain; everything restored on exit."""
    with lrp_scope(model, rule, backend, caller="the attribution") as h:
        cap = h.final_logit_softcap if h.rule != "grad" else None
        with _softcap_identity(model, cap) if cap is not None else contextlib.nullcontext():
            yield h
