"""Faithfulness evaluation: perturbation curves and ABPC on models whose true relevance is known, pointing,
and every baseline attribution method against an independent computation."""

from types import SimpleNamespace

import pytest
import torch
import transformers as tf

import attnlrp_fast as af
from attnlrp_fast.bindings.hf import attention_modules
from attnlrp_fast.evaluation import capture
from attnlrp_fast.evaluation import evaluate as ev
from tiny_models import build, inputs


class Additive(torch.nn.Module):
    """Class logits = sum over positions of c[pos] * (embedding . u_class) + bias: each token's contribution is
    known exactly, and zeroing its embedding removes exactly that contribution."""

    def __init__(self, vocab=30, dim=8, classes=3, length=12, seed=0, only=None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Embedding(vocab, dim)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(vocab, dim, generator=g))
        self.u = torch.randn(classes, dim, generator=g)
        self.c = torch.randn(length, generator=g).abs() + 0.1
        if only is not None:          # the answer depends on one known position
            self.c = torch.zeros(length)
            self.c[only] = 2.0
        self.bias = torch.randn(classes, generator=g)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, attention_mask=None):
        e = self.emb(input_ids)                                          # (B, N, D)
        return SimpleNamespace(logits=torch.einsum("bnd,cd,n->bc", e, self.u, self.c[:e.shape[1]]) + self.bias)

    def contributions(self, input_ids, cls):
        e = self.emb(input_ids).detach()
        return torch.einsum("bnd,d,n->bn", e, self.u[cls], self.c[:e.shape[1]])


def _ids(B=2, N=12, vocab=30, seed=1):
    return torch.randint(0, vocab, (B, N), generator=torch.Generator().manual_seed(seed))


def test_one_decisive_token_gives_the_analytic_curves():
    model = Additive(only=4)
    ids = _ids(B=1)
    n, steps = ids.shape[1], 4
    rel = torch.zeros(1, n)
    rel[0, 4] = 1.0
    c = ev.perturbation_curves(model, ids, rel, steps=steps)
    full = model(ids).logits[0].detach()
    cls = int(full.argmax())
    s0, s1 = float(full[cls].detach()), float(model.bias[cls])                     # with / without the decisive token
    assert c.morf[0].tolist() == pytest.approx([s0] + [s1] * steps, rel=1e-5)   # removed at the first step
    assert c.lerf[0].tolist() == pytest.approx([s0] * steps + [s1], rel=1e-5)   # removed only at the end
    expected = (s0 - s1) * (1 - 1 / steps)                              # trapezoids of LeRF - MoRF
    assert float(c.abpc[0]) == pytest.approx(expected, rel=1e-5)
    assert c.fractions == [0, 0.25, 0.5, 0.75, 1.0] and int(c.eligible[0]) == n


def test_the_true_relevance_beats_every_shuffle():
    model = Additive(seed=3)
    ids = _ids(B=3, seed=4)
    target, _ = ev.fix_target(model, ids)
    true = torch.stack([model.contributions(ids[b:b + 1], int(target[b]))[0] for b in range(3)])
    best = ev.perturbation_curves(model, ids, true, target=target, steps=12).abpc
    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        shuffled = torch.stack([r[torch.randperm(r.numel(), generator=g)] for r in true])
        worse = ev.perturbation_curves(model, ids, shuffled, target=target, steps=12).abpc
        assert (best > worse).all(), (best, worse)
    flipped = ev.perturbation_curves(model, ids, -true, target=target, steps=12).abpc
    assert torch.allclose(flipped, -best, rtol=1e-4, atol=1e-5)         # the order reversed swaps the curves


def test_constant_relevance_scores_like_random_ties():
    model = Additive(seed=6)
    ids = _ids(B=1, seed=7)
    a = ev.perturbation_curves(model, ids, torch.zeros(1, 12), steps=6, seed=1).abpc
    b = ev.perturbation_curves(model, ids, torch.zeros(1, 12), steps=6, seed=2).abpc
    assert not torch.equal(a, b)              # ties broken at random, by the seed
    assert torch.equal(a, ev.perturbation_curves(model, ids, torch.zeros(1, 12), steps=6, seed=1).abpc)


