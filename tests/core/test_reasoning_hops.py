"""Multi-hop relevance through a reasoning span (attnlrp_fast/reasoning.py): one backward per hop equals the
definition done the slow way (one explanation per reasoning token, summed with the hop's weights), in float64."""

import warnings

import pytest
import torch

import attnlrp_fast as af
from tiny_models import VOCAB, build

SPAN = (7, 17)                      # reasoning tokens at positions 7 .. 16
TARGET = [(17, 5), (18, 9)]         # two answer tokens after it
N = 20


def _ids(batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, N), generator=g)


def slow_hops(model, ids, span, hops, seed, target=TARGET, **kw):
    """(hops + 1, B, N) by the definition: hop 0 explains the target; hop h + 1 sums, over reasoning tokens t, the
    explanation of token t's own logit (at position t - 1, seed 1) times w_t / z_t, w_t = hop h's relevance of t
    (its positive part for seed="positive"), z_t = that logit."""
    rows = []
    for b in range(ids.shape[0]):
        row = ids[b:b + 1]
        hop = [af.explain(model, input_ids=row, target=target, **kw).relevance[0].double()]
        per_token = []
        for t in range(*span):
            e = af.explain(model, input_ids=row, target=[(t - 1, int(row[0, t]))], **kw)
            per_token.append((e.relevance[0].double(), e.target_logit[0].double()))
        for _ in range(hops):
            w = hop[-1][span[0]:span[1]]
            w = w.clamp(min=0) if seed == "positive" else w
            hop.append(sum(w[i] / z * r for i, (r, z) in enumerate(per_token)))
        rows.append(torch.stack(hop))
    return torch.stack(rows, 1)


def _rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("name,seed,checkpoint", [("llama", "positive", False), ("llama", "signed", True),
                                                  ("gemma2", "positive", False), ("qwen3", "signed", False)])
def test_hops_equal_the_slow_definition(name, seed, checkpoint):
    """float64 tiny models (Gemma 2: final logit softcap under the identity rule); two rows, three hops."""
    model = build(name, dtype=torch.float64)
    ids = _ids(batch=2, seed=3)
    e = af.explain(model, input_ids=ids, target=TARGET, reasoning_span=SPAN, hops=3, reasoning_seed=seed,
                   backend="torch", checkpoint=checkpoint)
    ref = slow_hops(model, ids, SPAN, 3, seed, backend="torch")
    assert e.hop_relevance.shape == (4, 2, N)
    assert _rel_err(e.hop_relevance, ref) < 1e-5
    assert torch.equal(e.hop_relevance[0], e.relevance)
    # the fields derived from the hops
    s, end = SPAN
    assert torch.allclose(e.prompt_relevance[:, :s].double(), ref[:, :, :s].sum(0), rtol=1e-5, atol=1e-7)
    assert (e.prompt_relevance[:, s:] == 0).all()
    share = ref[:, :, s:end].sum(-1) / ref.sum(-1)
    assert torch.allclose(e.reasoning_share.double(), share, rtol=1e-4, atol=1e-6)   # (cancelling totals)
    assert e.reasoning_span == SPAN and e.reasoning_seed == seed and e.reasoning_skipped == 0


@pytest.mark.parametrize("name", ["mistral", "mixtral", "qwen2", "gemma", "gemma3_text", "phi3", "gpt2"])
def test_every_family_equals_the_slow_definition(name):
    """One row, two signed hops (Mixtral in float32: its grouped expert matmul takes no float64). A logit that is a
    small difference of large terms (Phi-3 here: 2.7e-4) divides its token's weight: the logits are read in the
    model's precision, float32 at least."""
    dtype = torch.float32 if name == "mixtral" else torch.float64
    model = build(name, dtype=dtype)
    ids = _ids(seed=2)
    e = af.explain(model, input_ids=ids, target=TARGET, reasoning_span=SPAN, hops=2, reasoning_seed="signed",
                   backend="torch")
    ref = slow_hops(model, ids, SPAN, 2, "signed", backend="torch")
    assert _rel_err(e.hop_relevance, ref) < (1e-5 if dtype == torch.float64 else 1e-4)


def test_grad_rule_applies_the_softcap_derivative():
    """Under rule="grad" the seed reads the capped logit and the softcap's exact derivative (Gemma 2)."""
    model = build("gemma2", dtype=torch.float64)
    ids = _ids(seed=4)
    e = af.explain(model, input_ids=ids, target=TARGET, reasoning_span=SPAN, hops=2, reasoning_seed="signed",
                   rule="grad", backend="torch")
    assert _rel_err(e.hop_relevance, slow_hops(model, ids, SPAN, 2, "signed", rule="grad", backend="torch")) < 1e-5


