"""The first hour's frictions (issue 25): estimate streams its tables and stands in for the middle MLP chunks (the
same numbers), an unknown --model fails at once, --hops needs a reasoning span, no HF bars into a log, a context
error that names its cause, the "Answer source" row, Explanation's docstring and repr, a clean package namespace,
the tiny model's warning in the reports, characters split over byte-level tokens shown whole."""

import dataclasses
import json
import time
from types import SimpleNamespace

import pytest
import torch

import attnlrp_fast as af
from attnlrp_fast import estimate as est
from attnlrp_fast import hub
from attnlrp_fast.app import cli, estimate_cmd, longdoc, report
from attnlrp_fast.memory import LowMemoryHandle
from tiny_lm import make_tokenizer
from tiny_models import build


def run_cli(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err, *parts):
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    for part in parts:
        assert part in err, (part, err)


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# --- 1. estimate: the middle MLP chunks stood in for, the tables streamed --------------------------------------
@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("n, chunk", [(150, 16), (161, 32), (96, 8)])
def test_standing_in_for_the_middle_chunks_changes_no_number(family, n, chunk, monkeypatch):
    config = build(family).config
    every = est.estimate_memory(config, n, dtype=torch.float32, mlp_chunk=chunk, exact=True)
    stood_in = []
    apply = est.StoodInChunk.apply
    monkeypatch.setattr(est.StoodInChunk, "apply", lambda *a: stood_in.append(1) or apply(*a))
    fast = est.estimate_memory(config, n, dtype=torch.float32, mlp_chunk=chunk)
    assert stood_in   # (3 passes over each layer's middle chunks)
    assert (fast.peak, fast.where, fast.largest) == (every.peak, every.where, every.largest)


def test_the_chunk_seam_is_put_back_and_real_tensors_run_every_chunk():
    before = LowMemoryHandle.__dict__["_chunk"]
    est.estimate_memory(build("llama").config, 100, dtype=torch.float32, mlp_chunk=16)
    assert LowMemoryHandle.__dict__["_chunk"] is before
    model = build("llama")
    ids = torch.randint(3, 50, (1, 70), generator=torch.Generator().manual_seed(0))
    whole = af.explain(model, input_ids=ids, backend="torch")
    with est._stood_in_chunks(True):   # only meta tensors are stood in for
        chunked = af.explain(model, input_ids=ids, backend="torch", checkpoint=True, mlp_chunk=8)
    torch.testing.assert_close(chunked.relevance, whole.relevance, rtol=1e-4, atol=1e-5)


@pytest.fixture
def tiny_config(tmp_path):
    import transformers as tf

    from tiny_models import COMMON

    path = tmp_path / "config.json"
    path.write_text(tf.LlamaConfig(**{**COMMON, "num_hidden_layers": 5}).to_json_string())
    return str(path)


def test_estimate_prints_each_table_as_it_is_done_with_a_progress_bar(tiny_config, capsys, monkeypatch):
    before = {}   # what was printed when each mode's first estimate started
    measure = est.estimate_memory

    def estimate_memory(config, tokens, **kw):
        before.setdefault(kw["mode"], capsys.readouterr())
        return measure(config, tokens, **kw)

    monkeypatch.setattr(est, "estimate_memory", estimate_memory)
    argv = ["estimate", "--model", tiny_config, "--tokens", "1k,2k", "--dtype", "float32", "--mlp-chunk", "256"]
    assert cli.main(argv) == 0
    before["end"] = capsys.readouterr()
    assert "Memory of one explanation" in before["low_memory"].out
    assert "\nlow_memory (--mlp-chunk 256)" in before["plain"].out
    assert "\nplain" in before["lxt_style"].out and "low_memory" not in before["lxt_style"].out
    assert "estimating low_memory: 2/2 lengths" in before["plain"].err and "estimating eager: 2/2" in before["end"].err
    monkeypatch.setattr(est, "estimate_memory", measure)
    all_at_once = "\n".join(estimate_cmd.run(cli.build_parser().parse_args(argv))) + "\n"
    assert "".join(c.out for c in before.values()) == all_at_once


# --- 2. an unknown --model fails at once ---------------------------------------------------------------------
def test_a_mistyped_model_fails_at_once_offline(doc, capsys, offline):
    t = time.perf_counter()
    rc, _, err = run_cli(["explain", "--model", "tyni", "--document", doc, "--quiet"], capsys)
    one_line_error(rc, err, "--model tyni", "nor a model in the Hugging Face cache", "only while the hub answers",
                   "HF_HUB_OFFLINE is set", "did you mean tiny?")
    rc, _, err = run_cli(["estimate", "--model", "llama-9"], capsys)
    one_line_error(rc, err, "no model config at 'llama-9'", "did you mean llama-3.1-8b or llama-3.1-70b?")
    assert time.perf_counter() - t < 20


