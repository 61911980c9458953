"""The rules index: every rule this library applies, where it comes from, its modified gradient, and where its fast
implementation lives. Start here for "where is the rule for X?".

Every rule is written as a modified gradient g, so that the relevance of a tensor x is x * g(x) (Achtibat et al.,
"AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for Transformers", ICML 2024; "AttnLRP" below). The
explanation seeds g(target score) = 1; the relevance of input token i is sum_d e[i, d] * g(e)[i, d] for the
input embeddings e (explanation.py). Rules the attention kernels apply are numbers in one table,
kernels/rules.py (ATTENTION_FACTORS, re-exported here); the rules applied around modules live below as functions
(uniform_product, GammaLinear, final_softcap_identity, cosine_norm_identity) or as the `lrp` flag of the fused ops.

Adding a rule: a Rule row in INDEX; its gradient as a function here (or a factor in kernels/rules.py when the
attention kernels apply it); the float64 form in reference.py for the tests; and, if a module kind takes it, a
Replacement in models/common.py with the family maps (models/) naming the classes.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnlrp_fast.kernels.rules import ATTENTION_FACTORS, RULES, SOFTCAP_IDENTITY

__all__ = ["Rule", "INDEX", "RULES", "ATTENTION_FACTORS", "SOFTCAP_IDENTITY", "half_gradient", "uniform_product",
           "identity_activation", "split_product", "gated_split", "plain_norm", "GammaLinear", "final_softcap_identity",
           "cosine_norm_identity", "rule_for"]


@dataclass(frozen=True)
class Rule:
    name: str
    applies_to: str
    source: str                 # where it is derived
    modified_gradient: str      # g_in in terms of g_out
    fast_path: str              # where the fast implementation lives


INDEX = (
    Rule("epsilon", "linear layers, convolutions, residual additions, RoPE, embeddings",
         "LRP-epsilon with eps -> 0, bias absorbed (AttnLRP sec. 3)", "unchanged (the exact gradient)",
         "nothing to do: autograd"),
    Rule("uniform (bilinear)", "Q K^T and P V in attention (both factors depend on the input)",
         "AttnLRP Prop. 3.2 (uniform epsilon rule on a product)",
         "each factor's gradient halved: dV x 1/2, dQ and dK x 1/4 with the softmax below",
         "kernels/rules.py ATTENTION_FACTORS -> kernels/attention_bwd.py, bindings/torch_path.py (chunked), "
         "bindings/sdpa.py (torch's fused kernels' exact gradients times the factors)"),
    Rule("Taylor (softmax)", "the attention softmax",
         "AttnLRP Prop. 3.1: R_in = x (R_out - s sum R_out)", "unchanged (the exact softmax gradient)",
         "kernels/attention_bwd.py (dS = P (dP - delta)), bindings/torch_path.py, bindings/sdpa.py (torch's "
         "fused kernels)"),
    Rule("CP-LRP", "attention weights (rule='cp')", "Ali et al. 2022 (conservative propagation)",
         "P held constant: dQ = dK = 0, dV exact", "kernels/rules.py ATTENTION_FACTORS"),
    Rule("identity (softcap)", "the attention logit softcap c tanh(s / c) under rule='attnlrp'",
         "AttnLRP sec. 3.3 (identity rule on element-wise nonlinearities)", "tanh' replaced by tanh(s/c) c / s",
         "kernels/attention_common.py softcap_grad_factor, bindings/torch_path.py (SOFTCAP_IDENTITY)"),
    Rule("identity (final softcap)", "Gemma-2/3's final logit softcap", "as above",
         "g(pre) = g(capped) capped / pre", "rules.py final_softcap_identity, used by explanation.py"),
    Rule("identity (normaliser)", "RMSNorm, LayerNorm", "AttnLRP sec. 3.3",
         "gradient stopped through the variance/std only (rstd constant; centering stays linear)",
         "kernels/norm.py (LRP constexpr), bindings/norm.py rms_norm / layer_norm(lrp=True)"),
    Rule("identity (normaliser, any)", "any other norm: an affine map of (x - mean) / std or x / rms over the last "
         "dim, with or without weight, weight offset or bias", "AttnLRP sec. 3.3",
         "as above", "rules.py plain_norm (plain torch), used by models/generic.py NormReplacement"),
    Rule("identity (activation)", "SiLU, GELU (exact and tanh), tanh, ReLU; CLIP's QuickGELU", "AttnLRP sec. 3.3",
         "g_in = g_out f(x) / x", "kernels/glu.py act_and_factor, bindings/glu.py activation(lrp=True); "
         "QuickGELU: models/common.py quick_gelu (plain torch, the sigmoid held constant)"),
    Rule("identity (activation, any)", "any other element-wise activation (ReLU^2, xIELU, ...), in MLPs, GLUs and "
         "experts", "AttnLRP sec. 3.3", "g_in = g_out f(x) / x (0 where x = 0)",
         "rules.py identity_activation (plain torch), used by models/generic.py and models/moe.py"),
    Rule("uniform (gated product, any)", "f(gate) * h(up) for element-wise f, h (experts' own gate functions: "
         "clamped SwiGLU, GPT-OSS's (up + 1) * glu; torch's GLU a * sigmoid(b))",
         "AttnLRP Prop. 3.2 with the identity rule on f and h",
         "each factor x_k gets g_z z / (2 x_k): half of z's relevance each", "rules.py split_product, used by "
         "models/moe.py; gated_split (nn.GLU / F.glu), used by models/generic.py and models/eager_rules.py"),
    Rule("uniform (GLU)", "act(gate) * up in GLU MLPs", "AttnLRP Prop. 3.2 with the identity rule on act",
         "dgate = 1/2 g up act(gate)/gate, dup = 1/2 g act(gate)", "kernels/glu.py, bindings/glu.py glu_product"),
    Rule("uniform (routing)", "routing weight * expert output in mixture-of-experts layers", "AttnLRP Prop. 3.2",
         "each factor's gradient halved", "rules.py uniform_product, used by models/moe.py ExpertsReplacement"),
    Rule("MambaLRP (recurrence)", "state-space, gated delta-rule and RWKV mixers (Mamba, Mamba-2, gated DeltaNet, "
         "RWKV's WKV)", "Jafari et al. 2024, MambaLRP (NeurIPS)",
         "the recurrence's input-dependent coefficients held constant (no gradient): the mixer linear in its values",
         "models/recurrent.py (the scan's coefficient arguments detached; the rest of the mixer under "
         "models/eager_rules.py)"),
    Rule("gamma", "ViT linear layers (optional, gamma=...)", "Montavon et al. 2019 (LRP-gamma)",
         "g_x = (W + gamma W+)^T (y g_y / z_gamma)", "rules.py GammaLinear, used by models/common.py"),
    Rule("identity (cosine target)", "a cosine-similarity target", "AttnLRP sec. 3.3 (normalisations)",
         "the norm held constant: cosine linear in the pooled embedding", "rules.py cosine_norm_identity"),
)


def rule_for(name):
    """The INDEX row called `name`."""
    for r in INDEX:
        if r.name == name:
            return r
    raise KeyError(f"no rule {name!r}; rules: {[r.name for r in INDEX]}")


def half_gradient(x):
    """Identity in the forward, half of the gradient in the backward."""
    return x * 0.5 + (x * 0.5).detach()


def uniform_product(a, b, lrp):
    """a * b; under LRP the uniform rule: each factor gets half of the gradient."""
    return half_gradient(a) * half_gradient(b) if lrp else a * b


def _ratio(num, den):
    """num / den, 0 where den == 0."""
    zero = den == 0
    return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, torch.ones_like(den), den))


def identity_activation(x, f, lrp):
    """f(x) for an element-wise f; under LRP the identity rule: the value f(x), the gradient g_out * f(x) / x (0 where
    x = 0), so that x * g_in == f(x) * g_out element-wise. f is evaluated without a graph."""
    if not lrp:
        return f(x)
    with torch.no_grad():
        y = f(x)
    return y + (x - x.detach()) * _ratio(y, x).to(x.dtype)


def split_product(z, factors, lrp):
    """z, a product of element-wise functions of `factors` (z = f(a) * h(b)), passed on with its value; under LRP each
    factor x_k gets the gradient g_z * z / (K x_k) (K factors): the uniform rule on the product with the identity
    rule on each function, so that each factor's relevance is z * g_z / K. Without LRP: z with its own graph."""
    if not lrp:
        return z
    value = z.detach()
    out = value
    for x in factors:
        out = out + (x - x.detach()) * (_ratio(value, x) / len(factors)).to(x.dtype)
    return out


