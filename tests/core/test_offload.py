"""offload="cpu" (af.explain, af.low_memory, the CLI): the layers' checkpoints in host memory, brought back one layer
ahead of the backward. On the CPU host == device and the same code runs with copies: the relevance is the checkpointed
explanation's, bit for bit; the copies happen in the order the backward needs them; the estimate counts the stashed
inputs as host memory and is the real run's peak."""

import json

import pytest
import torch
import transformers as tf

import attnlrp_fast as af
from attnlrp_fast import estimate as est
from attnlrp_fast.app import cli
from attnlrp_fast.app.commands.estimate import size
from helpers import explanation_peak
from tiny_models import COMMON, VOCAB, build

UNSEEABLE = 8   # bytes that only the input's values decide (tests/core/test_estimate.py)


def _ids(batch=2, n=13, seed=0):
    return torch.randint(3, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["llama", "gemma2", "qwen2", "mixtral", "gpt2"])
@pytest.mark.parametrize("rule", ["attnlrp", "cp"])
def test_offloaded_relevance_is_the_checkpointed_one(name, rule):
    model = build(name)
    ids = _ids(seed=len(name))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0                                              # a left-padded row
    kw = dict(attention_mask=mask, rule=rule, backend="torch", mlp_chunk=5)
    want = af.explain(model, ids, checkpoint=True, **kw)
    got = af.explain(model, ids, offload="cpu", **kw)
    assert torch.equal(got.relevance, want.relevance) and torch.equal(got.target_logit, want.target_logit)


def test_reasoning_hops_and_per_target_passes_offloaded():
    """Several backward passes over one forward (hops, per-target) bring each stash back each time."""
    model = build("llama", dtype=torch.float64)
    ids = _ids(batch=1, n=15, seed=4)
    kw = dict(backend="torch")
    for extra in (dict(reasoning_span=(5, 11), hops=2, target=[(13, 7), (14, 9)]),
                  dict(target=[(12, 3), (14, 9)], per_target=True)):
        want = af.explain(model, ids, checkpoint=True, **kw, **extra)
        got = af.explain(model, ids, offload="cpu", **kw, **extra)
        assert torch.equal(got.relevance, want.relevance)
        if "hops" in extra:
            assert torch.equal(got.hop_relevance, want.hop_relevance)
        else:
            assert torch.equal(got.target_relevance, want.target_relevance)


def test_an_encoder_decoder_model_offloaded():
    """T5's decoder layers take the encoder's states, which take gradients: they pass through the offloaded layer
    as its inputs (only the hidden states are stashed)."""
    torch.manual_seed(0)
    model = tf.T5ForConditionalGeneration(tf.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, feed_forward_proj="gated-gelu")).eval()
    g = torch.Generator().manual_seed(5)
    ids, dec = torch.randint(2, VOCAB, (1, 12), generator=g), torch.randint(2, VOCAB, (1, 5), generator=g)
    want = af.explain(model, ids, decoder_input_ids=dec, backend="torch", checkpoint=True)
    with af.low_memory(model, offload="cpu") as handle:
        got = af.explain(model, ids, decoder_input_ids=dec, backend="torch")
    # (the encoder states' gradient sums the decoder layers' parts in another order: equal to rounding)
    for a, b in ((got.relevance, want.relevance), (got.decoder_relevance, want.decoder_relevance)):
        assert (a - b).abs().max() <= 1e-6 * b.abs().max()
    assert sorted(handle.copies) == sorted([("to host", i) for i in range(4)] + [("to device", i) for i in range(4)])


def test_the_copies_come_in_the_order_the_backward_needs_them():
    model = build("llama", dtype=torch.float64)
    model.config.num_hidden_layers = 2
    ids = _ids(batch=2, n=9, seed=6)
    with af.low_memory(model, offload="cpu") as handle:
        af.explain(model, ids, backend="torch")
        layers = len(handle.layers)
        # every input to the host in the forward; in the backward layer l's comes back, then l - 1's is fetched
        # (while l's backward runs)
        assert handle.copies == [("to host", i) for i in range(layers)] + \
            [("to device", i) for i in reversed(range(layers))]
        assert handle.host_peak == layers * 2 * 9 * COMMON["hidden_size"] * 8
    assert handle.copies and af.low_memory(model).copies == [] and af.low_memory(model).host_peak == 0


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_the_offloaded_estimate_is_the_real_peak(family):
    """On the CPU the host copies are live tensors too: the real run's peak is the estimate's device peak plus its
    host bytes (all stashes are alive through the backward), to the bytes only the input's values decide; on a GPU
    the host part leaves the device."""
    model = build(family)
    n = 41
    real = explanation_peak(model, n, seed=n, offload="cpu", mlp_chunk=16)
    e = est.estimate_memory(model.config, n, dtype=torch.float32, mlp_chunk=16, offload="cpu")
    plain = est.estimate_memory(model.config, n, dtype=torch.float32, mlp_chunk=16)
    layers = model.config.num_hidden_layers
    assert e.host == layers * n * COMMON["hidden_size"] * 4
    assert abs(e.peak + e.host - real) <= UNSEEABLE, (e.peak, e.host, real)
    assert plain.host == 0
    # two layers gain little (the input brought back and the next one's prefetch are on the device); eight do
    deep = est.with_layers(build("llama").config, 8)
    assert est.estimate_memory(deep, n, dtype=torch.float32, mlp_chunk=16, offload="cpu").peak < \
        est.estimate_memory(deep, n, dtype=torch.float32, mlp_chunk=16).peak


