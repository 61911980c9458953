"""The `attnlrp-fast check` / `info` commands."""

import os
import subprocess
import sys

import pytest
import torch

from attnlrp_fast.app import cli


def test_check_passes_and_prints_a_table(capsys):
    assert cli.main(["check", "--device", "cpu", "--dtype", "float32", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out
    assert out.count("attnlrp") >= 4 and "window+softcap" in out


def test_check_fails_on_a_wrong_engine(monkeypatch, capsys):
    """The check compares with the reference for real: a broken backward makes it fail."""
    from attnlrp_fast.bindings import torch_path

    real = torch_path.attention_bwd_torch
    monkeypatch.setattr(torch_path, "attention_bwd_torch",
                        lambda *a, **kw: tuple(1.01 * g for g in real(*a, **kw)))
    assert cli.main(["check", "--device", "cpu", "--dtype", "float32", "--backend", "torch"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_missing_cuda_is_one_clear_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, "-m", "attnlrp_fast.app.cli", "check", "--device", "cuda"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("attnlrp-fast: error: --device 'cuda': no CUDA device is available here "
                                   "(use cpu or auto)")
    assert "Traceback" not in proc.stderr


def test_triton_backend_without_interpreter_is_one_clear_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, "-m", "attnlrp_fast.app.cli", "check", "--backend", "triton"],
                          capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("attnlrp-fast: error: --backend triton: backend='triton' on cpu tensors needs")


def test_explain_with_a_backend_that_cannot_run_is_one_line_before_loading_the_model(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    doc = tmp_path / "doc.txt"
    doc.write_text("A short document.", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "attnlrp_fast.app.cli", "explain", "--model",
                           str(tmp_path / "no-model"), "--document", str(doc), "--backend", "triton", "--out",
                           str(tmp_path / "out")],
                          capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    # the backend is refused first: the missing model folder is not reached
    assert proc.stderr.startswith("attnlrp-fast: error: --backend triton: backend='triton' on cpu tensors needs")
    assert not (tmp_path / "out").exists()


def test_info(capsys):
    assert cli.main(["info"]) == 0
    assert "backend=None on cpu tensors" in capsys.readouterr().out
