"""AttnLRP inside Captum and Inseq. Importing this package imports neither library; each is imported when used.

    from attnlrp_fast.integrations import AttnLRPAttribution, llm_attribution, register_inseq
    AttnLRPAttribution(model)                 # a captum.attr.LayerGradientXActivation on the input embeddings
    llm_attribution(model, tokenizer)         # captum.attr.LLMGradientAttribution around it (log-prob targets)
    register_inseq()                          # then inseq.load_model(model, "attnlrp", tokenizer=tokenizer)

Both run the attribution inside af.lrp(model, rule) (the model is restored after each call), so the relevance is
gradient x input of the attributed score under the AttnLRP rules: exactly af.explain's for the same score.
"""

from .common import check_causal_lm, require, rules_applied

__all__ = ["AttnLRPAttribution", "llm_attribution", "register_inseq", "check_causal_lm", "rules_applied"]


def __getattr__(name):
    if name == "AttnLRPAttribution":
        require("captum")
        from .captum_method import AttnLRPAttribution
        return AttnLRPAttribution
    if name == "AttnLRPInseqAttribution":
        require("inseq")
        from .inseq_method import AttnLRPInseqAttribution
        return AttnLRPInseqAttribution
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def llm_attribution(model, tokenizer, rule="attnlrp", *, backend=None):
    """captum.attr.LLMGradientAttribution over AttnLRPAttribution(model): token_attr[k] is the relevance of the prompt
    tokens for log p(target token k | prompt, target tokens < k), Captum's LLM target; seq_attr their sum."""
    check_causal_lm(model)
    require("captum")
    from captum.attr import LLMGradientAttribution

    from .captum_method import AttnLRPAttribution
    return LLMGradientAttribution(AttnLRPAttribution(model, rule, backend=backend), tokenizer)


def register_inseq():
    """Register the Inseq attribution method "attnlrp" (importing attnlrp_fast.integrations.inseq_method does it);
    returns its class."""
    require("inseq")
    from .inseq_method import AttnLRPInseqAttribution
    return AttnLRPInseqAttribution
