"""AttnLRP for a whole Llama written out layer by layer as relevance propagation, in float64 from the model's
weights: the paper's formulas applied in turn, no autograd. The tests compare af.explain with it.

Rules used (eps -> 0; z is the layer's output, x its input):
  linear y = W x            epsilon rule: R_x = x * (W^T (R_y / y))
  residual h = a + b        epsilon rule: R_a = a / h * R_h, R_b = b / h * R_h
  RMSNorm y = x * rstd * w  identity rule on the normaliser: y_d depends on x_d alone, R_x = R_y
  RoPE y = C x              linear (epsilon rule) with C = diag(cos) + diag(sin) Rot
  act(g) * u                uniform rule: half of R to each factor; identity rule through act: R_g = R_act(g)
  attention                 tests/explicit_rules.py (uniform rule on Q K^T and P V, Taylor rule on softmax)
"""

import torch

from explicit_rules import attention_relevance


def _rms(x, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _linear_relevance(x, weight, r_y):
    y = x @ weight.T
    return x * ((r_y / y) @ weight)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate_half_transposed(r):
    r1, r2 = r.chunk(2, dim=-1)
    return torch.cat((r2, -r1), dim=-1)


def _rope_relevance(x, cos, sin, r_y):
    y = x * cos + _rotate_half(x) * sin
    ratio = r_y / y
    return x * (ratio * cos + _rotate_half_transposed(ratio * sin))


@torch.no_grad()
def llama_token_relevance(model, input_ids, position, token):
    """Input-token relevance (N,) of logit[position, token] for one sequence (1-D input_ids)."""
    cfg = model.config
    W = {k: v.double() for k, v in model.state_dict().items()}
    eps = cfg.rms_norm_eps
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    N = input_ids.shape[0]
    x = W["model.embed_tokens.weight"][input_ids]
    pos = torch.arange(N)[None]
    cos, sin = model.model.rotary_emb(x[None], pos)
    cos, sin = cos[0].double()[:, None], sin[0].double()[:, None]  # (N, 1, hd)

    saved = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        a = x
        hn = _rms(a, eps) * W[p + "input_layernorm.weight"]
        q = (hn @ W[p + "self_attn.q_proj.weight"].T).view(N, H, hd)
        k = (hn @ W[p + "self_attn.k_proj.weight"].T).view(N, Hkv, hd)
        v = (hn @ W[p + "self_attn.v_proj.weight"].T).view(N, Hkv, hd)
        qr, kr = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        heads = lambda t: t.permute(1, 0, 2)[None]  # noqa: E731  (N, h, d) -> (1, h, N, d)
        kv_rep = lambda t: heads(t).repeat_interleave(H // Hkv, 1)  # noqa: E731
        att = torch.softmax((heads(qr) @ kv_rep(kr).transpose(-1, -2) * hd ** -0.5)
                            .masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf")), -1)
        o = (att @ kv_rep(v))[0].permute(1, 0, 2).reshape(N, H * hd)
        attn_out = o @ W[p + "self_attn.o_proj.weight"].T
        x1 = a + attn_out
        hn2 = _rms(x1, eps) * W[p + "post_attention_layernorm.weight"]
        g = hn2 @ W[p + "mlp.gate_proj.weight"].T
        u = hn2 @ W[p + "mlp.up_proj.weight"].T
        m = torch.nn.functional.silu(g) * u
        mlp = m @ W[p + "mlp.down_proj.weight"].T
        x = x1 + mlp
        saved.append((a, hn, q, k, v, qr, kr, o, attn_out, x1, hn2, g, u, m, mlp, x))
    xf = _rms(x, eps) * W["model.norm.weight"]
    logits = xf @ W["lm_head.weight"].T

    r_logits = torch.zeros_like(logits)
    r_logits[position, token] = logits[position, token]
    r_x = _linear_relevance(xf, W["lm_head.weight"], r_logits)  # final norm: identity rule
    for i in reversed(range(cfg.num_hidden_layers)):
        p = f"model.layers.{i}."
        a, hn, q, k, v, qr, kr, o, attn_out, x1, hn2, g, u, m, mlp, x = saved[i]
        r_x1, r_mlp = x1 / x * r_x, mlp / x * r_x
        r_m = _linear_relevance(m, W[p + "mlp.down_proj.weight"], r_mlp)
        r_g, r_u = 0.5 * r_m, 0.5 * r_m  # uniform rule, identity rule through SiLU
        r_x1 = r_x1 + _linear_relevance(hn2, W[p + "mlp.gate_proj.weight"], r_g) \
            + _linear_relevance(hn2, W[p + "mlp.up_proj.weight"], r_u)
        r_a, r_attn = a / x1 * r_x1, attn_out / x1 * r_x1
        r_o = _linear_relevance(o, W[p + "self_attn.o_proj.weight"], r_attn).view(N, H, hd)
        heads = lambda t: t.permute(1, 0, 2)[None]  # noqa: E731
        r_qr, r_kr, r_v = attention_relevance(heads(qr), heads(kr), heads(v), heads(r_o), rule="attnlrp",
                                              causal=True, scale=hd ** -0.5)
        back = lambda t: t[0].permute(1, 0, 2)  # noqa: E731  (1, h, N, d) -> (N, h, d)
        r_q = _rope_relevance(q, cos, sin, back(r_qr)).reshape(N, H * hd)
        r_k = _rope_relevance(k, cos, sin, back(r_kr)).reshape(N, Hkv * hd)
        r_hn = _linear_relevance(hn, W[p + "self_attn.q_proj.weight"], r_q) \
            + _linear_relevance(hn, W[p + "self_attn.k_proj.weight"], r_k) \
            + _linear_relevance(hn, W[p + "self_attn.v_proj.weight"], back(r_v).reshape(N, Hkv * hd))
        r_x = r_a + r_hn  # input norm: identity rule
    return r_x.sum(-1)
