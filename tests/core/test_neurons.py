"""Hidden neurons (attnlrp_fast/neurons.py, targets.Neuron): explaining a neuron's activation against the same seed
put on the activation by hand (float64, every rule) and against plain autograd; interventions against edited
weights (forward, generate, explain, offload), the model restored after; a neuron's vocabulary against the
unembedding computed by hand; the top-activating windows of a corpus against direct forwards."""

import copy

import pytest
import torch

import attnlrp_fast as af
from attnlrp_fast.kernels import interpreting
from helpers import rel_err
from tiny_models import build, inputs

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")

# the MLP neurons as each family's down projection reads them
DOWN = {"llama": "model.layers.1.mlp.down_proj", "phi3": "model.layers.1.mlp.down_proj",
        "gpt2": "transformer.h.1.mlp.c_proj", "qwen2": "model.layers.0.mlp.down_proj"}


def _latent(family):
    return DOWN[family] + ":input"


def _by_hand(model, x, latent, index, position, rule, backend="torch"):
    """The relevance of the input tokens for the activation, with the seed put on the activation by hand: the rule's
    modified gradient of act[:, position, index] at the input embeddings, times them."""
    name, _, where = latent.partition(":")
    seen = {}

    def leaf(module, args, out):
        seen["x"] = out.detach().requires_grad_(True)
        return seen["x"] * 1.0

    def keep(module, *args):
        seen["a"] = args[0][0] if where == "input" else args[1]

    module = model.get_submodule(name)
    hooks = [model.get_input_embeddings().register_forward_hook(leaf),
             module.register_forward_pre_hook(keep) if where == "input" else module.register_forward_hook(keep)]
    try:
        with af.lrp(model, rule=rule, backend=backend), torch.enable_grad():
            model(**x)
            a = seen["a"]
            act = a[:, position, list(index)].sum() if position is not None else a[..., list(index)].sum()
            (g,) = torch.autograd.grad(act, seen["x"])
    finally:
        for h in hooks:
            h.remove()
    return (seen["x"] * g).sum(-1).detach(), a[..., list(index)].detach()


@pytest.mark.parametrize("family, rule", [("llama", "attnlrp"), ("llama", "cp"), ("llama", "grad"), ("gpt2", "attnlrp"),
                                          ("phi3", "attnlrp"), ("phi3", "cp")])
def test_neuron_target_equals_the_seed_put_by_hand(family, rule):
    model = build(family, dtype=torch.float64)
    x = inputs(family, batch=2, length=13, seed=3)
    latent, index = _latent(family), (5, 17)
    e = af.explain(model, **x, target=af.neuron(latent, index, position=9), rule=rule, backend="torch")
    ref, act = _by_hand(model, x, latent, index, 9, rule)
    assert e.relevance.shape == (2, 13)
    assert rel_err(e.relevance.double(), ref) < 1e-6
    assert torch.allclose(e.target_logit.double(), act[:, 9].sum(-1).float().double(), rtol=1e-6)
    assert e.target_ids.tolist() == [[5, 17], [5, 17]] and e.positions.tolist() == [9, 9]
    # summed over every position
    e_all = af.explain(model, **x, target=af.neuron(latent, 17), rule=rule, backend="torch")
    ref_all, act = _by_hand(model, x, latent, (17,), None, rule)
    assert rel_err(e_all.relevance.double(), ref_all) < 1e-6 and e_all.positions is None
    assert torch.allclose(e_all.target_logit.double(), act.sum((1, 2)), rtol=1e-6)


@needs_interpreter
def test_neuron_target_on_the_kernels():
    model = build("llama")
    x = inputs("llama", batch=2, length=13, seed=4)
    target = af.neuron(_latent("llama"), 7, position="last")
    e = af.explain(model, **x, target=target, backend="triton")
    ref, _ = _by_hand(build("llama", dtype=torch.float64), x, _latent("llama"), (7,), 12, "attnlrp")
    assert rel_err(e.relevance.double(), ref) < 1e-4


