"""The `attnlrp-fast check` / `info` commands."""

import os
import subprocess
import sys

import pytest
import torch

from attnlrp_fast import cli


def test_check_passes_and_prints_a_table(capsys):
    assert cli.main(["check", "--device", "cpu", "--dtype", "float32", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out
    assert out.count("attnlrp") >= 4 and "window+softcap" in out


def test_check_fails_on_a_wrong_engine(monkeypatch, capsys):
    """The check compares with the reference for real: a broken backward makes it fail."""
    import attnlrp_fast.reference as reference

    real = reference.attention_bwd_torch
    monkeypatch.setattr(reference, "attention_bwd_torch",
                        lambda *a, **kw: tuple(1.01 * g for g in real(*a, **kw)))
    assert cli.main(["check", "--device", "cpu", "--dtype", "float32", "--backend", "torch"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_missing_cuda_is_one_clear_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, "-m", "attnlrp_fast.cli", "check", "--device", "cuda"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "attnlrp-fast: error: --device cuda: no CUDA device is available here (try --device cpu)"
    assert "Traceback" not in proc.stderr


def test_triton_backend_without_interpreter_is_one_clear_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, "-m", "attnlrp_fast.cli", "check", "--backend", "triton"],
                          capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("attnlrp-fast: error: --backend triton: backend='triton' on cpu tensors needs")


def test_info(capsys):
    assert cli.main(["info"]) == 0
    assert "backend=None on cpu tensors" in capsys.readouterr().out
