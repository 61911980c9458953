"""What the reports show of a run: characters split over byte-level tokens shown whole (relevance summed, lists kept
parallel), no HF progress bars into a log, the "Answer source" row, the tiny model's warning in the JSON and the
page."""

import json

import pytest

from attnlrp_fast.app import longdoc, report
from cli_helpers import run_cli
from tiny_lm import make_tokenizer


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