def test_neuron_target_under_grad_is_gradient_times_input_by_plain_autograd():
    """No engine at all in the reference: torch's own autograd through the HF model."""
    model = build("qwen2", dtype=torch.float64)
    x = inputs("qwen2", batch=1, length=10, seed=5)
    e = af.explain(model, **x, target=af.neuron("model.layers.0.mlp.down_proj:input", 3, position=6), rule="grad",
                   backend="torch")
    emb = model.get_input_embeddings()(x["input_ids"]).detach().requires_grad_(True)
    seen = {}
    h = model.get_submodule("model.layers.0.mlp.down_proj").register_forward_pre_hook(
        lambda m, a: seen.__setitem__("a", a[0]))
    try:
        model(inputs_embeds=emb)
    finally:
        h.remove()
    (g,) = torch.autograd.grad(seen["a"][0, 6, 3], emb)
    assert rel_err(e.relevance.double(), (emb * g).sum(-1).detach()) < 1e-6


def test_neuron_target_with_padding_reads_each_rows_real_tokens():
    model = build("llama", dtype=torch.float64)
    ids = inputs("llama", batch=1, length=9, seed=6)["input_ids"]
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 3)], 1).long()
    target = af.neuron(_latent("llama"), 11)   # summed over the real positions
    alone = af.explain(model, input_ids=ids, target=target, backend="torch")
    both = af.explain(model, input_ids=padded, attention_mask=mask, target=target, backend="torch")
    assert rel_err(both.relevance[:, :9].double(), alone.relevance.double()) < 1e-6
    assert torch.allclose(both.target_logit, alone.target_logit, rtol=1e-6)
    last = af.explain(model, input_ids=padded, attention_mask=mask, target=af.neuron(_latent("llama"), 11, "last"),
                      backend="torch")
    assert last.positions.tolist() == [8]


def test_neuron_target_errors_name_the_problem():
    model = build("llama")
    x = inputs("llama")
    with pytest.raises(ValueError, match="outside latent .* 48 features"):
        af.explain(model, **x, target=af.neuron(_latent("llama"), 48))
    with pytest.raises(ValueError, match="no module named 'model.layers.7"):
        af.explain(model, **x, target=af.neuron("model.layers.7.mlp.down_proj:input", 0))
    # the engine runs a gated MLP's activation inside its fused op: the hint names the down projection
    with pytest.raises(ValueError, match="did not run.*model.layers.1.mlp.down_proj:input"):
        af.explain(model, **x, target=af.neuron("model.layers.1.mlp.act_fn", 0))
    with pytest.raises(ValueError, match="not with reasoning_span"):
        af.explain(model, **x, target=af.neuron(_latent("llama"), 0), reasoning_span=(5, 8))
    with pytest.raises(ValueError, match="outside the sequence"):
        af.explain(model, **x, target=af.neuron(_latent("llama"), 0, position=40))
    with pytest.raises(TypeError, match="neuron index"):
        af.neuron(_latent("llama"), "three")
    with pytest.raises(TypeError, match="position"):
        af.neuron(_latent("llama"), 1, position=1.5)
    with pytest.raises(ValueError, match="no neuron index"):
        af.neuron(_latent("llama"), [])


