"""The `attnlrp-fast` command and the benchmark harness's CPU smoke mode."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnlrp_fast import cli

ROOT = Path(__file__).resolve().parent.parent


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


def test_bench_harness_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main(["--smoke", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*-smoke.json")
    result = json.loads(path.read_text())
    assert result["device"] and result["versions"]["torch"] == torch.__version__ and result["date"]
    assert all(e is None or e < 1e-4 for errs in result["spot_check_rel_err"].values() for e in errs.values())
    methods = {row["method"] for row in result["timings"]}
    assert {"attnlrp_fast[attnlrp]", "lxt_style[sdpa]", "sdpa[default]", "eager"} <= methods
    for row in result["timings"]:
        assert "error" not in row and math.isfinite(row["fwd_ms"]) and row["fwd_ms"] > 0
