"""The LXT-style baseline: AttnLRP as Python patches around torch ops, the way the reference implementation
(the authors' LXT library, its "efficient" mode) applies it. Gradient x input of the patched model is the
AttnLRP relevance; af.explain computes the same quantity with fused kernels (bench/e2e.py checks they agree).

  attention   torch SDPA (flash / cuDNN / efficient kernels) with the gradients of q and k scaled by 1/4 and
              of v by 1/2 through autograd (uniform rule on Q K^T and P V; the softmax's Taylor rule is its
              gradient x input)
  RMSNorm     the normaliser detached (identity rule)
  GLU MLP     act(gate) * up with half of the gradient to each factor (uniform rule); act(x) as
              x * (act(x) / x).detach() (identity rule)

Only Llama-type models (LlamaRMSNorm / LlamaMLP and the attention interface) are covered: what the benchmarks
(bench/) and the memory estimate's contrast mode (attnlrp_fast/estimate.py) need.
"""

import torch

NAME = "lxt_style_sdpa"
EAGER_NAME = "lxt_style_eager"     # the same rules on eager attention (the N x N matrix materialised)


class ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient times `factor`."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def _attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    query, key, value = ScaleGrad.apply(query, 0.25), ScaleGrad.apply(key, 0.25), ScaleGrad.apply(value, 0.5)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _eager_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.models.llama.modeling_llama import eager_attention_forward

    query, key, value = ScaleGrad.apply(query, 0.25), ScaleGrad.apply(key, 0.25), ScaleGrad.apply(value, 0.5)
    return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    AttentionInterface.register(EAGER_NAME, _eager_attention)
    AttentionMaskInterface.register(EAGER_NAME, eager_mask)


def _rms_norm_forward(module):
    def forward(hidden_states):
        dtype = hidden_states.dtype
        x = hidden_states.float()
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        return module.weight * (x * rstd.detach()).to(dtype)
    return forward


def _identity_rule(act, x):
    y = act(x)
    ratio = torch.where(x == 0, torch.zeros_like(x), y / x)
    return x * ratio.detach()


def _glu_forward(module):
    def forward(x):
        gate = _identity_rule(module.act_fn, module.gate_proj(x))
        up = module.up_proj(x)
        return module.down_proj(ScaleGrad.apply(gate, 0.5) * ScaleGrad.apply(up, 0.5))
    return forward


def patch(model):
    """Patch a Llama-type model instance in place (attention through NAME, norms and MLPs by the rules above)."""
    register()
    model.set_attn_implementation(NAME)
    n = 0
    for module in model.modules():
        cls = type(module).__name__
        if cls.endswith("RMSNorm"):
            module.forward = _rms_norm_forward(module)
            n += 1
        elif cls.endswith("MLP") and hasattr(module, "gate_proj"):
            module.forward = _glu_forward(module)
            n += 1
    if n == 0:
        raise ValueError(f"{type(model).__name__}: no RMSNorm or GLU MLP found; the LXT-style patch covers Llama-type "
                         "models only")
    return model


def _checkpointing(model, on):
    """HF gradient checkpointing (`activation_checkpointing_*` in newer transformers, `gradient_checkpointing_*`
    before), non-reentrant."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def explain(model, input_ids, checkpoint=True):
    """Input-token relevance (B, N) float32 of the argmax logit at the last position: gradient x input of the
    patched model, parameters frozen, with HF gradient checkpointing when `checkpoint`."""
    for p in model.parameters():
        p.requires_grad_(False)
    if checkpoint:
        _checkpointing(model, True)
        model.train()          # HF checkpoints only in training mode; Llama has no dropout
    else:
        model.eval()
    try:
        emb = model.get_input_embeddings()(input_ids).detach().requires_grad_()
        logits = model(inputs_embeds=emb, use_cache=False, logits_to_keep=1).logits[:, -1]
        target = logits.gather(-1, logits.argmax(-1, keepdim=True)).sum()
        (grad,) = torch.autograd.grad(target, emb)
        return (emb.detach() * grad).float().sum(-1)
    finally:
        if checkpoint:
            _checkpointing(model, False)
            model.eval()
