"""Shared pieces of the benchmark-harness tests (tests/bench/): the device script, the environment a test runs it in,
gpu_check's configurations for the smoke and the device run, the JSON-lines logs and a stand-in for the timings."""

import json
import os
import sys
import time
from pathlib import Path

from bench import gate, gpu_check, table  # the repository root: tests run from it

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"
DEVICE_RUN = str(ROOT / "bench" / "device_run.sh")
OUT_FILES = 7          # what a device run leaves in $OUT (at most 8 come back)


def smoke_check(**kw):
    return gpu_check.Check(smoke=True, cuda=False, out=Path("."), e2e_args="", **kw)


def device_check():
    return gpu_check.Check(smoke=False, cuda=False, out=Path("."), e2e_args="")


def script_env(**kw):
    """This process's environment for bench/device_run.sh, less what a test must set itself, plus `kw`."""
    env = {k: v for k, v in os.environ.items() if k not in ("SKIP_INSTALL", "LIMIT_S", "GPU_CHECK_ARGS", "PIP",
                                                             table.ENV, gate.FORCE_ENV)}
    return {**env, "PYTHON": sys.executable, **kw}


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def preflight_record(env_txt):
    """The pre-flight record device_run.sh writes into env.txt."""
    (line,) = [ln for ln in Path(env_txt).read_text().splitlines() if ln.startswith("preflight: ")]
    return json.loads(line[len("preflight: "):])


def fake_measure(pause, fwd_ms=1.0):
    """gpu_check.measure's stand-in: fixed figures after `pause` seconds."""
    def measure(method, q, k, v, causal, cuda):
        time.sleep(pause)
        return {"fwd_ms": fwd_ms} if method.fwd_only else {"fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_ms + 2.0}
    return measure