def test_offload_over_many_layers_is_extrapolated_exactly():
    config = est.with_layers(build("llama").config, 7)
    fast = est.estimate_memory(config, 90, dtype=torch.float32, mlp_chunk=32, offload="cpu")
    whole = est.estimate_memory(config, 90, dtype=torch.float32, mlp_chunk=32, offload="cpu", exact=True)
    assert (fast.peak, fast.host, fast.where) == (whole.peak, whole.host, whole.where)
    assert fast.host == 7 * 90 * COMMON["hidden_size"] * 4


def test_bad_offload_arguments_are_errors():
    model = build("llama")
    with pytest.raises(ValueError, match=r"offload must be one of \(None, 'cpu'\), got 'gpu'"):
        af.low_memory(model, offload="gpu")
    with pytest.raises(ValueError, match="it needs checkpoint=True"):
        af.low_memory(model, checkpoint=False, offload="cpu")
    with pytest.raises(ValueError, match="mode 'plain' has none"):
        est.estimate_memory(model.config, 16, mode="plain", offload="cpu")
    with pytest.raises(ValueError, match=r"latent=\['model.layers.0.mlp'\]: latents are read from the forward's graph"):
        af.explain(model, _ids(), latent="model.layers.0.mlp", offload="cpu")
    with af.low_memory(model, offload="cpu"), pytest.raises(ValueError, match="explain latents without offload"):
        af.explain(model, _ids(), latent="model.layers.0.mlp")
    assert "forward" not in vars(model.model.layers[0]) and not hasattr(model, "_attnlrp_fast_offload")


def test_the_cli_estimate_shows_host_memory(tmp_path, capsys):
    path = tmp_path / "config.json"
    tf.LlamaConfig(**COMMON).to_json_file(path)
    assert cli.main(["estimate", "--model", str(path), "--tokens", "1k", "--modes", "low_memory", "plain",
                     "--offload", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "low_memory (--mlp-chunk 1024, --offload cpu)" in out and " host " in out
    row = next(line for line in out.splitlines() if line.strip().startswith("1k"))
    host = size(2 * 1024 * COMMON["hidden_size"] * 2)   # 2 layers x 1024 tokens x hidden x 2 bytes (bf16)
    assert row.split("  backward")[0].endswith(" " + host)


def test_the_cli_refuses_offload_without_checkpoints(capsys):
    assert cli.main(["explain", "--model", "tiny", "--answer", " x", "--quiet", "--offload", "cpu",
                     "--no-checkpoint"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--offload cpu" in err and "--no-checkpoint" in err


def test_the_cli_explains_offloaded_with_the_same_relevance(tmp_path, capsys):
    runs = {}
    for name, extra in (("plain", []), ("offload", ["--offload", "cpu"])):
        out = tmp_path / name
        assert cli.main(["explain", "--model", "tiny", "--answer", " the valve", "--quiet", "--out", str(out),
                         *extra]) == 0
        runs[name] = json.loads((out / "explanation.json").read_text())["relevance"]
    assert runs["offload"] == runs["plain"] and len(runs["plain"]) > 1000


def test_a_layer_given_an_empty_cache_is_checkpointed_without_it():
    """XLM makes a KV cache even with use_cache=False and hands it to its layers: recomputed, a layer would add its
    keys to it twice. Checkpointed (and offloaded) layers run without an empty cache: the relevance is the plain one."""
    torch.manual_seed(0)
    model = tf.XLMWithLMHeadModel(tf.XLMConfig(vocab_size=VOCAB, emb_dim=32, n_layers=2, n_heads=4, causal=True,
                                               max_position_embeddings=64)).eval()
    ids = _ids(batch=1, n=9, seed=8)
    plain = af.explain(model, ids, backend="torch").relevance
    for kw in (dict(checkpoint=True), dict(offload="cpu")):
        got = af.explain(model, ids, backend="torch", **kw).relevance
        assert (got - plain).abs().max() <= 1e-6 * plain.abs().max(), kw
