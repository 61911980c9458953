"""The Inseq attribution method "attnlrp" (registered on import; pip install inseq).

    import inseq
    from attnlrp_fast.integrations import register_inseq
    register_inseq()
    m = inseq.load_model(model, "attnlrp", tokenizer=tokenizer)          # rule="cp" / backend="torch" optional
    out = m.attribute(prompt, prompt + answer, attributed_fn="logit")     # AttnLRP's seed: the target logit

At every generation step the prefix is explained for the step's attributed score (Inseq's default is the target
token's probability; attributed_fn="logit" gives af.explain's relevance). The relevance is summed over the embedding
dimension here, signed, exactly as af.explain sums it, and returned as coarse (one score per token) attributions:
Inseq applies no further aggregation (no L2 norm, no normalisation). Decoder-only causal LMs only.
"""

from inseq.attr.feat.gradient_attribution import GradientAttributionRegistry
from inseq.data import CoarseFeatureAttributionStepOutput

from attnlrp_fast.integrations.captum_method import AttnLRPAttribution
from attnlrp_fast.integrations.common import check_causal_lm


class AttnLRPInseqAttribution(GradientAttributionRegistry):
    """AttnLRP (Achtibat et al., ICML 2024) through attnlrp_fast: gradient x input of the attributed score under
    af.lrp(model, rule), summed over the embedding dimension per token."""

    method_name = "attnlrp"

    def __init__(self, attribution_model, rule="attnlrp", backend=None, **kwargs):
        if attribution_model.is_encoder_decoder:
            raise ValueError("the 'attnlrp' Inseq method supports decoder-only causal LMs, not encoder-decoder models")
        check_causal_lm(attribution_model.model)
        super().__init__(attribution_model, hook_to_model=False)
        self.attribute_batch_ids = True       # attribute the embedding layer's output for the input ids
        self.forward_batch_embeds = False
        self.use_baselines = False
        self.hook(**kwargs)
        self.method = AttnLRPAttribution(attribution_model.model, rule, backend=backend,
                                         forward_func=self.attribution_model)
        self.method.layer = self.target_layer

    def attribute_step(self, attribute_fn_main_args, attribution_args=None):
        """One generation step: (B, prefix) signed relevance of the prefix tokens for the step's score."""
        attr = self.method.attribute(**attribute_fn_main_args, **(attribution_args or {}))
        if isinstance(attr, tuple):
            attr = attr[0]
        return CoarseFeatureAttributionStepOutput(target_attributions=attr.detach().float().sum(-1).cpu())