def test_triton_kernels_give_the_same_hops():
    """fp32 through the Triton kernels (interpreter on CPU) against the torch path."""
    model = build("llama")
    ids = _ids(seed=5)
    kw = dict(target=TARGET, reasoning_span=SPAN, hops=2, reasoning_seed="signed")
    fast = af.explain(model, input_ids=ids, backend="triton", **kw)
    torch_path = af.explain(model, input_ids=ids, backend="torch", **kw)
    assert _rel_err(fast.hop_relevance, torch_path.hop_relevance) < 1e-4


def test_relevance_leaves_the_reasoning_after_as_many_hops_as_tokens():
    """Causality: hop h + 1 puts relevance only before the last position hop h's seeds read, so after end - start
    hops none is left in the reasoning (exactly 0), and hop 0 is the plain explanation."""
    model = build("llama", dtype=torch.float64)
    ids = _ids(seed=6)
    span = (12, 16)
    e = af.explain(model, input_ids=ids, target=TARGET, reasoning_span=span, hops=4, reasoning_seed="signed",
                   backend="torch")
    assert (e.hop_relevance[-1, :, span[0]:] == 0).all()
    assert (e.reasoning_share[-1] == 0).all()
    for h in range(1, 5):   # hop h reaches reasoning positions below end - h at most
        assert (e.hop_relevance[h, :, span[1] - h:] == 0).all()
        assert e.hop_relevance[h, :, :span[1] - h].abs().sum() > 0
    plain = af.explain(model, input_ids=ids, target=TARGET, backend="torch")
    assert torch.equal(plain.relevance, e.relevance)
    none = af.explain(model, input_ids=ids, target=TARGET, reasoning_span=span, hops=0, backend="torch")
    assert none.hop_relevance.shape == (1, 1, N) and torch.equal(none.hop_relevance[0], plain.relevance)


def test_memory_is_that_of_one_explanation():
    """Peak live tensor memory with hops over a 1100-token reasoning and a 4096-token vocabulary stays within a
    quarter of the plain explanation's (measured: +21 %, the graph kept between hops and a few N x hidden
    tensors, not growing with more hops); no tensor spans reasoning x vocabulary."""
    import transformers as tf

    from attnlrp_fast.estimate import LiveBytes

    torch.manual_seed(0)
    vocab, n = 4096, 1200
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=2048)).eval()
    ids = torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(1))
    target = [(n - 2, 5), (n - 1, 7)]
    peaks = []
    for kw in ({}, dict(reasoning_span=(100, n - 2), hops=3)):
        with LiveBytes() as m:
            af.explain(model, input_ids=ids, target=target, backend="torch", **kw)
        peaks.append((m.peak, m.largest))
    (plain, plain_largest), (hops, hops_largest) = peaks
    assert hops < 1.25 * plain and hops_largest == plain_largest < (n - 102) * vocab * 4


class _WrappedHead(torch.nn.Linear):
    """An lm_head that is not a plain nn.Linear (as a quantized or offloaded one): called in chunks."""


def test_a_head_that_is_not_a_plain_linear_is_called_in_chunks():
    model = build("llama", dtype=torch.float64)
    ids = _ids(seed=8)
    kw = dict(target=TARGET, reasoning_span=SPAN, hops=2, reasoning_seed="signed", backend="torch")
    plain = af.explain(model, input_ids=ids, **kw)
    head = model.get_output_embeddings()
    wrapped = _WrappedHead(head.in_features, head.out_features, bias=False, dtype=torch.float64)
    wrapped.weight = head.weight
    calls = []
    wrapped.register_forward_hook(lambda m, i, o: calls.append(tuple(o.shape)))
    model.set_output_embeddings(wrapped)
    e = af.explain(model, input_ids=ids, **kw)
    assert calls[0] == (1, len(TARGET), VOCAB) and sum(c[1] for c in calls[1:]) == SPAN[1] - SPAN[0]
    assert _rel_err(e.hop_relevance, plain.hop_relevance) < 1e-6


