"""Time-capped steps for bench/gpu_check.py: one results JSON rewritten after every measurement, a JSON-lines log
appended as it goes (so a kill loses nothing already measured; child processes append to it too, one whole line
per write), a budget per step under one overall deadline, and child processes that die with their own children
when their time is up.

A step runs under its budget: in-process loops ask `run.step_left()` before each measurement, child processes
(`Capped`) are killed at the step's end, and SIGALRM stops a measurement that overruns it by more than GRACE_S.
A step that errs is recorded and the next step runs: a run within its time limit brings back everything that
worked.
"""

import contextlib
import datetime
import glob
import json
import os
import signal
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GRACE_S = 5.0        # how far past its budget a step may run before SIGALRM stops it


def append_line(path, line):
    """Append one JSON line in a single write (O_APPEND): lines of several processes never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


class StepTimeout(BaseException):
    """Raised by SIGALRM in a step that overran its budget (a BaseException: `except Exception` won't eat it)."""


@contextlib.contextmanager
def alarm(seconds):
    """Raise StepTimeout in the main thread after `seconds` (no-op where SIGALRM is unavailable or off-main)."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise StepTimeout(f"stopped {GRACE_S:g} s past its budget")
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def triton_cache_dir():
    try:
        import triton

        return Path(triton.knobs.cache.dir)
    except (ImportError, AttributeError):
        return Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")


def compiled_kernels():
    """How many compiled kernels Triton's on-disk cache holds (one `__grp__*.json` per compile)."""
    return len(glob.glob(str(triton_cache_dir() / "*" / "__grp__*.json")))


class Capped:
    """A child process in its own process group, killed with all its children once `seconds` have passed."""

    def __init__(self, cmd, seconds, stdout, env=None, cwd=ROOT):
        self.cmd, self.started, self.timed_out = cmd, time.monotonic(), False
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=stdout, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.timer = threading.Timer(max(seconds, 0.0), self._expire)
        self.timer.daemon = True
        self.timer.start()

    def _expire(self):
        self.timed_out = self.proc.poll() is None
        self.kill()

    def kill(self):
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def wait(self):
        """{"returncode" (None when killed at its time limit), "timed_out", "seconds"}."""
        try:
            rc = self.proc.wait()
        finally:
            self.timer.cancel()
            self.kill()
        return {"returncode": None if self.timed_out else rc, "timed_out": self.timed_out,
                "seconds": round(time.monotonic() - self.started, 1)}


@dataclass
class Run:
    """One run's results (`result`, saved to `json_path`), its JSON-lines log and its deadlines."""
    result: dict
    json_path: Path
    log_path: Path
    deadline: float                       # time.monotonic() at which the whole run must end
    started: float = field(default_factory=time.monotonic)
    step_deadline: float = 0.0

    def left(self):
        return self.deadline - time.monotonic()

    def step_left(self):
        return min(self.step_deadline, self.deadline) - time.monotonic()

    def save(self):
        tmp = self.json_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1))
        tmp.replace(self.json_path)          # a kill never leaves half a JSON behind

    def log(self, step, event, **data):
        line = {"t": round(time.monotonic() - self.started, 1), "step": step, "event": event, **data}
        append_line(self.log_path, line)

    def row(self, step, key, row):
        """Append `row` to result[key], log it and save: one measurement is never lost."""
        self.result.setdefault(key, []).append({**row, "step": step})
        self.log(step, "row", **row)
        print(json.dumps(row), flush=True)
        self.save()


def _begin(run, name, budget_s, budget):
    record = {"budget_s": round(budget_s, 1)}
    run.result.setdefault("steps", {})[name] = record
    if name not in run.result.setdefault("unfinished", []):
        run.result["unfinished"].append(name)
    run.step_deadline = time.monotonic() + budget
    return record


def _end(run, name, record, status, start, compiles_before):
    record.update(status=status, seconds=round(time.monotonic() - start, 1),
                  triton_compiles=compiled_kernels() - compiles_before)
    if status == "done":
        run.result["unfinished"].remove(name)
        run.result.setdefault("dates", {})[name] = datetime.datetime.now().isoformat(timespec="seconds")
    run.log(name, "end", **record)
    run.save()
    print(f"[{name}] {status} in {record['seconds']} s (budget {record['budget_s']:.0f} s)", flush=True)


def run_step(run, name, budget_s, fn):
    """Run fn(run) -> complete (False: stopped early) under min(budget_s, time left); record it in
    result["steps"][name] (status, seconds, Triton compiles) and keep it in result["unfinished"] unless it
    completed. A step that raises (any Exception) is recorded and returns; KeyboardInterrupt (the outer time limit)
    propagates."""
    budget = min(budget_s, run.left())
    record = _begin(run, name, budget_s, budget)
    if budget <= 1:
        record["status"] = "skipped: no time left"
        run.log(name, "skip")
        run.save()
        return record
    run.log(name, "start", budget_s=round(budget, 1))
    run.save()
    start, before, status = time.monotonic(), compiled_kernels(), "done"
    try:
        with alarm(budget + GRACE_S):
            if fn(run) is False:
                status = "out of time"
    except StepTimeout as e:
        status = f"out of time ({e})"
    except KeyboardInterrupt:
        _end(run, name, record, "interrupted", start, before)
        raise
    except Exception as e:  # noqa: BLE001 - recorded; the next step still runs
        traceback.print_exc()
        status = f"error: {type(e).__name__}: {str(e)[:300]}"
    _end(run, name, record, status, start, before)
    return record
