"""The `attnlrp-fast` command line: --help without torch, the parser's choices equal to the engine's, a module per
command, a model that needs no download (make-model, --model tiny, the shipped recall model), evaluate's progress
and partial JSON, one line for a too-long input, `check` naming what it checked."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnlrp_fast.app import cli
from attnlrp_fast.app.commands import check as check_command

ROOT = Path(__file__).resolve().parents[2]


TORCH_FREE = """
import sys
sys.argv = ["attnlrp-fast"] + sys.argv[1:]
from attnlrp_fast.app.cli import main
try:
    main()
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "transformers", "triton", "numpy") if m in sys.modules)
print("HEAVY:" + ",".join(heavy), file=sys.stderr)
"""


@pytest.mark.parametrize("args", [["--help"], ["explain", "--help"], ["evaluate", "--help"],
                                  ["explain", "--rule", "lime"]])
def test_help_and_option_errors_import_no_torch(args):
    """The console script's own import path (attnlrp_fast.app.cli:main) answers --help without torch & co."""
    proc = subprocess.run([sys.executable, "-c", TORCH_FREE, *args], capture_output=True, text=True, timeout=60)
    assert ("usage: attnlrp-fast" in proc.stdout) != ("attnlrp-fast explain: error: argument --rule" in proc.stderr)
    assert proc.stderr.strip().splitlines()[-1] == "HEAVY:"


def test_the_parser_choices_match_the_engine():
    from attnlrp_fast import estimate
    from attnlrp_fast.bindings import dispatch
    from attnlrp_fast.kernels.rules import RULES

    assert (cli.DEVICES, cli.DTYPES, cli.BACKENDS) == (dispatch.DEVICES, dispatch.DTYPES, dispatch.BACKENDS)
    assert cli.RULES == RULES and cli.ESTIMATE_MODES == estimate.MODES



def test_every_command_runs_in_a_module_of_its_own():
    """app/cli.py is the parser; each command's code is app/commands/<command>.py with run(args), imported by a plain
    import statement once the arguments parse: no import hidden from static tools (no proxies, no import_module)."""
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"explain", "demo", "evaluate", "check", "estimate", "make-model", "info", "neurons"}
    for name in sub.choices:
        module = cli.command_module(name)
        assert module.__name__ == "attnlrp_fast.app.commands." + name.replace("-", "_") and callable(module.run)
    app = ROOT / "attnlrp_fast" / "app"
    assert {p.stem for p in (app / "commands").glob("*.py")} - {"__init__"} == \
        {name.replace("-", "_") for name in sub.choices}
    for path in [*app.glob("*.py"), *(app / "commands").glob("*.py")]:
        text = path.read_text(encoding="utf-8")
        assert "import_module" not in text and "__getattr__" not in text and "importlib" not in text.replace(
            "importlib.resources", ""), path.name
    with pytest.raises(ValueError, match="no module runs the command 'nope'"):
        cli.command_module("nope")

# --- a model that needs no download ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    assert cli.main(["make-model", str(folder), "--hidden", "32"]) == 0
    return folder


def test_make_model_writes_a_loadable_model_with_a_chat_template(tiny_dir, capsys):
    from transformers import AutoTokenizer

    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert tok.chat_template and tok.is_fast
    assert "<|assistant|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                      add_generation_prompt=True)
    assert cli.main(["make-model", str(tiny_dir)]) == 2   # not over an existing model
    assert "not an empty folder" in capsys.readouterr().err


