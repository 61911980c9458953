"""AttnLRP for a whole T5 (Flan-T5: T5 v1.1 with gated-GELU MLPs; plain T5: ReLU MLPs), encoder and decoder,
written out layer by layer as relevance propagation in float64 from the model's weights: the paper's formulas
applied in turn, no autograd. The tests compare af.explain with it.

Rules used (eps -> 0; y is the layer's output, x its input):
  linear y = W x             epsilon rule: R_x = x * (W^T (R_y / y)) (a constant factor, T5's d_model^-0.5 before
                             a tied head, cancels)
  residual h = a + b         epsilon rule: R_a = a / h * R_h, R_b = b / h * R_h
  T5 LayerNorm (RMS)         identity rule on the normaliser: R_x = R_y
  act(g) * u, act(h)         uniform rule on the product, identity rule on the activation
  attention                  tests/explicit_rules.py, the relative position bias a constant added to the logits
                             (it absorbs its share); cross-attention sends R_K, R_V to the encoder's output
"""

import torch

from explicit_rules import attention_relevance


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _lin(x, W):
    return x @ W.T


def _lin_rel(x, W, y, r_y):
    return x * ((r_y / y) @ W)


class _T5:
    def __init__(self, model):
        self.cfg = model.config
        self.W = {k: v.double() for k, v in model.state_dict().items()}
        self.H, self.dk = self.cfg.num_heads, self.cfg.d_kv
        self.eps = self.cfg.layer_norm_epsilon
        self.gated = self.cfg.is_gated_act
        self.model = model

    def heads(self, t):
        return t.view(t.shape[0], self.H, self.dk).permute(1, 0, 2)[None]

    def merge(self, t):
        return t[0].permute(1, 0, 2).reshape(t.shape[2], self.H * self.dk)

    def attn(self, p, n, kv, bias, causal):
        W = self.W
        q, k, v = _lin(n, W[p + "q.weight"]), _lin(kv, W[p + "k.weight"]), _lin(kv, W[p + "v.weight"])
        s = self.heads(q) @ self.heads(k).transpose(-1, -2)
        if bias is not None:
            s = s + bias
        if causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        o = self.merge(torch.softmax(s, -1) @ self.heads(v))
        out = _lin(o, W[p + "o.weight"])
        return out, (q, k, v, o, out, bias, causal)

    def attn_rel(self, p, n, kv, saved, r_out):
        W = self.W
        q, k, v, o, out, bias, causal = saved
        r_o = _lin_rel(o, W[p + "o.weight"], out, r_out)
        r_q, r_k, r_v = attention_relevance(self.heads(q), self.heads(k), self.heads(v), self.heads(r_o),
                                            rule="attnlrp", causal=causal, scale=1.0, bias=bias)
        r_n = _lin_rel(n, W[p + "q.weight"], q, self.merge(r_q))
        r_kv = _lin_rel(kv, W[p + "k.weight"], k, self.merge(r_k)) + _lin_rel(kv, W[p + "v.weight"], v, self.merge(r_v))
        return r_n, r_kv

    def ff(self, p, n):
        W = self.W
        if self.gated:
            g, u = _lin(n, W[p + "wi_0.weight"]), _lin(n, W[p + "wi_1.weight"])
            m = torch.nn.functional.gelu(g, approximate="tanh") * u
        else:
            g = u = _lin(n, W[p + "wi.weight"])
            m = torch.relu(g)
        out = _lin(m, W[p + "wo.weight"])
        return out, (g, u, m, out)

    def ff_rel(self, p, n, saved, r_out):
        W = self.W
        g, u, m, out = saved
        r_m = _lin_rel(m, W[p + "wo.weight"], out, r_out)
        if self.gated:   # uniform rule on the product, identity rule through GELU
            return _lin_rel(n, W[p + "wi_0.weight"], g, 0.5 * r_m) + _lin_rel(n, W[p + "wi_1.weight"], u, 0.5 * r_m)
        return _lin_rel(n, W[p + "wi.weight"], g, r_m)   # identity rule through ReLU