def test_eligible_tokens_are_the_only_ones_removed():
    model = Additive(only=0)
    ids = _ids(B=1)
    eligible = torch.ones(1, 12, dtype=torch.bool)
    eligible[0, 0] = False                                      # the decisive token is protected
    c = ev.perturbation_curves(model, ids, torch.arange(12.0)[None], steps=3, eligible=eligible)
    assert torch.allclose(c.morf, c.morf[:, :1].expand_as(c.morf)) and torch.allclose(c.abpc, torch.zeros(1))
    assert int(c.eligible[0]) == 11


def test_token_replacement_perturbs_ids():
    model = Additive(only=2)
    ids = _ids(B=1)
    rel = torch.zeros(1, 12)
    rel[0, 2] = 1.0
    c = ev.perturbation_curves(model, ids, rel, steps=2, perturb="token", replace_id=0)
    replaced = ids.clone()
    replaced[0, 2] = 0
    cls = int(model(ids).logits[0].argmax())
    assert float(c.morf[0, 1]) == pytest.approx(float(model(replaced).logits[0, cls].detach()))
    with pytest.raises(ValueError, match="replace_id"):
        ev.perturbation_curves(model, ids, rel, perturb="token")


def test_pointing_and_rank():
    rel = torch.tensor([[0.1, 0.9, 0.3, 0.2], [0.5, 0.1, 0.4, 0.8]])
    evidence = torch.tensor([[0, 1, 0, 0], [0, 1, 1, 0]]).bool()
    hit, rank = ev.pointing(rel, evidence)
    assert hit.tolist() == [True, False] and rank.tolist() == [1, 3]
    # candidates: a more relevant token outside them does not count
    hit, rank = ev.pointing(rel, evidence, candidates=torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]).bool())
    assert rank.tolist() == [1, 2]
    with pytest.raises(ValueError, match="no evidence"):
        ev.pointing(rel, torch.zeros(2, 4, dtype=torch.bool))


def test_bad_arguments_are_named():
    model = Additive()
    ids = _ids(B=1)
    with pytest.raises(ValueError, match="relevance has shape"):
        ev.perturbation_curves(model, ids, torch.zeros(1, 5))
    with pytest.raises(ValueError, match="NaN"):
        ev.perturbation_curves(model, ids, torch.full((1, 12), float("nan")))
    with pytest.raises(ValueError, match="perturb must be"):
        ev.perturbation_curves(model, ids, torch.zeros(1, 12), perturb="blur")
    with pytest.raises(ValueError, match="steps"):
        ev.perturbation_curves(model, ids, torch.zeros(1, 12), steps=0)
    with pytest.raises(ValueError, match="unknown method 'lime'"):
        ev.parse_method("lime")
    with pytest.raises(ValueError, match="backend in brackets"):
        ev.parse_method("random[triton]")
    assert ev.parse_method("attnlrp[triton]") == ("attnlrp", "triton") and ev.parse_method("cp") == ("cp", None)


# --- the attribution methods on real (tiny) HF models --------------------------------------------------------
@pytest.fixture(scope="module")
def llama():
    return build("llama", seed=11).double()


def test_rule_methods_are_explain(llama):
    ids = inputs("llama", batch=2, length=13, seed=2)["input_ids"]
    for method, rule in (("attnlrp", "attnlrp"), ("cp", "cp"), ("grad_x_input", "grad")):
        a = ev.attribute(llama, ids, method, backend="torch")
        e = af.explain(llama, input_ids=ids, rule=rule, backend="torch")
        torch.testing.assert_close(a.relevance, e.relevance)
        assert torch.equal(a.target, e.target_ids)


def test_integrated_gradients_is_complete_and_matches_a_plain_loop(llama):
    ids = inputs("llama", batch=2, length=9, seed=3)["input_ids"]
    # completeness: the attributions sum to f(x) - f(0) up to the Riemann error. RMSNorm makes f(a x) jump near
    # a = 0 (x / rms(x) for any a >> sqrt(eps)), which no 64-point rule resolves: a large eps keeps f smooth here.
    torch.manual_seed(13)
    smooth = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                rms_norm_eps=1.0, max_position_embeddings=64)).double().eval()
    with torch.no_grad():
        smooth.get_input_embeddings().weight.mul_(20)
    a = ev.attribute(smooth, ids, "integrated_gradients", ig_steps=64, ig_batch=16, backend="torch")
    emb = smooth.get_input_embeddings()
    zero = emb.register_forward_hook(lambda m, i, o: o * 0)
    try:
        f0 = ev.target_score(smooth, ids, target=a.target).value
    finally:
        zero.remove()
    gap = a.score - f0
    assert (gap.abs() > 1e-2).all()
    assert torch.allclose(a.relevance.double().sum(-1), gap.double(), rtol=2e-3, atol=1e-4)
    emb = llama.get_input_embeddings()
    b = ev.attribute(llama, ids, "integrated_gradients", ig_steps=8, ig_batch=5, backend="torch")
    # an independent loop over the path points, one autograd call each
    x = emb(ids).detach()
    total = torch.zeros_like(x)
    for k in range(8):
        alpha = (k + 0.5) / 8
        xa = (alpha * x).requires_grad_()
        logits = llama(inputs_embeds=xa, use_cache=False).logits[:, -1]
        grad, = torch.autograd.grad(logits.gather(-1, b.target[:, None]).sum(), xa)
        total += grad / 8
    loop = (x * total).sum(-1).float()
    torch.testing.assert_close(b.relevance, loop, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "gemma2", "bert"])
