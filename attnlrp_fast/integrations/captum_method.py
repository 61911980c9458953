"""AttnLRPAttribution: Captum's LayerGradientXActivation on a model's input embeddings, run under the AttnLRP rules.

Inside captum.attr.LLMGradientAttribution (see integrations.llm_attribution) the attributed score is Captum's:
the log-probability of each target token given the prompt and the target tokens before it. Called alone on a
HuggingFace model, the attributed output is the model's logits at the last position (class logits for a
classification head), so attribute(input_ids, target=token_id) equals af.explain(model, input_ids, target=token_id)
summed over the embedding dimension. Imports Captum (pip install captum).
"""

import torch
from captum.attr import LayerGradientXActivation

from attnlrp_fast.bindings.checks import check_rule
from attnlrp_fast.inputs import forward_parameters
from attnlrp_fast.integrations.common import rules_applied


class AttnLRPAttribution(LayerGradientXActivation):
    """AttnLRP relevance of the input-embedding output (B, N, D): gradient x activation under af.lrp(model, rule).
    Sum over the last dimension for token relevance (LLMGradientAttribution does). The model is restored after
    each attribute() call; inside an active af.lrp(model) of the same rule, that one is used."""

    def __init__(self, model, rule="attnlrp", *, backend=None, forward_func=None):
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "get_input_embeddings"):
            raise TypeError(f"model must be a HuggingFace model (torch.nn.Module), got {type(model).__name__}")
        embeddings = model.get_input_embeddings()
        if embeddings is None:
            raise ValueError(f"{type(model).__name__} has no input-embedding module (get_input_embeddings())")
        check_rule(rule)
        super().__init__(forward_func if forward_func is not None else model, embeddings, multiply_by_inputs=True)
        self.model, self.rule, self.backend = model, rule, backend

    def attribute(self, inputs, target=None, additional_forward_args=None, attribute_to_layer_input=False,
                  grad_kwargs=None):
        """LayerGradientXActivation.attribute under the AttnLRP rules (input ids in, (B, N, D) relevance out)."""
        if attribute_to_layer_input:
            raise ValueError("the input of the embedding layer is token ids: AttnLRP relevance is attributed to its "
                             "output (attribute_to_layer_input=False)")
        own = self.forward_func is self.model   # alone on the HF model: attribute its logits at the last position
        if own:
            self.forward_func = self._last_logits
        try:
            with rules_applied(self.model, self.rule, self.backend):
                return super().attribute(inputs, target=target, additional_forward_args=additional_forward_args,
                                         grad_kwargs=grad_kwargs)
        finally:
            if own:
                self.forward_func = self.model

    def _last_logits(self, input_ids, attention_mask=None):
        """The model's logits at the last position (B, V), or its class logits (B, C)."""
        kwargs = {"input_ids": input_ids}
        if attention_mask is not None:
            if input_ids.dim() == 2 and not attention_mask[:, -1].bool().all():
                raise ValueError("a row ends in padding: its last position is not a real token; pad on the left "
                                 "or pass forward_func=... that reads the positions you want")
            kwargs["attention_mask"] = attention_mask
        if "use_cache" in forward_parameters(self.model):
            kwargs["use_cache"] = False
        logits = getattr(self.model(**kwargs), "logits", None)
        if not isinstance(logits, torch.Tensor) or logits.dim() not in (2, 3):
            raise ValueError(f"{type(self.model).__name__} returns no (B, N, V) or (B, C) logits: pass "
                             "forward_func=f(input_ids, ...) -> scores")
        return logits[:, -1] if logits.dim() == 3 else logits