@torch.no_grad()
def t5_relevance(model, input_ids, decoder_input_ids, token):
    """(encoder token relevance (N,), decoder token relevance (M,)) of the logit of `token` at the decoder's last
    position, for one sequence (1-D ids)."""
    t = _T5(model)
    W, cfg, eps = t.W, t.cfg, t.eps
    N, M = input_ids.shape[0], decoder_input_ids.shape[0]
    enc_bias = model.encoder.block[0].layer[0].SelfAttention.compute_bias(N, N).double()
    dec_bias = model.decoder.block[0].layer[0].SelfAttention.compute_bias(M, M).double()

    x = W["shared.weight"][input_ids]
    enc = []
    for i in range(cfg.num_layers):
        p = f"encoder.block.{i}.layer."
        n1 = _rms(x, W[p + "0.layer_norm.weight"], eps)
        sa, s_sa = t.attn(p + "0.SelfAttention.", n1, n1, enc_bias, False)
        h = x + sa
        n2 = _rms(h, W[p + "1.layer_norm.weight"], eps)
        ff, s_ff = t.ff(p + "1.DenseReluDense.", n2)
        enc.append((x, n1, sa, s_sa, h, n2, ff, s_ff))
        x = h + ff
    e_final = _rms(x, W["encoder.final_layer_norm.weight"], eps)

    y = W["shared.weight"][decoder_input_ids]
    dec = []
    for i in range(cfg.num_decoder_layers):
        p = f"decoder.block.{i}.layer."
        n1 = _rms(y, W[p + "0.layer_norm.weight"], eps)
        sa, s_sa = t.attn(p + "0.SelfAttention.", n1, n1, dec_bias, True)
        h = y + sa
        n2 = _rms(h, W[p + "1.layer_norm.weight"], eps)
        ca, s_ca = t.attn(p + "1.EncDecAttention.", n2, e_final, None, False)
        h2 = h + ca
        n3 = _rms(h2, W[p + "2.layer_norm.weight"], eps)
        ff, s_ff = t.ff(p + "2.DenseReluDense.", n3)
        dec.append((y, n1, sa, s_sa, h, n2, ca, s_ca, h2, n3, ff, s_ff))
        y = h2 + ff
    d_final = _rms(y, W["decoder.final_layer_norm.weight"], eps)
    head = W["lm_head.weight"] if "lm_head.weight" in W else W["shared.weight"]
    scale = cfg.d_model ** -0.5 if getattr(cfg, "scale_decoder_outputs", cfg.tie_word_embeddings) else 1.0
    logits = _lin(d_final * scale, head)

    r_logits = torch.zeros_like(logits)
    r_logits[M - 1, token] = logits[M - 1, token]
    r_y = _lin_rel(d_final * scale, head, logits, r_logits)   # (the scale and the final norm: R unchanged)
    r_enc = torch.zeros_like(e_final)
    for i in reversed(range(cfg.num_decoder_layers)):
        p = f"decoder.block.{i}.layer."
        y0, n1, sa, s_sa, h, n2, ca, s_ca, h2, n3, ff, s_ff = dec[i]
        out = h2 + ff
        r_h2 = h2 / out * r_y + t.ff_rel(p + "2.DenseReluDense.", n3, s_ff, ff / out * r_y)
        r_n2, r_e = t.attn_rel(p + "1.EncDecAttention.", n2, e_final, s_ca, ca / h2 * r_h2)
        r_enc = r_enc + r_e
        r_h = h / h2 * r_h2 + r_n2
        r_n1, r_kv = t.attn_rel(p + "0.SelfAttention.", n1, n1, s_sa, sa / h * r_h)
        r_y = y0 / h * r_h + r_n1 + r_kv
    r_x = r_enc   # the encoder's final norm: identity rule
    for i in reversed(range(cfg.num_layers)):
        p = f"encoder.block.{i}.layer."
        x0, n1, sa, s_sa, h, n2, ff, s_ff = enc[i]
        out = h + ff
        r_h = h / out * r_x + t.ff_rel(p + "1.DenseReluDense.", n2, s_ff, ff / out * r_x)
        r_n1, r_kv = t.attn_rel(p + "0.SelfAttention.", n1, n1, s_sa, sa / h * r_h)
        r_x = x0 / h * r_h + r_n1 + r_kv
    return r_x.sum(-1), r_y.sum(-1)