def test_without_an_answer_from_the_hub_it_fails_at_once_too(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")   # nothing listens there
    hub._no_answer.cache_clear()
    try:
        t = time.perf_counter()
        with pytest.raises(ValueError, match="http://127.0.0.1:9 does not answer"):
            hub.from_pretrained_options("nobody/no-such-model")
        assert time.perf_counter() - t < hub.REACH_SECONDS + 1
    finally:
        hub._no_answer.cache_clear()


def test_a_hub_id_is_still_tried_when_the_hub_answers(monkeypatch, doc, capsys):
    monkeypatch.setattr(hub, "hub_unreachable", lambda: None)
    asked = []

    def from_pretrained(name, **kw):
        asked.append(name)
        raise OSError("nobody/no-such-model is not a valid model identifier")

    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", from_pretrained)
    rc, _, err = run_cli(["explain", "--model", "nobody/no-such-model", "--document", doc, "--quiet"], capsys)
    one_line_error(rc, err, "the hub did not give it", "not a valid model identifier")
    assert asked == ["nobody/no-such-model"]


def test_a_cached_model_loads_offline_when_the_hub_is_unreachable(tmp_path, monkeypatch):
    import huggingface_hub.constants

    repo = tmp_path / "models--someone--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc")
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "snapshots" / "abc" / "config.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "hub_unreachable", lambda: "HF_HUB_OFFLINE is set")
    assert hub.from_pretrained_options("someone/tiny-llama") == {"local_files_only": True}
    monkeypatch.setattr(hub, "hub_unreachable", lambda: None)
    assert hub.from_pretrained_options("someone/tiny-llama") == {}
    assert hub.did_you_mean("someone/tiny-lama") == " (did you mean someone/tiny-llama?)"
    assert hub.did_you_mean("something else entirely") == ""


# --- 3. --hops needs a reasoning span ------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["explain", "evaluate"])
def test_hops_without_a_reasoning_span_is_an_error(command, lm_dir, doc, tmp_path, capsys):
    base = [command, "--model", lm_dir, "--document", doc, "--answer", " the valve", "--out", tmp_path / "o",
            "--quiet", "--no-chat"]
    rc, _, err = run_cli(base + ["--hops", "2", "--reasoning", "none"], capsys)
    one_line_error(rc, err, "--hops 2", "--reasoning none")
    rc, _, err = run_cli(base + ["--hops", "2"], capsys)   # auto, on a tokenizer without think tags
    one_line_error(rc, err, "--hops 2", "no think tags")
    assert not (tmp_path / "o").exists()


def test_hops_with_the_shipped_tasks_and_after_an_answer_without_reasoning(capsys):
    rc, _, err = run_cli(["evaluate", "--task", "reasoning", "--hops", "2"], capsys)
    one_line_error(rc, err, "--hops goes with --model and --document")
    tags = SimpleNamespace(get_vocab=lambda: {"<think>": 5, "</think>": 6, "a": 1})
    with pytest.raises(longdoc.InputError, match="the answer holds no <think> ... </think> block"):
        longdoc.check_found_reasoning(2, tags, None)
    longdoc.check_found_reasoning(None, tags, None)   # --hops not given: nothing to say
    assert longdoc.check_hops(None, "none") == longdoc.DEFAULT_HOPS and longdoc.check_hops(2, "0:3") == 2


# --- 4, 6, 9, 10: one explanation of a document with characters split over byte-level tokens -------------------
SPLIT = "The café in 日本 had 🙂 guests.\n\nA valve failed during the storm in March.\n"


