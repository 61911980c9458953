"""AttnLRP for a whole Phi (Phi-1.5 / Phi-2: parallel attention and MLP blocks, LayerNorm with bias, partial RoPE,
biased linears, a GELU MLP) written out layer by layer as relevance propagation, in float64 from the model's weights:
the paper's formulas applied in turn, no autograd. The tests compare af.explain with it.

Rules used (eps -> 0; y is the layer's output, x its input):
  linear y = W x + b         epsilon rule, the bias absorbing its share: R_x = x * (W^T (R_y / y))
  sum h = a + b + c          epsilon rule: R_a = a / h * R_h, ...
  LayerNorm                  identity rule on the normaliser: with rstd a constant, y = w rstd (x - mean x) + b is an
                             affine map of x, J = diag(w rstd) (I - 11^T / D): R_x = x * (J^T (R_y / y))
  partial RoPE               linear on the rotated dims (epsilon rule), the other dims pass through unchanged
  GELU                       identity rule: R_in = R_out
  attention                  tests/explicit_rules.py (uniform rule on Q K^T and P V, Taylor rule on the softmax)
"""

import torch

from explicit_llama import _rope_relevance, _rotate_half
from explicit_rules import attention_relevance


def _layer_norm(x, w, b, eps):
    c = x - x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps)
    return c * rstd * w + b, rstd


def _layer_norm_relevance(x, w, rstd, y, r_y):
    t = w * rstd * (r_y / y)
    return x * (t - t.mean(-1, keepdim=True))


def _linear(x, W, b):
    return x @ W.T + b


def _linear_relevance(x, W, y, r_y):
    return x * ((r_y / y) @ W)


@torch.no_grad()
def phi_token_relevance(model, input_ids, position, token):
    """Input-token relevance (N,) of logit[position, token] for one sequence (1-D input_ids)."""
    cfg = model.config
    W = {k: v.double() for k, v in model.state_dict().items()}
    eps = cfg.layer_norm_eps
    H = cfg.num_attention_heads
    hd = cfg.hidden_size // H
    rot = int(hd * cfg.rope_parameters["partial_rotary_factor"])
    N = input_ids.shape[0]
    x = W["model.embed_tokens.weight"][input_ids]
    cos, sin = model.model.rotary_emb(x[None].float(), torch.arange(N)[None])
    cos, sin = cos[0].double()[:, None], sin[0].double()[:, None]  # (N, 1, rot)
    heads = lambda t: t.permute(1, 0, 2)[None]  # noqa: E731  (N, h, d) -> (1, h, N, d)
    back = lambda t: t[0].permute(1, 0, 2)      # noqa: E731

    def rope(t):
        r, rest = t[..., :rot], t[..., rot:]
        return torch.cat([r * cos + _rotate_half(r) * sin, rest], -1)

    saved = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        a = x
        hn, rstd = _layer_norm(a, W[p + "input_layernorm.weight"], W[p + "input_layernorm.bias"], eps)
        q = _linear(hn, W[p + "self_attn.q_proj.weight"], W[p + "self_attn.q_proj.bias"])
        k = _linear(hn, W[p + "self_attn.k_proj.weight"], W[p + "self_attn.k_proj.bias"])
        v = _linear(hn, W[p + "self_attn.v_proj.weight"], W[p + "self_attn.v_proj.bias"])
        qr, kr = rope(q.view(N, H, hd)), rope(k.view(N, H, hd))
        att = torch.softmax((heads(qr) @ heads(kr).transpose(-1, -2) * hd ** -0.5)
                            .masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf")), -1)
        o = back(att @ heads(v.view(N, H, hd))).reshape(N, H * hd)
        attn_out = _linear(o, W[p + "self_attn.dense.weight"], W[p + "self_attn.dense.bias"])
        h1 = _linear(hn, W[p + "mlp.fc1.weight"], W[p + "mlp.fc1.bias"])
        act = torch.nn.functional.gelu(h1, approximate="tanh")
        ff = _linear(act, W[p + "mlp.fc2.weight"], W[p + "mlp.fc2.bias"])
        x = attn_out + ff + a
        saved.append((a, hn, rstd, q, k, v, qr, kr, o, attn_out, h1, act, ff, x))
    xf, rstd_f = _layer_norm(x, W["model.final_layernorm.weight"], W["model.final_layernorm.bias"], eps)
    logits = _linear(xf, W["lm_head.weight"], W["lm_head.bias"])

    r_logits = torch.zeros_like(logits)
    r_logits[position, token] = logits[position, token]
    r_xf = _linear_relevance(xf, W["lm_head.weight"], logits, r_logits)
    r_x = _layer_norm_relevance(x, W["model.final_layernorm.weight"], rstd_f, xf, r_xf)
    for i in reversed(range(cfg.num_hidden_layers)):
        p = f"model.layers.{i}."
        a, hn, rstd, q, k, v, qr, kr, o, attn_out, h1, act, ff, x = saved[i]
        r_a, r_attn, r_ff = a / x * r_x, attn_out / x * r_x, ff / x * r_x
        r_act = _linear_relevance(act, W[p + "mlp.fc2.weight"], ff, r_ff)
        r_hn = _linear_relevance(hn, W[p + "mlp.fc1.weight"], h1, r_act)   # identity rule through GELU
        r_o = _linear_relevance(o, W[p + "self_attn.dense.weight"], attn_out, r_attn).view(N, H, hd)
        r_qr, r_kr, r_v = attention_relevance(heads(qr), heads(kr), heads(v.view(N, H, hd)), heads(r_o),
                                              rule="attnlrp", causal=True, scale=hd ** -0.5)
        r_q, r_k = back(r_qr), back(r_kr)
        r_q = torch.cat([_rope_relevance(q.view(N, H, hd)[..., :rot], cos, sin, r_q[..., :rot]), r_q[..., rot:]], -1)
        r_k = torch.cat([_rope_relevance(k.view(N, H, hd)[..., :rot], cos, sin, r_k[..., :rot]), r_k[..., rot:]], -1)
        r_hn = r_hn + _linear_relevance(hn, W[p + "self_attn.q_proj.weight"], q, r_q.reshape(N, -1)) \
            + _linear_relevance(hn, W[p + "self_attn.k_proj.weight"], k, r_k.reshape(N, -1)) \
            + _linear_relevance(hn, W[p + "self_attn.v_proj.weight"], v, back(r_v).reshape(N, -1))
        r_x = r_a + _layer_norm_relevance(a, W[p + "input_layernorm.weight"], rstd, hn, r_hn)
    return r_x.sum(-1)