def gated_split(x, dim, lrp):
    """torch's GLU (nn.GLU, F.glu): a * sigmoid(b) for the halves a, b of x along `dim`; under LRP the uniform rule on
    the product with the identity rule on the sigmoid (split_product): each half gets half of the output's relevance."""
    a, b = x.chunk(2, dim=dim)
    return split_product(a * torch.sigmoid(b), (a, b), lrp)


def plain_norm(x, weight, bias, eps, *, center, offset=0.0, lrp, out_dtype=None, l2=False):
    """(x - mean) / std (center) or x / rms over the last dim, in float32 (or x's wider dtype), times
    (offset + weight) plus bias when given (l2: x / sqrt(sum x^2 + eps), nGPT's unit sphere); under LRP the
    identity rule on the normaliser: std / rms held constant (the centering stays linear)."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if center:
        xf = xf - xf.mean(-1, keepdim=True)
    squares = xf.pow(2)
    rstd = torch.rsqrt((squares.sum(-1, keepdim=True) if l2 else squares.mean(-1, keepdim=True)) + eps)
    y = xf * (rstd.detach() if lrp else rstd)
    if weight is not None:
        y = y * (offset + weight.to(xf.dtype))
    if bias is not None:
        y = y + bias.to(xf.dtype)
    return y.to(out_dtype or x.dtype)


class GammaLinear(torch.autograd.Function):
    """y = W x + b; backward: the gamma rule g_x = (W + g W+)^T (y * g_y / z), z = (W + g W+) x + (b + g b+)."""

    @staticmethod
    def forward(ctx, x, weight, bias, gamma):
        ctx.save_for_backward(x, weight, bias)
        ctx.gamma = gamma
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, gy):
        x, weight, bias = ctx.saved_tensors
        w_g = weight + ctx.gamma * weight.clamp(min=0)
        b_g = None if bias is None else bias + ctx.gamma * bias.clamp(min=0)
        y = F.linear(x, weight, bias).float()
        z = F.linear(x, w_g, b_g).float()
        z = z + 1e-6 * torch.where(z >= 0, 1.0, -1.0)
        gx = F.linear((y * gy.float() / z).to(x.dtype), w_g.t())
        return gx, None, None, None


def final_softcap_identity(g_capped, capped, pre):
    """The identity rule on a final logit softcap capped = c tanh(pre / c): the gradient of `pre` is
    g_capped * capped / pre (1 where pre = 0)."""
    ratio = torch.where(pre == 0, torch.ones_like(pre), capped / torch.where(pre == 0, 1.0, pre))
    return g_capped * ratio.detach()


def cosine_norm_identity(pooled, other):
    """cos(pooled, other) for a fixed unit vector `other`, with the norm of `pooled` held constant in the backward
    (as AttnLRP treats normalisations): linear in `pooled`, so all of it reaches the inputs (through the norm,
    input x gradient would be 0: a unit vector does not change when its input is scaled)."""
    return (pooled.float() * other).sum(-1) / pooled.float().norm(dim=-1).detach()