def test_reports_of_split_characters_no_hf_bars_and_the_answer_source_row(lm_dir, tmp_path, capsys):
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()   # (as in a fresh process)
    enable_progress_bars()
    path = tmp_path / "doc.txt"
    path.write_text(SPLIT, encoding="utf-8")
    out = tmp_path / "r"
    rc, _, err = run_cli(["explain", "--model", lm_dir, "--document", path, "--answer", " 日本 🙂 and so on",
                          "--reasoning", "0:4", "--hops", "1", "--out", out, "--no-chat"], capsys)
    assert rc == 0, err
    assert "Loading weights" not in err and "it/s" not in err   # stderr is no terminal: no HF bars
    data = json.loads((out / "explanation.json").read_text(encoding="utf-8"))
    tokens = data["tokens"]
    assert "".join(tokens) == SPLIT and "" not in tokens and not any("\ufffd" in t for t in tokens)
    assert {"日", "本", "🙂"} <= set(tokens)
    assert len(data["relevance"]) == len(tokens) < data["document_tokens"]
    assert sum(data["relevance"]) == pytest.approx(data["relevance_document_all_hops"], rel=1e-4, abs=1e-6)
    reasoning = data["reasoning"]
    assert not any("\ufffd" in t for t in reasoning["tokens"])
    assert len(reasoning["relevance_hop0"]) == len(reasoning["tokens"])
    assert all(len(r) == len(tokens) for r in reasoning["document_relevance_per_hop"])
    assert data["warnings"] == []
    page = (out / "explanation.html").read_text(encoding="utf-8")
    assert "<th>Answer source</th><td>given</td>" in page and "\ufffd" not in page
    assert page.count("<th>Answer</th>") == 1 and 'class="warning"' not in page


def test_the_tiny_models_warning_is_in_the_reports(doc, tmp_path, capsys):
    out = tmp_path / "t"
    rc, printed, err = run_cli(["explain", "--model", "tiny", "--document", doc, "--answer", " the valve", "--out",
                                out, "--quiet"], capsys)
    assert rc == 0, err
    warning = printed.splitlines()[0]
    assert "answer is noise" in warning
    assert json.loads((out / "explanation.json").read_text())["warnings"] == [warning]
    assert f'<p class="warning">Warning: {warning}</p>' in (out / "explanation.html").read_text()


def test_character_groups():
    tok = make_tokenizer()
    ids = tok(" 日本 🙂 a", add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    groups = longdoc.character_groups(tok, ids)
    assert [i for a, b in groups for i in range(a, b)] == list(range(len(ids)))
    assert [tok.decode(ids[a:b]) for a, b in groups if b - a > 1] == ["日", "本", "🙂"]
    assert report.join_groups(groups, [tok.decode([i]) for i in ids])[0] == " "
    assert sum(report.sum_groups(groups, list(range(len(ids))))) == sum(range(len(ids)))


# --- 5. the context error names its cause --------------------------------------------------------------------
def test_the_context_error_names_what_to_reduce():
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=100))
    prompt = longdoc.Prompt("", list(range(90)), 10, 80, [""] * 70)   # document 70 tokens, question + template 20
    with pytest.raises(longdoc.InputError, match=r"--max-new-tokens 32 = 122, .*lower --max-new-tokens to 10"):
        longdoc.check_length(model, prompt, 32, "m", generated=True)
    with pytest.raises(longdoc.InputError, match=r"--answer's 15 tokens = 105, .*shorten the document \(or the "):
        longdoc.check_length(model, prompt, 15, "m")
    long = longdoc.Prompt("", list(range(130)), 10, 120, [""] * 110)
    with pytest.raises(longdoc.InputError, match="prompt alone does not fit: shorten the document by at least 62"):
        longdoc.check_length(model, long, 32, "m", generated=True)
    longdoc.check_length(model, prompt, 10, "m", generated=True)   # fits exactly


# --- 7. Explanation: every field documented, a short repr ----------------------------------------------------
def test_explanation_documents_every_field_and_shows_only_what_is_set():
    for f in dataclasses.fields(af.Explanation):
        assert f"\n    {f.name} " in af.Explanation.__doc__, f.name
    e = af.explain(build("llama"), input_ids=torch.randint(3, 50, (1, 12)), latent=["model.layers.0.mlp"])
    text = repr(e)
    assert text.startswith("Explanation(relevance=tensor(shape=(1, 12), dtype=float32), target_ids=")
    assert "latent={'model.layers.0.mlp': tensor(shape=(1, 12, 32), dtype=float32)}" in text
    assert "None" not in text and "image_" not in text and "reasoning" not in text and len(text) < 400


# --- 8. the package's namespace ------------------------------------------------------------------------------
def test_dir_lists_the_public_api_and_the_subpackages_only():
    names = set(dir(af))
    assert not names & {"importlib", "sys", "_PUBLIC"} and not hasattr(af, "sys") and not hasattr(af, "importlib")
    assert {"app", "evaluation", "kernels", "bindings", "models"} <= names
    for name in names:
        assert getattr(af, name) is not None, name
    for name in names - set(af.__all__) - {"HF_REGISTERED"}:
        assert hasattr(getattr(af, name), "__path__"), name   # a subpackage
