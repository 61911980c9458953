"""The needle task (attnlrp_fast/evaluation/needle.py): generated facts of every kind, documents cut to a length with
the needle at a paragraph boundary, the evidence tokens, the evidence share, answers judged by their key, and the
task end to end on SmolLM2 through `attnlrp-fast evaluate --task needle` (samples it gets wrong counted and left out,
the perturbation metrics only up to --curves-up-to)."""

import json
import random

import pytest
import torch

from attnlrp_fast.app import cli, longdoc
from attnlrp_fast.evaluation import evaluate as ev
from attnlrp_fast.evaluation import faithfulness, needle
from cli_helpers import one_line_error, run_cli
from tiny_lm import make_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_facts_of_every_kind_hold_their_key_and_ask_for_it():
    rng = random.Random(0)
    facts = [needle.make_fact(rng) for _ in range(200)]
    assert {f.kind for f in facts} == {"code", "name", "date", "place"}
    assert len({f.sentence for f in facts}) > 100                       # varied, not a handful of sentences
    for f in facts:
        assert f.key in f.sentence and f.key not in f.question and f.question.endswith("?")
    again = random.Random(0)
    assert [needle.make_fact(again).sentence for _ in range(200)] == [f.sentence for f in facts]   # seeded


@pytest.mark.parametrize("length", [300, 1024, 3000, 8192, 20000])
def test_a_sample_fits_its_length_and_holds_the_needle_at_a_paragraph_boundary(tokenizer, length):
    rng = random.Random(length)
    for _ in range(5):
        s = needle.make_sample(tokenizer, length, rng)
        n = len(tokenizer(s.document, add_special_tokens=False).input_ids)
        assert length - needle.HEADROOM - 160 < n <= length - needle.HEADROOM, n     # within a sentence of it
        assert s.document[s.needle_start:s.needle_end] == s.fact.sentence
        assert s.document.count(s.fact.sentence) == 1
        before, after = s.document[:s.needle_start], s.document[s.needle_end:]
        assert before in ("",) or before.endswith("\n\n")
        assert after in ("",) or after.startswith("\n\n")
        paragraphs = needle.paragraphs()
        parts = [p for p in s.document.split("\n\n") if p != s.fact.sentence]
        assert all(p in paragraphs for p in parts[:-1]) and any(q.startswith(parts[-1]) for q in paragraphs)
    report = len(tokenizer("\n\n".join(needle.paragraphs()), add_special_tokens=False).input_ids)
    if report < length - needle.HEADROOM - 300:      # longer than the report: its paragraphs again from the start
        assert s.document.count(needle.paragraphs()[1]) == 2
    else:
        assert all(s.document.count(p) <= 1 for p in needle.paragraphs()[1:])


def test_the_evidence_is_the_needle_sentence_tokens(tokenizer):
    s = needle.make_sample(tokenizer, 600, random.Random(4))
    prompt = longdoc.build_prompt(tokenizer, s.document, s.fact.question)
    mask = needle.evidence_mask(prompt, s)
    assert mask.shape == (len(prompt.ids),)
    picked = [prompt.pieces[i - prompt.doc_start] for i in mask.nonzero().flatten().tolist()]
    text = "".join(picked)
    assert s.fact.sentence in text and len(text) < len(s.fact.sentence) + 8       # whole tokens, nothing more
    idx = mask.nonzero().flatten()
    assert (idx.diff() == 1).all() and prompt.doc_start <= idx[0] and idx[-1] < prompt.doc_end


def test_answers_are_judged_by_their_key():
    f = needle.Fact("date", "The visitor centre will reopen on 3 June.", "When will the visitor centre reopen?",
                    "3 June")
    assert needle.is_right("It reopens on 3 june.", f) and not needle.is_right("On 13 July.", f)


def test_evidence_share_is_the_share_of_positive_relevance():
    r = torch.tensor([[2.0, -5.0, 1.0, 1.0, 4.0], [-1.0, -1.0, 0.0, 0.0, 0.0]])
    evidence = torch.tensor([[True, True, False, False, False], [True, False, False, False, False]])
    candidates = torch.tensor([True, True, True, True, False])
    share = ev.evidence_share(r, evidence, candidates)
    assert torch.allclose(share, torch.tensor([0.5, 0.0]))          # 2 of (2 + 1 + 1); no positive relevance: 0
    assert torch.allclose(ev.evidence_share(r[0], evidence[0]), torch.tensor([0.25]))


def test_the_table_shows_tasks_without_curves():
    result = {"tasks": {"needle-8k": {"methods": {
        "attnlrp": {"pointing_accuracy": 1.0, "evidence_rank": 1.0, "evidence_share": 0.4, "seconds": 90.0},
        "random": {"pointing_accuracy": 0.0, "evidence_rank": 900.0, "evidence_share": 0.01, "seconds": 0.0}}}}}
    lines = faithfulness.table(result).splitlines()
    assert lines[2].startswith("| needle-8k | attnlrp | - | - | - | - | - | 100.0% | 1.00 | 40.0% | 90.00 |")
    assert lines[3].startswith("| needle-8k | random |")


def test_option_errors_are_one_line(capsys):
    for argv, parts in [(["--lengths", "1k,abc"], ["--lengths", "'abc'"]), (["--lengths", "100"], ["256"]),
                        (["--curves-up-to", "x"], ["--curves-up-to"]),
                        (["--document", "d.txt"], ["leave --document out"])]:
        rc, out, err = run_cli(["evaluate", "--task", "needle", "--quiet", *argv], capsys)
        one_line_error(rc, err, *parts)
    rc, out, err = run_cli(["evaluate", "--model", "smollm2", "--quiet"], capsys)
    one_line_error(rc, err, "--model alone goes with --task needle")


@pytest.mark.slow
def test_the_needle_task_end_to_end_on_smollm2(tmp_path, capsys):
    out = tmp_path / "o"
    rc, text, err = run_cli(["evaluate", "--task", "needle", "--lengths", "384,768", "--curves-up-to", "384",
                             "--samples", "1", "--steps", "1", "--methods", "attnlrp,random", "--out", out,
                             "--quiet"], capsys)
    assert rc == 0, err
    result = json.loads((out / "evaluation.json").read_text())
    assert "partial" not in result and set(result["tasks"]) == {"needle-384", "needle-768"}
    short, long = result["tasks"]["needle-384"], result["tasks"]["needle-768"]
    for task in (short, long):
        assert task["sampled"] == 1 and task["samples"] == 1 - len(task["wrong"]) and task["model"] == "smollm2"
        assert task["samples"] >= 1, task["wrong"]          # SmolLM2 finds a fact in half a page
        lrp, rnd = task["methods"]["attnlrp"], task["methods"]["random"]
        assert 0 <= rnd["evidence_share"] <= 1 and lrp["evidence_rank"] >= 1 and lrp["seconds"] > 0
        assert lrp["evidence_share"] > rnd["evidence_share"]
    assert short["curves"] and "abpc" in short["methods"]["attnlrp"] and "rise" in short["methods"]["attnlrp"]
    assert not long["curves"] and "abpc" not in long["methods"]["attnlrp"]
    assert "needle-384" in text and "| needle-768 | attnlrp | - |" in text and "samples correctly" in text
