"""seq_chunk=C (af.explain, af.low_memory, --seq-chunk): each layer's forward, recomputation and backward over query
chunks of C positions, only its keys and values full length (attnlrp_fast/seqchunk.py). Exact: the relevance equals
the unchunked explanation in float64 for every rule, with GQA, windows that cross chunk borders, softcaps, padding,
mixtures of experts and a parallel attention + MLP block, chunk sizes that do not divide the length; combined with
offload; several backward passes; layers it cannot run are refused by name; the estimate is a real run's peak."""

import json

import pytest
import torch
import transformers as tf

import attnlrp_fast as af
from attnlrp_fast import estimate as est
from attnlrp_fast.app import cli
from attnlrp_fast.models import UnsupportedModelError
from helpers import explanation_peak
from tiny_models import COMMON, VOCAB, build

UNSEEABLE = 8   # bytes that only the input's values decide (tests/core/test_estimate.py)


def _ids(batch=2, n=23, seed=0):
    return torch.randint(3, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def _phi():
    """Phi (Phi-1.5's family): attention and MLP in parallel on the same normed input."""
    torch.manual_seed(0)
    return tf.PhiForCausalLM(tf.PhiConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, partial_rotary_factor=0.5)).double().eval()


@pytest.mark.parametrize("name", ["llama", "gemma2", "mistral", "qwen2", "gpt2", "phi"])
@pytest.mark.parametrize("rule", ["attnlrp", "cp", "grad"])
def test_chunked_relevance_is_the_unchunked_one(name, rule):
    """float64; gemma2 and mistral: sliding windows of 5 across chunks of 4 (and softcaps); a left-padded row."""
    model = _phi() if name == "phi" else build(name, dtype=torch.float64)
    ids = _ids(seed=len(name) + len(rule))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    kw = dict(attention_mask=mask, rule=rule, backend="torch", mlp_chunk=5)
    want = af.explain(model, ids, checkpoint=True, **kw)
    for size in (4, 7):
        got = af.explain(model, ids, seq_chunk=size, **kw)
        assert (got.relevance - want.relevance).abs().max() <= 1e-12 * want.relevance.abs().max(), (name, size)
        assert torch.equal(got.target_logit, want.target_logit)


def test_a_mixture_of_experts_chunked_and_offloaded():
    model = build("mixtral")   # (its grouped expert matmul takes no float64)
    ids = _ids(seed=3)
    want = af.explain(model, ids, checkpoint=True, backend="torch")
    with af.low_memory(model, seq_chunk=6, offload="cpu") as handle:
        got = af.explain(model, ids, backend="torch")
    assert (got.relevance - want.relevance).abs().max() <= 1e-5 * want.relevance.abs().max()
    assert handle.copies[:2] == [("to host", 0), ("to host", 1)] and len(handle.copies) == 4


def test_several_backward_passes_chunked():
    model = build("llama", dtype=torch.float64)
    ids = _ids(batch=1, n=17, seed=4)
    for extra in (dict(reasoning_span=(5, 12), hops=2, target=[(15, 7), (16, 9)]),
                  dict(target=[(12, 3), (16, 9)], per_target=True)):
        want = af.explain(model, ids, checkpoint=True, backend="torch", **extra)
        got = af.explain(model, ids, seq_chunk=5, offload="cpu", backend="torch", **extra)
        assert (got.relevance - want.relevance).abs().max() <= 1e-12 * want.relevance.abs().max()


def test_both_backends_chunked():
    model = build("gemma2")
    ids = _ids(seed=5)
    torch_path = af.explain(model, ids, seq_chunk=8, backend="torch").relevance
    triton = af.explain(model, ids, seq_chunk=8, backend="triton").relevance
    assert torch.allclose(triton, torch_path, rtol=1e-3, atol=1e-5 * torch_path.abs().max())


def test_layers_it_cannot_run_are_refused_by_name():
    torch.manual_seed(0)
    t5 = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                                   num_heads=4, decoder_start_token_id=0)).eval()
    with pytest.raises(UnsupportedModelError, match="position bias|takes gradients"):
        af.explain(t5, _ids(batch=1), decoder_input_ids=_ids(batch=1, n=4), seq_chunk=4, backend="torch")
    bloom = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)).eval()
    with pytest.raises(UnsupportedModelError, match="the layer input 'alibi' .* cannot run in sequence chunks"):
        af.explain(bloom, _ids(batch=1), seq_chunk=4, backend="torch")
    mamba = tf.MambaForCausalLM(tf.MambaConfig(vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=2,
                                               expand=2, conv_kernel=3, time_step_rank=4)).eval()
    with pytest.raises(UnsupportedModelError, match="cannot run in sequence chunks"):
        af.explain(mamba, _ids(batch=1), seq_chunk=4, backend="torch")
    with pytest.raises(ValueError, match="seq_chunk must be a positive number of tokens or None, got 0"):
        af.low_memory(build("llama"), seq_chunk=0)
    with pytest.raises(ValueError, match="it needs checkpoint=True"):
        af.low_memory(build("llama"), seq_chunk=8, checkpoint=False)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("offload", [None, "cpu"])
