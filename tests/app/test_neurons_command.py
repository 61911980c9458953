"""`attnlrp-fast neurons`: the planted concept neuron found first, read, and switched on the shipped concept model;
the default latents (every layer's MLP) on a tiny local LM with a chat template; bad input as one line."""

import json

import pytest

from attnlrp_fast.app import cli
from attnlrp_fast.evaluation import concept as c


def _run(args, capsys):
    rc = cli.main(["neurons", "--quiet", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_the_concept_neuron_found_read_and_switched(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the snow hill road\n\nthe cat dog river\n\nglacier lamp boat frozen\n\ntree train coin\n")
    rc, out, err = _run(["--model", "concept", "--prompt", "the ice road lamp ?", "--top", "3", "--corpus",
                         str(corpus), "--windows", "2", "--window", "4", "--set", "#1=0", "--out", str(tmp_path / "o")],
                        capsys)
    assert rc == 0, err
    data = json.loads((tmp_path / "o" / "neurons.json").read_text())
    first = data["neurons"][0]
    assert (first["latent"], first["neuron"]) == (c.LATENT, c.PLANTED)
    assert data["explained_token"] == "arctic" and first["vocabulary"]["top"][0] == "arctic"
    assert [w["text_index"] for w in first["windows"]] == [2, 0]     # the texts with cold words, strongest first
    assert data["intervention"]["before"].startswith("arctic") and data["intervention"]["after"].startswith("desert")
    assert abs(sum(n["relevance"] for n in data["neurons"]) - first["relevance"]) < 1e-2 * first["relevance"]
    page = (tmp_path / "o" / "neurons.html").read_text()
    assert f"{c.LATENT}[{c.PLANTED}]" in page and "desert" in page
    assert f"{c.LATENT}[{c.PLANTED}]" in out and "'arctic" in out and "-> 'desert" in out


def test_default_latents_on_a_chat_model_and_scaling_a_neuron(lm_dir, tmp_path, capsys):
    rc, out, err = _run(["--model", str(lm_dir), "--prompt", "What failed during the storm?", "--top", "4",
                         "--max-new-tokens", "2", "--set", "model.layers.1.mlp.down_proj:input[3]=*40", "--out",
                         str(tmp_path)], capsys)
    assert rc == 0, err
    data = json.loads((tmp_path / "neurons.json").read_text())
    assert data["latents"] == ["model.layers.0.mlp.down_proj:input", "model.layers.1.mlp.down_proj:input"]
    assert len(data["neurons"]) == 4 and all(n["vocabulary"] is not None for n in data["neurons"])
    rel = [n["relevance"] for n in data["neurons"]]
    assert rel == sorted(rel, reverse=True)
    assert "<|assistant|>" in data["prompt"]                          # through the chat template
    assert data["intervention"]["set"] == ["model.layers.1.mlp.down_proj:input[3]=*40"]


@pytest.mark.parametrize("args, message", [
    (["--latent", "model.layers.7.mlp"], "no module named 'model.layers.7.mlp'"),
    (["--set", "model.layers.1.mlp.down_proj:input[500]=1"], "neuron 500 is outside"),
    (["--set", "7=1"], "a bare index needs exactly one --latent"),
    (["--set", "#99=1"], "not a rank"),
    (["--set", "abc"], "expected NEURON=VALUE"),
    (["--top", "0"], "--top must be at least 1"),
    (["--prompt", "  "], "--prompt is empty"),
])
def test_bad_input_is_one_line(args, message, tmp_path, capsys):
    base = ["--model", "concept", "--prompt", "ice ?", "--out", str(tmp_path)]
    rc, out, err = _run(base + args, capsys)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def test_an_empty_or_missing_corpus_is_one_line(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    for path, message in ((empty, "--corpus"), (tmp_path / "nope.txt", "no such file")):
        rc, _, err = _run(["--model", "concept", "--prompt", "ice ?", "--corpus", str(path), "--out", str(tmp_path)],
                          capsys)
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def test_evaluate_runs_the_neuron_check(tmp_path, capsys):
    rc = cli.main(["evaluate", "--task", "neurons", "--samples", "1", "--quiet", "--out", str(tmp_path)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    data = json.loads((tmp_path / "evaluation.json").read_text())["neurons"]
    assert set(data) == {"neurons-recall", "neurons-concept"}
    assert data["neurons-concept"]["planted_first"]["attnlrp"] == 1.0
    assert set(data["neurons-recall"]["drop"]) == {"attnlrp", "grad_x_activation", "activation", "random"}
    assert "| neurons-concept | 1 | attnlrp | **" in out.out
    rc = cli.main(["evaluate", "--task", "neurons", "--task", "recall", "--quiet", "--out", str(tmp_path)])
    assert rc == 2 and "run on their own" in capsys.readouterr().err
