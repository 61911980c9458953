"""`explain --context-parallel` under torchrun (2 gloo processes on CPU): rank 0 writes the report, whose relevance
equals the one-process command's; outside torchrun, and with what it cannot take, one line."""

import json
import os
import socket
import subprocess
import sys

import pytest
from cli_helpers import one_line_error, run_cli

ANSWER = "The bridge opened in spring."


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_explain_equals_one_process(tmp_path, doc, capsys):
    common = ["explain", "--model", "tiny", "--document", str(doc), "--question", "When did the bridge open?",
              "--answer", ANSWER, "--device", "cpu", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "attnlrp_fast.app.cli", *common, "--context-parallel",
           "--out", str(tmp_path / "cp")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reports:" in done.stdout and done.stdout.count("reports:") == 1   # rank 0 alone reports
    rc, _, err = run_cli(common + ["--out", tmp_path / "one"], capsys)
    assert rc == 0, err
    cp = json.loads((tmp_path / "cp" / "explanation.json").read_text())
    one = json.loads((tmp_path / "one" / "explanation.json").read_text())
    assert cp["tokens"] == one["tokens"]
    assert cp["context_parallel"]["ranks"] == 2
    a, b = cp["relevance"], one["relevance"]
    diff = sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5
    norm = sum(y * y for y in b) ** 0.5
    assert len(a) == len(b) and diff < 1e-5 * norm, (diff, norm)


def test_outside_torchrun_is_one_line(tmp_path, doc, capsys, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    rc, _, err = run_cli(["explain", "--model", "tiny", "--document", doc, "--answer", ANSWER, "--device", "cpu",
                          "--context-parallel", "--out", tmp_path], capsys)
    one_line_error(rc, err, "torchrun", "RANK")


@pytest.mark.parametrize("extra,words", [([], "pass --answer"), (["--answer", ANSWER, "--per-token"], "--per-token"),
                                         (["--answer", ANSWER, "--seq-chunk", "8"], "--seq-chunk")])
def test_what_it_cannot_take_is_one_line(tmp_path, doc, capsys, extra, words):
    rc, _, err = run_cli(["explain", "--model", "tiny", "--document", doc, "--device", "cpu", "--context-parallel",
                          "--out", tmp_path, *extra], capsys)
    one_line_error(rc, err, "--context-parallel", words)