def test_the_chunked_estimate_is_the_real_peak(family, offload):
    model = build(family)
    n = 41
    real = explanation_peak(model, n, seed=n, seq_chunk=8, offload=offload, mlp_chunk=16)
    e = est.estimate_memory(model.config, n, dtype=torch.float32, mlp_chunk=16, seq_chunk=8, offload=offload)
    assert abs(e.peak + e.host - real) <= UNSEEABLE, (e.peak, e.host, real)


def test_a_long_model_is_extrapolated_as_the_whole_runs():
    """The peak of a chunked, offloaded explanation sits at the first layer's backward, not the last: the estimate
    of a deep model takes the most of every place of the 2-, 3- and 4-layer runs, as the whole model's run has it."""
    config = est.with_layers(build("llama").config, 7)
    for kw in (dict(seq_chunk=16), dict(seq_chunk=16, offload="cpu"), dict(offload="cpu"), {}):
        fast = est.estimate_memory(config, 90, dtype=torch.float32, mlp_chunk=32, **kw)
        whole = est.estimate_memory(config, 90, dtype=torch.float32, mlp_chunk=32, exact=True, **kw)
        assert (fast.peak, fast.host, fast.where) == (whole.peak, whole.host, whole.where), kw


def test_the_cli_takes_seq_chunk(tmp_path, capsys):
    runs = {}
    for name, extra in (("plain", []), ("chunked", ["--seq-chunk", "512", "--offload", "cpu"])):
        out = tmp_path / name
        assert cli.main(["explain", "--model", "tiny", "--answer", " the valve", "--quiet", "--out", str(out),
                         *extra]) == 0
        runs[name] = json.loads((out / "explanation.json").read_text())["relevance"]
    worst = max(abs(a - b) for a, b in zip(runs["chunked"], runs["plain"]))
    assert len(runs["plain"]) > 1000 and worst <= 1e-5 * max(abs(v) for v in runs["plain"])
    capsys.readouterr()
    assert cli.main(["explain", "--model", "tiny", "--answer", " x", "--quiet", "--seq-chunk", "0"]) == 2
    assert "--seq-chunk must be a positive number of tokens, got 0" in capsys.readouterr().err
    path = tmp_path / "config.json"
    tf.LlamaConfig(**COMMON).to_json_file(path)
    assert cli.main(["estimate", "--model", str(path), "--tokens", "1k", "--modes", "low_memory", "--seq-chunk",
                     "256", "--offload", "cpu"]) == 0
    assert "low_memory (--mlp-chunk 1024, --offload cpu, --seq-chunk 256)" in capsys.readouterr().out


def test_the_flop_count_and_the_predicted_time(tmp_path, capsys):
    """Linear maps 2 per weight per token, attention 2 N^2 H D, times the passes (a count, stated as such)."""
    config = tf.LlamaConfig(**COMMON)
    n, h, i, d = 1000, COMMON["hidden_size"], COMMON["intermediate_size"], COMMON["head_dim"]
    heads, kv = COMMON["num_attention_heads"], COMMON["num_key_value_heads"]
    weights = h * heads * d * 2 + h * kv * d * 2 + 3 * h * i          # q, o; k, v; gate, up, down
    per_layer = 2 * weights * n * 4 + 2 * heads * d * n * n * 4.5    # forward, recomputation, backward
    assert est.explanation_flops(config, n) == int(COMMON["num_hidden_layers"] * per_layer)
    assert est.explanation_flops(config, n, mode="plain") < est.explanation_flops(config, n)
    path = tmp_path / "config.json"
    config.to_json_file(path)
    assert cli.main(["estimate", "--model", str(path), "--tokens", "1k", "--modes", "low_memory", "eager",
                     "--tflops", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "predicted" in out and "not a measurement" in out
    assert cli.main(["estimate", "--model", str(path), "--tflops", "0"]) == 2


def test_a_layer_that_mixes_positions_otherwise_is_refused_not_miscomputed():
    """A recurrent mixer in a layer (Falcon-H1's Mamba beside its attention) is refused by name; a mixing the
    library cannot see (a token shift in code of its own) is caught by running the first positions both ways."""
    class Shift(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x + 0.5 * torch.roll(x, 1, dims=1))

    model = build("llama", dtype=torch.float64)
    model.model.layers[1].mlp = Shift(model.model.layers[1].mlp)
    ids = _ids(batch=1, n=20)
    assert torch.isfinite(af.explain(model, ids, checkpoint=True, mlp_chunk=0, backend="torch").relevance).all()
    with pytest.raises(UnsupportedModelError, match=r"layer 1 mixes positions other than by attention \(its output "
                                                    r"on the first 12 positions changes when run in chunks of 6\)"):
        af.explain(model, ids, seq_chunk=6, mlp_chunk=0, backend="torch")
    torch.manual_seed(0)
    hybrid = tf.FalconH1ForCausalLM(tf.FalconH1Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=4,
        mamba_chunk_size=8)).eval()
    with pytest.raises(UnsupportedModelError, match=r"model.layers.0.mamba \(FalconH1Mixer\) mixes positions"):
        af.explain(hybrid, _ids(batch=1), seq_chunk=6, backend="torch")