def test_attention_baseline_is_the_last_layers_weights(name):
    model = build(name, seed=12).double()
    x = inputs(name, batch=2, length=10, seed=4)
    ids = x["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0 if name == "bert" else 1        # right padding where a classifier allows it
    implementation = model.config._attn_implementation
    a = ev.attribute(model, ids, "attention", attention_mask=mask)
    assert model.config._attn_implementation == implementation        # the capture and its af.lrp undone
    eager = build(name, seed=12).double()
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        att = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[-1]   # (B, H, N, N)
    if name == "bert":                   # a classification head: from the first token
        want = att[:, :, 0].mean(1)
    else:
        want = att[:, :, -1].mean(1)
    want = want * mask
    torch.testing.assert_close(a.relevance, want.float(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(a.relevance.sum(-1), torch.ones(2), atol=1e-5)


def test_the_capture_records_the_module_asked_for_and_restores_the_model(llama):
    ids = inputs("llama", batch=1, length=7, seed=8)["input_ids"]
    modules = attention_modules(llama)
    with af.lrp(llama, "attnlrp", backend="torch"):
        first = capture.capture_attention(llama, modules[0], lambda: llama(input_ids=ids))
        last = capture.capture_attention(llama, modules[-1], lambda: llama(input_ids=ids))
        assert llama.config._attn_implementation == "attnlrp_fast"
        with pytest.raises(ZeroDivisionError):
            capture.capture_attention(llama, modules[0], lambda: 1 / 0)
        assert llama.config._attn_implementation == "attnlrp_fast"
        assert all(capture.RECORDER_ATTR not in vars(m) for m in modules)
    # the first layer's query is its projection of the embeddings (up to RoPE, which keeps each position's norm)
    a = modules[0]
    x = llama.model.layers[0].input_layernorm(llama.get_input_embeddings()(ids))
    q = a.q_proj(x).view(1, 7, -1, a.head_dim).transpose(1, 2)
    torch.testing.assert_close(first.query.norm(dim=-1), q.norm(dim=-1).detach())
    assert first.query.shape == last.query.shape == (1, 4, 7, 16) and first.key.shape == (1, 2, 7, 16)
    assert first.causal and first.key_padding_mask is None and not torch.allclose(first.query, last.query)


def test_the_capture_restores_each_sub_models_attention():
    """A model whose parts use different attention implementations gets each one back (also when its last
    attention did not run)."""
    config = tf.CLIPConfig(text_config=dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                            num_attention_heads=4, max_position_embeddings=16, bos_token_id=0,
                                            eos_token_id=1),
                           vision_config=dict(image_size=16, patch_size=8, hidden_size=32, intermediate_size=48,
                                              num_hidden_layers=1, num_attention_heads=4), projection_dim=16)
    model = tf.CLIPModel(config)
    model.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})
    during = []
    with pytest.raises(RuntimeError, match="did not run through"):
        capture.capture_attention(model, attention_modules(model)[-1],
                                  lambda: during.append(model.text_model.config._attn_implementation))
    assert during == [capture.NAME]
    assert model.text_model.config._attn_implementation == "eager"
    assert model.vision_model.config._attn_implementation == "sdpa"


def test_default_eligible_stops_at_the_target_and_leaves_the_mask_alone(llama):
    ids = inputs("llama", batch=1, length=8, seed=7)["input_ids"]
    mask = torch.ones_like(ids, dtype=torch.bool)
    eligible = ev.default_eligible(llama, ids, mask, None, 4)        # the target reads position 4
    assert eligible[0].tolist() == [True] * 5 + [False] * 3 and mask.all()


