"""The shipped ground truth for neuron explanations (evaluation/concept.py): a hand-built tiny Llama whose one
planted MLP neuron decides "arctic" against "desert". AttnLRP's most relevant neuron is the planted one on held-out
prompts, switching it off or on flips the answer, the neuron's own explanation points at the cold words, its
vocabulary is the answer it writes, and its top-activating windows hold cold words."""

import pytest
import torch

import attnlrp_fast as af
from attnlrp_fast.evaluation import concept as c
from attnlrp_fast.kernels import interpreting

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
LATENTS = [f"model.layers.{i}.mlp.down_proj:input" for i in range(c.LAYERS)]


@pytest.fixture(scope="module")
def model():
    return c.load()


def test_the_shipped_model_is_the_one_the_recipe_builds(model):
    built = c.build_model()
    assert all(torch.equal(p, built.state_dict()[k]) for k, p in model.state_dict().items())
    assert c.make_tokenizer()("ice river ?")["input_ids"] == [c.BOS, c.WORDS.index("ice"), c.WORDS.index("river"),
                                                              c.QUERY]


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_interpreter), "torch"])
def test_attnlrp_finds_the_planted_neuron_first_on_held_out_prompts(model, backend):
    # (the kernels run in Triton's interpreter here: fewer prompts there)
    ids, mask, _ = c.prompts(48 if backend == "torch" else 8, seed=2026, cold=True)
    assert (c.answers(model, ids, mask) == c.ARCTIC).all()
    e = af.explain(model, input_ids=ids, attention_mask=mask, latent=LATENTS, backend=backend)
    assert (e.target_ids == c.ARCTIC).all()
    per_neuron = torch.cat([e.latent[n].sum(1) for n in LATENTS], -1)          # (B, layers x neurons)
    top = per_neuron.argmax(-1)
    assert (top == (c.LAYERS - 1) * c.INTER + c.PLANTED).all()
    # by a wide margin: the planted neuron holds nearly all of the answer's logit
    share = per_neuron[:, (c.LAYERS - 1) * c.INTER + c.PLANTED] / e.target_logit
    assert (share > 0.9).all()


def test_switching_the_planted_neuron_flips_the_answer(model):
    cold_ids, cold_mask, _ = c.prompts(32, seed=7, cold=True)
    with af.intervene(model, {c.LATENT: {c.PLANTED: 0.0}}):
        assert (c.answers(model, cold_ids, cold_mask) == c.DESERT).all()
    warm_ids, warm_mask, _ = c.prompts(32, seed=8, cold=False)
    assert (c.answers(model, warm_ids, warm_mask) == c.DESERT).all()
    # on at the last position of prompts without a cold word (one length at a time: -1 is each call's last token)
    for n in warm_mask.sum(1).unique().tolist():
        rows = warm_mask.sum(1) == n
        with af.intervene(model, {c.LATENT: {c.PLANTED: af.set_to(5.0, positions=[-1])}}):
            assert (c.answers(model, warm_ids[rows, :n], warm_mask[rows, :n]) == c.ARCTIC).all()
    # a neuron chosen at random does not
    with af.intervene(model, {c.LATENT: {c.PLANTED + 1: 0.0}}):
        assert (c.answers(model, cold_ids, cold_mask) == c.ARCTIC).all()


def test_the_neurons_explanation_points_at_the_cold_words(model):
    ids, mask, where = c.prompts(24, seed=11, cold=True)
    e = af.explain(model, input_ids=ids, attention_mask=mask, target=af.neuron(c.LATENT, c.PLANTED, "last"),
                   backend="torch")
    # the last token "?" takes the share of the neuron's up projection and threshold (its own constant dimension);
    # of the words before it, the cold words hold all the relevance, every other word none
    last = mask.sum(1) - 1
    words = (mask == 1) & (torch.arange(ids.shape[1]) < last[:, None])
    r = e.relevance.masked_fill(~words, 0.0)
    assert where[torch.arange(24), r.argmax(-1)].all()
    assert (r[where] > 0.1).all() and (r[~where].abs() < 1e-3 * e.target_logit.abs().max()).all()


def test_the_planted_neurons_vocabulary_and_top_activating_windows(model):
    tok = c.make_tokenizer()
    v = af.neuron_vocabulary(model, c.LATENT, c.PLANTED, k=3, tokenizer=tok)
    assert v.top_ids[0] == c.ARCTIC and v.top_tokens[0] == "arctic"
    ids, mask, where = c.prompts(6, seed=12, cold=True)
    warm, wmask, _ = c.prompts(6, seed=13, cold=False)
    texts = [" ".join(c.WORDS[t] for t in row[1:int(m.sum())].tolist()) for row, m in
             zip(torch.cat([ids, warm]), torch.cat([mask, wmask]))]
    found = af.top_activating(model, tok, c.LATENT, c.PLANTED, texts, k=4, window=5, backend="torch",
                              progress=False)
    assert all(w.text_index < 6 for w in found)                # the cold prompts
    assert all(any(t in c.COLD for t in w.tokens) for w in found)