# --- interventions -----------------------------------------------------------------------------------------------
def _zeroed_column(model, down, j, factor=0.0):
    """A copy of the model whose down projection's input feature j is scaled by `factor` in its weights."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        w = m.get_submodule(down).weight
        if type(m.get_submodule(down)).__name__ == "Conv1D":
            w[j] *= factor
        else:
            w[:, j] *= factor
    return m


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_intervene_scales_like_the_edited_weights_and_restores_the_model(family):
    model = build(family, dtype=torch.float64)
    x = inputs(family, batch=2, length=12, seed=7)
    before = model(**x).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    latent = _latent(family)
    with af.intervene(model, {latent: {4: af.scale(0.0), (9, 10): af.scale(2.5)}}) as h:
        during = model(**x).logits
        assert h.sites == {latent: 1}
    edited = _zeroed_column(_zeroed_column(_zeroed_column(model, DOWN[family], 4), DOWN[family], 9, 2.5),
                            DOWN[family], 10, 2.5)
    assert rel_err(during, edited(**x).logits) < 1e-12
    assert not torch.allclose(during, before)
    assert torch.equal(model(**x).logits, before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_intervene_set_add_and_positions_reach_the_module():
    model = build("llama")
    x = inputs("llama", batch=2, length=10, seed=8)
    latent = _latent("llama")
    down = model.get_submodule(DOWN["llama"])
    seen = {}
    keep = down.register_forward_pre_hook(lambda m, a: seen.__setitem__("a", a[0].detach().clone()))
    try:
        model(**x)
        plain = seen["a"]
        with af.intervene(model, {latent: {3: 1.5, 6: af.add(-2.0, positions=[0, -1]), 8: af.set_to(0.0, [4])}}):
            out = model(**x).logits
            # (a hook registered after the intervention's sees the edited input)
            keep.remove()
            keep = down.register_forward_pre_hook(lambda m, a: seen.__setitem__("a", a[0].detach().clone()))
            model(**x)
        edited = seen["a"]
    finally:
        keep.remove()
    expect = plain.clone()
    expect[..., 3] = 1.5
    expect[:, [0, 9], 6] -= 2.0
    expect[:, 4, 8] = 0.0
    assert torch.equal(edited, expect)
    # the edits at position 4 and later change nothing before it (causal)
    base = model(**x).logits
    assert not torch.allclose(out[:, 4:], base[:, 4:])


def test_intervene_in_generate_and_in_explain():
    model = build("llama")
    x = inputs("llama", batch=1, length=8, seed=9)
    latent, down = _latent("llama"), DOWN["llama"]
    off = _zeroed_column(model, down, 5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with af.intervene(model, {latent: {5: 0.0}}):
        gen = model.generate(**x, **kw)
        e = af.explain(model, **x, backend="torch")
    assert torch.equal(gen, off.generate(**x, **kw))
    e_off = af.explain(off, **x, backend="torch")
    assert rel_err(e.relevance, e_off.relevance) < 1e-5
    # an absolute position edited in generate's prefill only: the same as a whole-sequence forward without a cache
    with af.intervene(model, {latent: {5: af.scale(30.0, positions=[3])}}):
        gen = model.generate(**x, **kw)
        ids = x["input_ids"]
        for _ in range(6):
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    assert torch.equal(gen, ids)


def test_intervene_under_offload_and_checkpoint_matches_the_plain_explanation():
    model = build("llama")
    x = inputs("llama", batch=2, length=11, seed=10)
    edits = {_latent("llama"): {2: af.scale(3.0), 7: 0.25}}
    with af.intervene(model, edits):
        plain = af.explain(model, **x, backend="torch")
        offloaded = af.explain(model, **x, offload="cpu", backend="torch")
        chunked = af.explain(model, **x, checkpoint=True, mlp_chunk=4, backend="torch")
    assert rel_err(offloaded.relevance, plain.relevance) < 1e-5
    assert rel_err(chunked.relevance, plain.relevance) < 1e-5
    assert rel_err(plain.relevance, af.explain(model, **x, backend="torch").relevance) > 1e-3


def test_intervene_errors_name_the_problem():
    model = build("llama")
    x = inputs("llama")
    with pytest.raises(ValueError, match="no module named"):
        with af.intervene(model, {"model.layers.9.mlp.down_proj:input": {0: 0.0}}):
            pass
    with pytest.raises(ValueError, match="outside latent .* 48 features"):
        with af.intervene(model, {_latent("llama"): {48: 0.0}}):
            model(**x)
    with pytest.raises(TypeError, match="a number"):
        with af.intervene(model, {_latent("llama"): {1: "off"}}):
            pass
    with pytest.raises(TypeError, match="int index"):
        with af.intervene(model, {_latent("llama"): {1.5: 0.0}}):
            pass
    with pytest.raises(ValueError, match="finite"):
        af.scale(float("nan"))
    # under the engine a gated MLP's activation module does not run: an error, not a silent no-op
    with pytest.raises(RuntimeError, match="did not run.*down_proj:input"):
        with af.intervene(model, {"model.layers.1.mlp.act_fn": {0: 0.0}}):
            af.explain(model, **x)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# --- reading a neuron --------------------------------------------------------------------------------------------
def test_neuron_vocabulary_is_the_down_column_through_the_final_norm_onto_the_unembedding():
    model = build("llama")
    v = af.neuron_vocabulary(model, _latent("llama"), 13, k=5)
    d = model.model.layers[1].mlp.down_proj.weight[:, 13].double()
    scores = model.lm_head.weight.double() @ (model.model.norm.weight.double() * d)
    assert v.top_ids == scores.topk(5).indices.tolist() and v.bottom_ids == (-scores).topk(5).indices.tolist()
    assert torch.allclose(torch.tensor(v.top_scores).double(), scores.topk(5).values, rtol=1e-5)
    assert v.down_projection == DOWN["llama"]
    # the same neuron named from its gate projection's output (the parent MLP's down projection)
    assert af.neuron_vocabulary(model, "model.layers.1.mlp.gate_proj", 13, k=5).top_ids == v.top_ids
    # GPT-2: Conv1D (in, out) weights, a LayerNorm (centred) at the end
    g = build("gpt2")
    v = af.neuron_vocabulary(g, "transformer.h.0.mlp.act", 40, k=3)
    d = g.transformer.h[0].mlp.c_proj.weight[40].double()
    scores = g.lm_head.weight.double() @ (g.transformer.ln_f.weight.double() * (d - d.mean()))
    assert v.top_ids == scores.topk(3).indices.tolist()
    with pytest.raises(ValueError, match="no single down projection"):
        af.neuron_vocabulary(model, "model.layers.1.mlp", 0)
    with pytest.raises(ValueError, match="outside latent"):
        af.neuron_vocabulary(model, _latent("llama"), 48)


def test_top_activating_keeps_the_k_strongest_windows_and_explains_them(lm_dir):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    tok = tf.AutoTokenizer.from_pretrained(lm_dir)
    texts = ["The reservoir was built in 1931 after a dry summer.", "A valve failed during the storm in March.",
             "Zoë Müller measured 14 °C at the outlet.", "Budgets rose by 4 percent. " * 3]
    latent = "model.layers.1.mlp.down_proj:input"
    found = af.top_activating(model, tok, latent, 21, texts, k=4, window=6, batch_size=3, max_length=11,
                              distinct=False, backend="torch", progress=False)
    # every (text, position) by a direct forward of each 11-token piece
    every, strongest = [], []   # every (activation, text, position); each piece's strongest
    down = model.get_submodule("model.layers.1.mlp.down_proj")
    for t, text in enumerate(texts):
        ids = tok(text)["input_ids"]
        for s in range(0, len(ids), 11):
            seen = {}
            h = down.register_forward_pre_hook(lambda m, a: seen.__setitem__("a", a[0]))
            with torch.no_grad():
                model(input_ids=torch.tensor([ids[s:s + 11]]))
            h.remove()
            every += [(float(a), t, s + p) for p, a in enumerate(seen["a"][0, :, 21])]
            strongest.append(max(every[-len(ids[s:s + 11]):]))
    every.sort(key=lambda r: -r[0])
    strongest.sort(key=lambda r: -r[0])
    distinct = af.top_activating(model, tok, latent, 21, texts, k=4, window=6, batch_size=3, max_length=11,
                                 explain=False, progress=False)
    assert [(w.text_index, w.position) for w in distinct] == [(t, p) for _, t, p in strongest[:4]]
    assert all(w.relevance is None for w in distinct)
    assert [(w.text_index, w.position) for w in found] == [(t, p) for _, t, p in every[:4]]
    assert all(abs(w.activation - a) < 1e-5 for w, (a, _, _) in zip(found, every))
    for w in found:
        ids = tok(texts[w.text_index])["input_ids"]
        assert w.input_ids.shape[1] <= 6 and w.input_ids[0, -1].item() == ids[w.position]
        assert w.target == w.input_ids.shape[1] - 1 and len(w.tokens) == w.input_ids.shape[1]
        e = af.explain(model, input_ids=w.input_ids, target=af.neuron(latent, 21, position=w.target), backend="torch")
        assert torch.allclose(w.relevance, e.relevance[0]) and abs(w.window_activation - float(e.target_logit)) < 1e-6
    with pytest.raises(ValueError, match="no text"):
        af.top_activating(model, tok, latent, 21, [""], progress=False)
    with pytest.raises(ValueError, match="outside latent"):
        af.top_activating(model, tok, latent, 999, texts, progress=False)