def test_random_is_seeded_and_masked(llama):
    ids = inputs("llama", batch=2, length=9, seed=5)["input_ids"]
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    a = ev.attribute(llama, ids, "random", attention_mask=mask, seed=3)
    b = ev.attribute(llama, ids, "random", attention_mask=mask, seed=3)
    other = ev.attribute(llama, ids, "random", attention_mask=mask, seed=4)
    assert torch.equal(a.relevance, b.relevance) and (a.relevance[0, :2] == 0).all() and (a.relevance[1] > 0).all()
    assert not torch.equal(a.relevance[1], other.relevance[1])             # the seed, not a fixed stream, decides


def test_evaluate_runs_every_method_on_the_same_perturbations(llama):
    model = llama.float()
    ids = inputs("llama", batch=2, length=11, seed=6)["input_ids"]
    evidence = torch.zeros_like(ids, dtype=torch.bool)
    evidence[:, 3] = True
    eligible = torch.ones_like(ids, dtype=torch.bool)
    eligible[:, :2] = False
    settings = ev.Perturbation(steps=4, seed=3)
    try:
        out = ev.evaluate(model, ids, ev.METHODS, evidence=evidence, eligible=eligible, ig_steps=8, backend="torch",
                          steps=4, seed=3)
        assert set(out) == set(ev.METHODS)
        target, score = ev.fix_target(model, ids)
        for m, r in out.items():   # each row is the public parts run one after the other with the same settings
            a = ev.attribute(model, ids, m, target=target, ig_steps=8, backend="torch", seed=3)
            c = ev.perturbation_curves(model, ids, a.relevance, target=target, eligible=eligible,
                                       perturbation=settings)
            _, rank = ev.pointing(a.relevance, evidence, eligible)
            assert r["abpc_per_row"] == pytest.approx(c.abpc.tolist(), rel=1e-5, abs=1e-6), m
            assert r["morf"] == pytest.approx(c.morf.mean(0).tolist(), rel=1e-5, abs=1e-6), m
            assert r["ranks"] == rank.tolist() and r["evidence_rank"] == pytest.approx(rank.float().mean().item())
            # nothing removed: every method starts from the same score, the model's on the input
            assert r["morf"][0] == pytest.approx(r["lerf"][0])
            assert r["morf"][0] == pytest.approx(score.mean().item(), rel=1e-5)
            assert r["morf"][-1] == pytest.approx(r["lerf"][-1])      # every eligible token removed: the same
    finally:
        llama.double()


def test_a_perturbation_is_one_object_or_its_fields():
    model = Additive(seed=9)
    ids = _ids(B=2, seed=10)
    rel = torch.randn(2, 12, generator=torch.Generator().manual_seed(11))
    settings = ev.Perturbation(steps=3, perturb="token", replace_id=0, batch_size=2, seed=5)
    a = ev.perturbation_curves(model, ids, rel, perturbation=settings)
    b = ev.perturbation_curves(model, ids, rel, steps=3, perturb="token", replace_id=0, batch_size=2, seed=5)
    zeroed = ev.perturbation_curves(model, ids, rel, steps=3)
    assert torch.equal(a.morf, b.morf) and torch.equal(a.lerf, b.lerf) and a.fractions == [0, 1 / 3, 2 / 3, 1]
    assert not torch.equal(a.morf, zeroed.morf)                          # the settings were used, not the defaults
    with pytest.raises(TypeError, match="not both"):
        ev.perturbation_curves(model, ids, rel, perturbation=settings, steps=3)


def test_callable_target_on_minilm_shape_model():
    """A callable target (a similarity) on an encoder: the rows of the perturbed batch are variants of one input."""
    model = tf.BertModel(tf.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=48)).eval()
    from attnlrp_fast.minilm import similarity_target

    ids = torch.randint(5, 50, (1, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    other = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(1)), dim=0)
    target = similarity_target(mask, other)
    out = ev.evaluate(model, ids, ["attnlrp", "attention", "random"], attention_mask=mask, target=target, steps=3,
                      backend="torch")
    with torch.no_grad():
        full = target(model(input_ids=ids, attention_mask=mask))
    for r in out.values():
        assert r["morf"][0] == pytest.approx(float(full), rel=1e-5)
