"""--hops needs a reasoning span: an error with --reasoning none or on a model without think tags, in explain and
evaluate; fine with the shipped reasoning task."""

from types import SimpleNamespace

import pytest

from attnlrp_fast.app import longdoc
from cli_helpers import one_line_error, run_cli


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