def test_explain_with_model_tiny_and_the_default_document(tmp_path, capsys):
    out = tmp_path / "r"
    assert cli.main(["explain", "--model", "tiny", "--answer", " the valve", "--max-new-tokens", "2", "--quiet",
                     "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "answer is noise" in stdout and "of it on the document" in stdout
    data = json.loads((out / "explanation.json").read_text())
    assert data["model"] == "tiny" and len(data["tokens"]) > 1000       # the shipped sample report
    page = (out / "explanation.html").read_text()
    assert "<h2>Most relevant paragraphs</h2>" in page and "<th>Document tokens</th>" in page


def test_the_shipped_recall_model_has_a_tokenizer_and_answers(tmp_path, capsys):
    from transformers import AutoTokenizer

    from attnlrp_fast.evaluation import recall

    path = str(recall.weights_path())
    tok = AutoTokenizer.from_pretrained(path)
    assert tok("k3 v17 ? k3")["input_ids"] == [recall.BOS, recall.KEY0 + 3, recall.VALUE0 + 17, recall.QUERY,
                                               recall.KEY0 + 3]
    doc = tmp_path / "recall.txt"
    doc.write_text("k4 v9 _1 k7 v2 k12 v30 _5 k20 v11 ? k7", encoding="utf-8")
    assert cli.main(["explain", "--model", path, "--document", str(doc), "--no-chat", "--max-new-tokens", "1",
                     "--quiet", "--out", str(tmp_path / "r")]) == 0
    assert "answer (greedy): 'v2'" in capsys.readouterr().out
    data = json.loads((tmp_path / "r" / "explanation.json").read_text())
    top = max(range(len(data["relevance"])), key=data["relevance"].__getitem__)
    assert data["tokens"][top].strip() in ("k7", "v2")   # the evidence pair


# --- evaluate: progress lines, partial JSON, one document -------------------------------------------------------
def test_evaluate_on_one_document_reports_progress_and_partial_json(tiny_dir, tmp_path, monkeypatch):
    from attnlrp_fast.evaluation import faithfulness

    doc = tmp_path / "doc.txt"
    doc.write_text("The valve failed in March. Runoff reached the intake.\n\nBudgets rose.", encoding="utf-8")
    out = tmp_path / "eval"
    seen = []
    real = faithfulness.run_document

    def spy(*a, on_result=None, **kw):
        def check(method, result):
            on_result(method, result)
            seen.append(json.loads((out / "evaluation.json").read_text()))
        return real(*a, on_result=check, **kw)

    monkeypatch.setattr(faithfulness, "run_document", spy)
    args = ["evaluate", "--model", str(tiny_dir), "--document", str(doc), "--answer", " the valve",
            "--methods", "attnlrp,random", "--steps", "2", "--out", str(out)]
    proc_out = _run_capturing(args)
    assert proc_out.rc == 0
    assert [sorted(s["tasks"]["document"]["methods"]) for s in seen] == [["attnlrp"], ["attnlrp", "random"]]
    assert all(s["partial"] for s in seen)
    final = json.loads((out / "evaluation.json").read_text())
    assert "partial" not in final and "partial" not in final["tasks"]["document"]
    assert "evaluating the document: 1/2 methods" in proc_out.err
    assert "evaluating the document: 2/2 methods" in proc_out.err
    assert "nan" not in proc_out.out and "(n=1: no s.e.)" in proc_out.out


class _Captured:
    def __init__(self, rc, out, err):
        self.rc, self.out, self.err = rc, out, err


def _run_capturing(args):
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    err.isatty = lambda: False
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(args)
    return _Captured(rc, out.getvalue(), err.getvalue())


def test_the_table_gives_no_nan_for_one_sample():
    row = {"abpc": 1.0, "abpc_per_row": [1.0], "seconds": 0.1}
    table = faithfulness_table({"attnlrp": row, "random": {**row, "abpc": 0.25, "abpc_per_row": [0.25]}})
    assert "nan" not in table and "-0.750 (n=1: no s.e.); 0 of 1" in table


def faithfulness_table(methods):
    from attnlrp_fast.evaluation import faithfulness

    return faithfulness.table({"tasks": {"document": {"methods": methods}}})


# --- one line for a too-long input; check names its engine ----------------------------------------------------
@pytest.mark.slow
def test_a_too_long_document_is_one_line_on_stderr(tmp_path):
    from transformers import AutoTokenizer

    from tiny_lm import make_local_lm

    folder = tmp_path / "short"
    make_local_lm(folder, max_positions=64)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.model_max_length = 64      # what makes the tokenizer warn "Token indices sequence length is longer ..."
    tok.save_pretrained(folder)
    doc = tmp_path / "doc.txt"
    doc.write_text("The valve failed in March. " * 40, encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "attnlrp_fast.app.cli", "explain", "--model", str(folder),
                           "--document", str(doc), "--quiet", "--out", str(tmp_path / "o")], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "TRANSFORMERS_VERBOSITY": "warning"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnlrp-fast: error: the prompt is"), proc.stderr


def test_check_says_which_engine_it_checked(monkeypatch):
    import torch

    from attnlrp_fast import kernels

    cpu = torch.device("cpu")
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    monkeypatch.setattr(check_command, "interpreting", lambda: False)
    engine, hint = check_command._engine_checked(cpu, torch.float32, "torch")
    assert engine == "the torch path on cpu (PyTorch operations, not the Triton kernels)"
    assert hint.startswith("to check the Triton kernels on this CPU: TRITON_INTERPRET=1 attnlrp-fast check")
    monkeypatch.setattr(kernels, "interpreting", lambda: True)
    monkeypatch.setattr(check_command, "interpreting", lambda: True)
    engine, hint = check_command._engine_checked(cpu, torch.float32, "triton")
    assert engine.startswith("the Triton kernels in Triton's interpreter on the CPU") and hint is None