def test_a_token_whose_logit_is_zero_passes_nothing_on():
    model = build("llama", dtype=torch.float64)
    ids = _ids(seed=7)
    token = int(ids[0, SPAN[0] + 2])
    with torch.no_grad():
        model.get_output_embeddings().weight[token] = 0.0   # its logit is exactly 0 wherever it is predicted
    with pytest.warns(UserWarning, match="logit of exactly 0"):
        e = af.explain(model, input_ids=ids, target=TARGET, reasoning_span=SPAN, hops=1, backend="torch")
    skipped = int((ids[0, SPAN[0]:SPAN[1]] == token).sum())
    assert e.reasoning_skipped == skipped
    assert torch.isfinite(e.hop_relevance).all()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(reasoning_span=(0, 5)), ValueError, "1 <= start < end"),
    (dict(reasoning_span=(5, 5)), ValueError, "1 <= start < end"),
    (dict(reasoning_span=(5, N + 1)), ValueError, "1 <= start < end"),
    (dict(reasoning_span="5:9"), TypeError, r"\(start, end\) pair"),
    (dict(reasoning_span=(3, 9), hops=-1), ValueError, "non-negative int"),
    (dict(reasoning_span=(3, 9), hops=1.5), ValueError, "non-negative int"),
    (dict(reasoning_span=(3, 9), reasoning_seed="abs"), ValueError, "reasoning_seed must be"),
    (dict(hops=2), ValueError, "need reasoning_span"),
    (dict(reasoning_seed="signed"), ValueError, "need reasoning_span"),
    (dict(reasoning_span=(3, 19)), ValueError, "must come after the reasoning"),
])
def test_bad_requests_are_named(kwargs, error, match):
    model = build("llama")
    with pytest.raises(error, match=match):
        af.explain(model, input_ids=_ids(), target=TARGET, backend="torch", **kwargs)


def test_a_model_without_token_logits_is_refused():
    model = build("bert")
    with pytest.raises(ValueError, match="no output embedding"):
        af.explain(model, input_ids=_ids()[:, :10], reasoning_span=(2, 5), backend="torch")


def test_no_warning_and_model_restored():
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        af.explain(model, input_ids=_ids(), target=TARGET, reasoning_span=SPAN, hops=2, backend="torch")
    assert not model.get_output_embeddings()._forward_pre_hooks
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("checkpoint", [False, True])
def test_progress_counts_every_hop(checkpoint):
    """The CLI's backward bar counts layers x (hops + 1): every hop's backward passes every layer."""
    model = build("llama")
    events = []
    af.explain(model, input_ids=_ids(), target=TARGET, reasoning_span=SPAN, hops=2, backend="torch",
               checkpoint=checkpoint, progress=events.append)
    layers = model.config.num_hidden_layers
    assert events.count("forward") == layers and events.count("backward") == layers * 3


def test_vision_language_hops_carry_image_relevance():
    """A tiny LLaVA in float64: each hop's image maps equal the slow definition's (the per-token explanations'
    maps summed with the hop's weights), and the prompt's image relevance is their sum over hops."""
    from tiny_models import inputs

    model = build("llava", seed=3, dtype=torch.float64)
    x = inputs("llava", batch=1, length=11, seed=3)          # 3 text tokens, 16 image tokens, 8 text tokens
    x["pixel_values"] = x["pixel_values"].double()
    span, target = (20, 25), [(25, 4), (26, 6)]
    e = af.explain(model, **x, target=target, reasoning_span=span, hops=2, reasoning_seed="signed", backend="torch")
    per_token = [af.explain(model, **x, target=[(t - 1, int(x["input_ids"][0, t]))], backend="torch")
                 for t in range(*span)]
    tokens, maps = [e.relevance[0].double()], [e.image_relevance[0].double()]
    for _ in range(2):
        w = tokens[-1][span[0]:span[1]]
        weights = [w[i] / p.target_logit[0].double() for i, p in enumerate(per_token)]
        tokens.append(sum(c * p.relevance[0].double() for c, p in zip(weights, per_token)))
        maps.append(sum(c * p.image_relevance[0].double() for c, p in zip(weights, per_token)))
    assert len(e.hop_image_relevance) == 3 and e.hop_image_relevance[0][0].shape == (4, 4)
    for h in range(3):
        assert _rel_err(e.hop_relevance[h, 0], tokens[h]) < 1e-5
        assert _rel_err(e.hop_image_relevance[h][0], maps[h]) < 1e-5
    assert _rel_err(e.prompt_image_relevance[0], sum(maps)) < 1e-5
