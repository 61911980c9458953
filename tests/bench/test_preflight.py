"""The device run's first steps: the pre-flight record (bench/preflight.py) and the install that falls back to a
--target folder, then to the checkout on PYTHONPATH."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import preflight
from device_run_helpers import DEVICE_RUN, preflight_record, script_env

ROOT = Path(__file__).resolve().parents[2]


def test_the_preflight_record():
    record = preflight.record(install="target")
    assert record["install"] == "target" and record["gpu"] is None           # no CUDA here
    assert record["versions"]["torch"] == torch.__version__ and record["versions"]["numpy"]
    variants = record["forward_variants"]
    assert set(variants) >= {"hopper", "tma", "portable"} and variants["portable"]["runs"]
    assert Path(record["imported_from"]["kernels"]) == ROOT / "kernels"
    if os.environ.get("TRITON_INTERPRET") == "1":   # the interpreter runs the descriptor kernels on CPU tensors
        assert variants["tma"] == {"runs": True, "why_not": None, "with_padding": True, "why_not_with_padding": None}
    tma = preflight.forward_variants(dtype=torch.float32)["tma"]      # what cannot run says why
    assert not tma["runs"] and "float16 or bfloat16" in tma["why_not"]


def _step0(tmp_path, **env):
    """Step 0 alone (`bash bench/device_run.sh preflight`)."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", DEVICE_RUN, "preflight"], capture_output=True, text=True, timeout=240,
                          env=script_env(OUT=str(out), **env))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out, proc


def _fake_pip(tmp_path, editable_fails, target_fails):
    pip = tmp_path / "pip"
    pip.write_text("#!/bin/sh\n"
                   f'case " $* " in *" -e "*) {"exit 1" if editable_fails else ""};; esac\n'
                   f'case " $* " in *" --target "*) {"exit 1" if target_fails else ""};; esac\n'
                   f'exec {sys.executable} -m pip "$@"\n')
    pip.chmod(0o755)
    return str(pip)


@pytest.mark.slow
def test_the_install_falls_back_to_a_target_folder_then_to_the_checkout_on_pythonpath(tmp_path):
    """Every Python step runs under PYTHON. An editable install that fails (a read-only site-packages): a plain install
    into a folder on PYTHONPATH; when that fails too, the checkout itself through a folder that maps kernels/ and
    python_bindings/ as setup.py does. env.txt records which, in the pre-flight record."""
    calls = tmp_path / "calls"
    wrapper = tmp_path / "my-python"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    out, proc = _step0(tmp_path / "a", PIP=_fake_pip(tmp_path, True, False), PYTHON=str(wrapper))
    assert "install: target" in proc.stdout and f"python: {wrapper}" in (out / "env.txt").read_text()
    assert any("bench/preflight.py" in c for c in calls.read_text().splitlines())
    record = preflight_record(out / "env.txt")
    assert record["install"] == "target" and "attnlrp_fast_site." in record["imported_from"]["kernels"]
    assert record["versions"]["executable"] == sys.executable and record["forward_variants"]["portable"]["runs"]
    assert sorted(p.name for p in out.iterdir()) == ["env.txt"]      # step 0 only
    out, proc = _step0(tmp_path / "b", PIP=_fake_pip(tmp_path, True, True))
    assert "install: path" in proc.stdout
    record = preflight_record(out / "env.txt")
    assert record["install"] == "path" and "attnlrp_fast_path." in record["imported_from"]["attnlrp_fast"]
    assert record["imported_from"]["kernels"] == str(ROOT / "kernels")      # the checkout's own files
