"""`attnlrp-fast explain --reasoning auto|none|START:END --hops K`: finding a reasoning block, the multi-hop reports
and one-line errors."""

import json

import pytest

from attnlrp_fast.app import longdoc
from cli_helpers import run_cli

OPEN, CLOSE = 50, 51


class TagTokenizer:
    """Just enough of a tokenizer for find_reasoning: a vocabulary with (or without) the think tags."""

    def __init__(self, tags=True):
        self.vocab = {"<think>": OPEN, "</think>": CLOSE} if tags else {}

    def get_vocab(self):
        return dict(self.vocab, a=1, b=2)


@pytest.mark.parametrize("prompt,answer,expected", [
    ([1, 2, OPEN], [7, 8, CLOSE, 9, 10], (3, 5, 6)),       # the template opens the block in the prompt
    ([1, 2], [OPEN, 7, 8, CLOSE, 9], (3, 5, 6)),            # the model opens it
    ([1, 2], [7, 8, CLOSE, 9], (2, 4, 5)),                  # opened without a token: from the answer's start
    ([1, OPEN, 3, CLOSE, 4], [OPEN, 7, CLOSE, 9], (6, 7, 8)),   # the answer's own block, not the prompt's
])
def test_find_reasoning(prompt, answer, expected):
    span = longdoc.find_reasoning(TagTokenizer(), prompt, answer)
    assert (span.start, span.end, span.answer_start) == expected
    assert "<think>" in span.source


def test_no_reasoning_block():
    assert longdoc.find_reasoning(TagTokenizer(tags=False), [1, 2], [OPEN, 7, CLOSE, 9]) is None
    assert longdoc.find_reasoning(TagTokenizer(), [1, 2], [7, 8, 9]) is None
    assert longdoc.find_reasoning(TagTokenizer(), [1, OPEN], [CLOSE, 9]) is None     # an empty block


def test_unfinished_reasoning_is_named():
    with pytest.raises(longdoc.InputError, match="does not close it.*--max-new-tokens 3"):
        longdoc.find_reasoning(TagTokenizer(), [1, OPEN], [7, 8, 9], max_new_tokens=3)
    with pytest.raises(longdoc.InputError, match="no answer after the reasoning"):
        longdoc.find_reasoning(TagTokenizer(), [1, OPEN], [7, 8, CLOSE])


def test_reasoning_option():
    span = longdoc.reasoning_from_option("1:3", [1, 2, 3], [4, 5, 6, 7])
    assert (span.start, span.end, span.answer_start) == (4, 6, 6)
    for bad in ("3", "a:b", "3:1", "0:4", "2:2"):
        with pytest.raises(longdoc.InputError, match="--reasoning"):
            longdoc.reasoning_from_option(bad, [1, 2, 3], [4, 5, 6, 7])


def test_explain_with_a_given_span_writes_per_hop_reports(lm_dir, doc, tmp_path, capsys):
    out = tmp_path / "r"
    rc, printed, _ = run_cli(["explain", "--model", lm_dir, "--document", doc, "--answer", " the valve failed in March",
                              "--reasoning", "0:3", "--hops", "2", "--out", out, "--quiet", "--no-chat"], capsys)
    assert rc == 0
    data = json.loads((out / "explanation.json").read_text())
    r = data["reasoning"]
    assert r["hops"] == 2 and r["seed"] == "positive" and len(r["tokens"]) == 3
    assert len(r["share_left_in_reasoning"]) == 3 and len(r["document_relevance_per_hop"]) == 3
    n_doc = len(data["tokens"])
    assert all(len(m) == n_doc for m in r["document_relevance_per_hop"])
    # the main map is all hops together
    total = [sum(m[i] for m in r["document_relevance_per_hop"]) for i in range(n_doc)]
    assert data["relevance"] == pytest.approx(total, rel=1e-4, abs=1e-6)
    page = (out / "explanation.html").read_text()
    assert "Reasoning (3 tokens" in page and "hop 2 (through the reasoning)" in page
    assert "hop 1 (through the reasoning)" in printed and "left in the reasoning" in printed
    # the answer explained is what follows the reasoning
    assert len(data["target_logits"]) == len(data["answer_token_ids"]) - 3


def test_auto_without_tags_explains_as_before(lm_dir, doc, tmp_path, capsys):
    out = tmp_path / "r"
    rc, printed, _ = run_cli(["explain", "--model", lm_dir, "--document", doc, "--answer", " the valve", "--out", out,
                              "--quiet", "--no-chat"], capsys)
    assert rc == 0 and "reasoning" not in printed        # (a tokenizer without think tags: not a reasoning model)
    assert "reasoning" not in json.loads((out / "explanation.json").read_text())


@pytest.mark.parametrize("extra,match", [
    (["--hops", "-1"], "--hops must be 0 or more"),
    (["--reasoning", "5"], "use auto, none or START:END"),
    (["--reasoning", "0:9"], "START < END"),
    (["--reasoning", "0:1", "--per-token"], "--per-token is not available"),
])
def test_bad_reasoning_options_exit_2(lm_dir, doc, tmp_path, capsys, extra, match):
    rc, _, err = run_cli(["explain", "--model", lm_dir, "--document", doc, "--answer", " the valve", "--out",
                          tmp_path / "r", "--quiet", "--no-chat", *extra], capsys)
    assert rc == 2 and match in err


def test_evaluate_on_a_document_with_a_reasoning_span_adds_the_hop_methods(lm_dir, doc, tmp_path, capsys):
    out = tmp_path / "e"
    rc, printed, _ = run_cli(["evaluate", "--model", lm_dir, "--document", doc, "--answer", " the valve failed in March",
                              "--reasoning", "0:3", "--hops", "1", "--methods", "attnlrp,random", "--steps", "3",
                              "--no-chat", "--out", out, "--quiet"], capsys)
    assert rc == 0
    task = json.loads((out / "evaluation.json").read_text())["tasks"]["document"]
    assert set(task["methods"]) == {"attnlrp", "random", "attnlrp_hops_positive", "attnlrp_hops_signed"}
    assert task["hops"] == 1 and task["reasoning"] == "--reasoning 0:3"
    for r in task["methods"].values():
        assert {"abpc", "rise", "mas", "rise_ap"} <= set(r)
    assert "attnlrp_hops_signed" in printed
