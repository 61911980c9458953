"""The benchmark harness on CPU: bench/device_run.sh's whole GPU check run end to end in smoke mode (Triton's
interpreter, tiny sizes: the pre-flight record, the correctness gate, the tests step, the warm-up, spot check,
timings, decode, dispatch table, profile, memory, end to end, sweep), the gate's verdicts steering the later steps,
the install fallbacks, the plan, time caps and partial results, rows that raise, the LXT-style baseline computing
the same relevance as af.explain, plots and README tables from the JSON, the CPU memory benchmark, and the
pytest-benchmark suite running once per benchmark."""

import copy
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers as tf

import attnlrp_fast as af

ROOT = Path(__file__).resolve().parent.parent
from attnlrp_fast.baselines import lxt_style
from bench import cpu_explain, e2e, gate, gpu_check, memory, preflight, runner, table, warm_cache  # the repository root

from bench import report as bench_report

PNG = b"\x89PNG\r\n\x1a\n"
DEVICE_RUN = str(ROOT / "bench" / "device_run.sh")
OUT_FILES = 7          # what a device run leaves in $OUT (at most 8 come back)


def _smoke_check(**kw):
    return gpu_check.Check(smoke=True, cuda=False, out=Path("."), e2e_args="", **kw)


def _device_check():
    return gpu_check.Check(smoke=False, cuda=False, out=Path("."), e2e_args="")


@pytest.fixture(autouse=True)
def _environment_restored():
    """gpu_check.main exports the dispatch table, the dQ mode and more for the steps after the gate: undo it."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _script_env(**kw):
    env = {k: v for k, v in os.environ.items() if k not in ("SKIP_INSTALL", "LIMIT_S", "GPU_CHECK_ARGS", "PIP",
                                                             table.ENV, gate.FORCE_ENV)}
    return {**env, "PYTHON": sys.executable, **kw}


@pytest.fixture(scope="module")
def device_smoke(tmp_path_factory):
    """`SMOKE=1 bash bench/device_run.sh`, no argument: the whole check, as a GPU machine runs it."""
    out = tmp_path_factory.mktemp("out")
    t = time.monotonic()
    proc = subprocess.run(["bash", DEVICE_RUN], capture_output=True, text=True, timeout=400,
                          env=_script_env(SMOKE="1", OUT=str(out)))
    return out, proc, time.monotonic() - t


@pytest.fixture(scope="module")
def smoke_json(device_smoke):
    out, proc, _ = device_smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = out.glob("*-smoke.json")
    return path


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _preflight(env_txt):
    (line,) = [ln for ln in Path(env_txt).read_text().splitlines() if ln.startswith("preflight: ")]
    return json.loads(line[len("preflight: "):])


# --- the whole check, end to end ----------------------------------------------------------------------------
def test_device_script_runs_every_step_and_returns_its_files(device_smoke, smoke_json):
    out, proc, seconds = device_smoke
    files = sorted(p.name for p in out.iterdir())
    assert all((out / f).is_file() for f in files) and len(files) == OUT_FILES <= 8       # what comes back
    assert set(files) == {smoke_json.name, smoke_json.stem + ".jsonl", "env.txt", "run.log", "pytest-gpu.log",
                          "warm.log", "dispatch.json"}
    env_txt = (out / "env.txt").read_text()
    assert "torch" in env_txt and "install: skipped" in env_txt and "[sweep] done" in (out / "run.log").read_text()
    record = _preflight(out / "env.txt")
    assert record["install"] == "skipped" and record["versions"]["executable"] == sys.executable
    result = json.loads(smoke_json.read_text())
    assert result["preflight"]["forward_variants"] == record["forward_variants"]
    assert "unfinished" not in result and set(result["dates"]) == set(gpu_check.STEPS)
    assert [r["status"] for r in result["steps"].values()] == ["done"] * len(gpu_check.STEPS)
    assert sum(r["seconds"] for r in result["steps"].values()) < result["limit_s"] < 500
    events = _jsonl(out / (smoke_json.stem + ".jsonl"))
    for step in gpu_check.STEPS:                     # each step's start and end, in order, as JSON lines
        assert [e["event"] for e in events if e["step"] == step and e["event"] in ("start", "end")] == ["start", "end"]
    logged = [e for e in events if e["event"] == "row" and e["step"] in ("timings", "sweep")]
    assert [e["method"] for e in logged] == [r["method"] for r in result["timings"]]
    assert "Targets:" in proc.stdout and "Steps (seconds / budget" in proc.stdout
    assert "Correctness gate against float64" in proc.stdout
    print(f"device_run.sh smoke: {seconds:.0f} s")


def test_smoke_gate_checks_every_variant_and_logs_each_case(smoke_json):
    result = json.loads(smoke_json.read_text())
    units = gate.available_units(smoke=True)
    verdicts = result["gate"]["verdicts"]
    assert set(verdicts) == {u.variant for u in units} >= {"hopper", "tma", "portable", "dq=separate", "dq=atomic",
                                                            "sdpa"}
    assert all(v["status"] == "pass" for v in verdicts.values()), verdicts
    cases = [e for e in _jsonl(smoke_json.with_suffix(".jsonl")) if e["event"] == "case"]
    assert len(cases) == sum(len(u.cases()) for u in units) == sum(sum(v["cases"].values()) for v in verdicts.values())
    # the descriptor kernels cannot take fp32 (recorded as such, not as failures); everything else passes
    assert {c["variant"] for c in cases if c["status"] == "unsupported"} == {"hopper", "tma"}
    assert all(c["status"] == "pass" for c in cases if c["variant"] not in ("hopper", "tma"))
    assert all("float32" in c["case"] for c in cases if c["status"] == "unsupported")
    dispatch = json.loads((smoke_json.parent / "dispatch.json").read_text())
    assert table.validator() is None or table.validator()(dispatch) is dispatch
    assert dispatch["gated_out"] == {} and dispatch["forward"] == "portable" and dispatch["dq"] == "separate"
    assert dispatch["source"] == smoke_json.name and {c["features"] for c in dispatch["cases"]} == {
        f for _, f in gpu_check.dispatch_cases(True)} | {"decode"}          # the decode step's batch-1 case


def test_smoke_tests_step_selects_the_gpu_tests_and_warms_every_later_kernel(smoke_json):
    result = json.loads(smoke_json.read_text())
    tests = result["gpu_tests"]
    log = (smoke_json.parent / "pytest-gpu.log").read_text()
    assert tests["returncode"] == 0 and tests["counts"] == {"SKIPPED": tests["counts"]["SKIPPED"]}   # no CUDA here
    assert tests["counts"]["SKIPPED"] >= 90 and gpu_check.TEST_WORDS in tests["selection"]
    ids = [line.split()[0] for line in log.splitlines() if ".py::" in line.split(" ")[0]]
    words = re.compile("|".join(gpu_check.TEST_WORDS.split(" or ")))
    assert len(ids) == tests["counts"]["SKIPPED"] and all(words.search(i) for i in ids)
    for name in ("head_dims", "deterministic", "fully_masked_rows", "agrees_with_sdpa", "decode_prefill"):
        assert any(name in i for i in ids), name
    items, _ = gpu_check.warm_items(_smoke_check(verdicts=result["gate"]["verdicts"]))
    warm = result["warm"]
    assert warm["returncode"] == 0 and warm["planned"] == warm["warmed"] == len(items) and warm["errors"] == []
    assert result["plan"]["timings"]["compiled_here"] == 0 and result["plan"]["tests"]["kernels"] > 0


def test_smoke_measures_each_step(smoke_json):
    result = json.loads(smoke_json.read_text())
    spot = result["spot_check_rel_err"]
    assert set(spot) == {"grad", "attnlrp", "cp", "grad,path=sdpa", "attnlrp,path=sdpa"}
    assert all(e is None or e < 1e-4 for errs in spot.values() for e in errs.values())
    timed = [r for r in result["timings"] if r["step"] == "timings"]
    core = gpu_check.core_names(gpu_check.methods(smoke=True))
    assert [(gpu_check.shape_of(r), r["method"]) for r in timed] == \
        [(s, m) for s in gpu_check.timing_shapes(True) for m in core]
    assert core.index("lxt_style[sdpa]") < core.index("attnlrp_fast[grad]")          # the baselines first
    for row in result["timings"]:
        assert "error" not in row and math.isfinite(row["fwd_ms"]) and row["fwd_ms"] > 0
        assert row["fwd_tflops"] == pytest.approx(gpu_check.flops_fwd(row["B"], row["H"], row["N"], row["N"], row["D"],
                                                                       row["causal"]) / row["fwd_ms"] / 1e9)
        assert ("fwd_bwd_ms" in row) == (row["method"] != "attnlrp_fast[grad,fwd=portable]")   # forward only
        assert row.get("forward") == ("portable" if row["method"].startswith("attnlrp_fast[") and
                                      "path=sdpa" not in row["method"] else None)   # fp32: the portable kernel
    device_methods = gpu_check.methods(smoke=False)
    assert all(device_methods[f"attnlrp_fast[grad,fwd={v}]"].fwd_only for v in ("tma", "hopper"))  # bf16: GPU only
    swept = {gpu_check.shape_of(r) for r in result["timings"] if r["step"] == "sweep"}
    assert swept == set(gpu_check.sweep_shapes(True)) - set(gpu_check.timing_shapes(True)) and swept
    assert {"eager", "lxt_style[eager]"} <= {r["method"] for r in result["timings"] if r["step"] == "sweep"}
    decode = result["decode"]
    assert [r["method"] for r in decode][0] == "sdpa[default]" and all("error" not in r and r["ms"] > 0 for r in decode)
    forwards = {r["method"]: r.get("forward") for r in decode}
    assert forwards["attnlrp_fast[triton,fwd=decode]"] == "decode" and forwards["attnlrp_fast[triton]"]
    assert [r["path"] for r in result["dispatch_rows"] if r["case"] == result["dispatch_rows"][0]["case"]] == \
        ["sdpa", "forward=portable", "triton"]                   # the baseline first, the triton path last
    assert all("error" not in r for r in result["dispatch_rows"])
    prof = result["profile"]
    assert set(prof["methods"]) == set(gpu_check.PROFILE_METHODS)
    for name, p in prof["methods"].items():
        assert p["total_ms"] > 0 and all(k["ms"] > 0 and k["count"] >= 1 for k in p["kernels"].values())
        assert any("attention_bwd" in k for k in p["kernels"]) or "path=sdpa" in name
    mem = result["memory"]
    assert mem["shape"] == gpu_check.shape_dict(gpu_check.memory_shape(True))
    assert [r["method"] for r in mem["rows"]] == ["sdpa[default]", "attnlrp_fast[attnlrp]",
                                                  "attnlrp_fast[attnlrp,dq=atomic]", "attnlrp_fast[attnlrp,path=sdpa]"]
    assert all("error" not in r and r["seconds_one_run"] > 0 for r in mem["rows"])
    e = result["e2e"]
    assert e["process"]["returncode"] == 0 and e["agreement"]["rel_err"] < 1e-5 and e["agreement"]["cosine"] > 0.99999
    assert e["agreement_triton"]["rel_err"] < 1e-5
    assert [r["method"] for r in e["rows"]][:4] == ["forward", "lxt_style", "attnlrp_fast", e2e.TRITON]
    assert all(r["explain_over_forward"] > 0 for r in e["rows"] if r["method"] != "forward")
    hop_rows = [r for r in e["rows"] if r["method"] == e2e.HOPS]   # the first size only, 2 hops in the smoke run
    assert len(hop_rows) == 1 and hop_rows[0]["hops"] == 2 and hop_rows[0]["reasoning_tokens"] > 0
    assert e["rows"][-1]["method"] == e2e.HOPS                     # after every size's other rows
    # beside each explanation, the meta estimate of the same config, length, dtype and mode (the GPU's peak is its
    # measurement; on CPU there is none)
    for r in e["rows"]:
        assert (r["estimated_peak_mib"] > 0 and "layer" in r["estimated_where"]) if r["method"] != "forward" \
            else "estimated_peak_mib" not in r


# --- steps, budgets, partial results ------------------------------------------------------------------------
def test_steps_merge_into_one_file_and_bad_arguments_are_errors(tmp_path, capsys):
    assert gpu_check.main(["--smoke", "--steps", "spot", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*-smoke.json")
    first = json.loads(path.read_text())
    assert "timings" not in first and "spot_check_rel_err" in first
    assert gpu_check.main(["--smoke", "--steps", "memory", "--out", str(tmp_path)]) == 0
    both = json.loads(path.read_text())
    assert both["spot_check_rel_err"] == first["spot_check_rel_err"] and both["memory"]["rows"]
    assert set(both["dates"]) == {"spot", "memory"}
    for bad, message in ((["--steps", "kernels,warp"], "unknown step 'warp'"),
                         (["--budget", "timings=soon"], "give STEP=SECONDS"),
                         (["--budget", "warp=3"], "unknown step 'warp'"),
                         (["--warm-n", "500"], "multiple of 16")):
        with pytest.raises(SystemExit):
            gpu_check.main(["--smoke", "--out", str(tmp_path)] + bad)
        assert message in capsys.readouterr().err


def _fake_measure(pause, fwd_ms=1.0):
    """gpu_check.measure's stand-in: fixed figures after `pause` seconds."""
    def measure(method, q, k, v, causal, cuda):
        time.sleep(pause)
        return {"fwd_ms": fwd_ms} if method.fwd_only else {"fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_ms + 2.0}
    return measure


def test_a_step_stops_at_its_budget_and_keeps_its_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "measure", _fake_measure(0.4))
    assert gpu_check.main(["--smoke", "--steps", "timings", "--budget", "timings=2", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*-smoke.json")
    result = json.loads(path.read_text())
    total = len(gpu_check.timing_shapes(True)) * len(gpu_check.core_names(gpu_check.methods(True)))
    assert result["unfinished"] == ["timings"] and result["steps"]["timings"]["status"] == "out of time"
    assert 2 <= len(result["timings"]) < total and all(r["bwd_ms"] == 2.0 for r in result["timings"] if "bwd_ms" in r)
    assert result["steps"]["timings"]["seconds"] < 2 + 1      # stopped at the budget, not after all rows


def test_an_interrupted_step_keeps_its_rows_and_a_rerun_replaces_them(tmp_path, monkeypatch):
    calls = []

    def measure_then_stop(*args):
        if len(calls) == 3:   # as the run's time limit would (timeout --signal=INT)
            raise KeyboardInterrupt
        calls.append(1)
        return _fake_measure(0)(*args)
    monkeypatch.setattr(gpu_check, "measure", measure_then_stop)
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["--smoke", "--steps", "spot,timings", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("*-smoke.json")
    result = json.loads(path.read_text())
    assert result["unfinished"] == ["timings"] and set(result["dates"]) == {"spot"}
    assert result["steps"]["timings"]["status"] == "interrupted" and len(result["timings"]) == 3
    monkeypatch.setattr(gpu_check, "measure", _fake_measure(0, fwd_ms=2.0))
    assert gpu_check.main(["--smoke", "--steps", "timings", "--out", str(tmp_path)]) == 0
    result = json.loads(path.read_text())
    assert "unfinished" not in result and len(result["timings"]) > 3
    assert all(r["fwd_ms"] == 2.0 for r in result["timings"])          # the interrupted run's rows replaced


def _run(tmp_path, seconds=60.0):
    return runner.Run({}, tmp_path / "r.json", tmp_path / "r.jsonl", deadline=time.monotonic() + seconds)


def test_run_step_stops_an_overrunning_step_and_records_a_failing_one(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "GRACE_S", 0.2)
    run = _run(tmp_path)
    t = time.monotonic()
    record = runner.run_step(run, "slow", 1.5, lambda r: time.sleep(20))   # SIGALRM at 1.5 + 0.2 s
    assert record["status"].startswith("out of time") and time.monotonic() - t < 5
    record = runner.run_step(run, "broken", 5, lambda r: 1 / 0)
    assert record["status"] == "error: ZeroDivisionError: division by zero"
    assert run.result["unfinished"] == ["slow", "broken"]
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["steps"]["broken"]["status"].startswith("error") and "slow" in saved["unfinished"]
    late = tmp_path / "late"
    late.mkdir()
    assert runner.run_step(_run(late, seconds=0.5), "late", 30, lambda r: None)["status"] == "skipped: no time left"


def test_capped_child_is_killed_with_its_children(tmp_path):
    pidfile = tmp_path / "pid"
    t = time.monotonic()
    status = runner.Capped(["bash", "-c", f"sleep 30 & echo $! > {pidfile}; wait"], 1.0, subprocess.DEVNULL).wait()
    assert status["timed_out"] and status["returncode"] is None and time.monotonic() - t < 10
    grandchild = int(pidfile.read_text())
    for _ in range(50):      # killed with its group; gone once reaped
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the child's own child outlived the time limit")
    assert runner.Capped(["true"], 5.0, subprocess.DEVNULL).wait() == {"returncode": 0, "timed_out": False,
                                                                         "seconds": pytest.approx(0, abs=2)}


def test_test_outcomes_reads_xdist_and_plain_pytest_output():
    text = ("[gw1] [ 10%] PASSED tests/test_a.py::test_x[bfloat16-64]\n"
            "[gw0] [ 20%] FAILED tests/test_a.py::test_x[bfloat16-128]\n"
            "test_b.py::test_y[bfloat16] PASSED [ 30%]\n"              # pytest runs in tests/
            "tests/test_b.py::test_z[bfloat16] SKIPPED (needs a CUDA device) [ 40%]\n"
            "========== 1 failed, 2 passed, 1 skipped in 12.3s ==========\n")
    out = gpu_check.test_outcomes(text)
    assert out["counts"] == {"FAILED": 1, "PASSED": 2, "SKIPPED": 1}
    assert out["failed"] == ["tests/test_a.py::test_x[bfloat16-128]"]
    assert out["summary"] == "1 failed, 2 passed, 1 skipped in 12.3s"
    assert gpu_check.test_outcomes("")["counts"] == {} and gpu_check.exit_status({"gpu_tests": out}) == 1


def test_a_row_that_raises_any_exception_is_recorded_and_the_step_goes_on(tmp_path, monkeypatch):
    class CompilationError(Exception):      # what Triton raises for a kernel that does not compile
        pass

    def measure(method, q, k, v, causal, cuda, kpm=None):
        if method.ours and method.ours[1] == "atomic":
            raise AssertionError("dQ out of bounds")
        if method.fwd_only:
            raise CompilationError("ptxas fatal: out of resources\nmore detail")
        return {"fwd_ms": 1.0, "fwd_bwd_ms": 3.0}
    monkeypatch.setattr(gpu_check, "measure", measure)
    assert gpu_check.main(["--smoke", "--steps", "timings", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*-smoke.json")
    result = json.loads(path.read_text())
    assert result["steps"]["timings"]["status"] == "done"
    errors = {r["method"]: r.get("error") for r in result["timings"]}
    assert errors["attnlrp_fast[grad,dq=atomic]"] == "AssertionError: dQ out of bounds"
    assert errors["attnlrp_fast[grad,fwd=portable]"] == "CompilationError: ptxas fatal: out of resources"
    assert errors["attnlrp_fast[grad]"] is None and errors["sdpa[default]"] is None
    assert len(result["timings"]) == len(gpu_check.timing_shapes(True)) * len(gpu_check.core_names(
        gpu_check.methods(True)))

    def overrun(*args, **kw):            # the step's own time limit still stops it
        raise runner.StepTimeout("stopped 5 s past its budget")
    monkeypatch.setattr(gpu_check, "measure", overrun)
    assert gpu_check.main(["--smoke", "--steps", "timings", "--out", str(tmp_path)]) == 0
    assert json.loads(path.read_text())["steps"]["timings"]["status"].startswith("out of time")


def _unit_result(unit, status="pass", why=None):
    lines = [{"event": "case", "unit": unit.name, "variant": unit.variant, "case": c.name, "status": status,
              "why": why} for c in unit.cases()]
    proc = {"returncode": 0 if status != "hang" else None, "timed_out": status == "hang", "seconds": 1.0}
    if status == "hang":
        lines = []
    return {"variant": unit.variant, "status": proc, "lines": lines, "verdict": gate.unit_verdict(unit, lines, proc)}


def test_the_gate_verdicts_decide_what_the_later_steps_run(tmp_path, monkeypatch):
    """A variant that fails the gate (simulated: its units' results) is left out of the timings, the tests step's
    selection and the warm-up, and the provisional table names it under gated_out; with hopper out, tma leads."""
    def run_gate(units, smoke, log, seconds, **kw):
        fails = {"hopper": "fail", "dq=atomic": "hang"}
        return {u.name: _unit_result(u, fails.get(u.variant, "pass"), "o 0.31 > 0.01") for u in units}
    monkeypatch.setattr(gate, "run_gate", run_gate)
    monkeypatch.setattr(gpu_check, "measure", _fake_measure(0))
    assert gpu_check.main(["--smoke", "--steps", "gate,timings", "--out", str(tmp_path)]) == 1   # a variant failed
    (path,) = tmp_path.glob("*-smoke.json")
    result = json.loads(path.read_text())
    verdicts = result["gate"]["verdicts"]
    assert verdicts["hopper"]["status"] == verdicts["dq=atomic"]["status"] == "fail"
    assert "timed out" in verdicts["dq=atomic"]["why"] and "o 0.31 > 0.01" in verdicts["hopper"]["why"]
    assert verdicts["tma"]["status"] == verdicts["portable"]["status"] == verdicts["sdpa"]["status"] == "pass"
    dispatch = json.loads((tmp_path / "dispatch.json").read_text())
    assert set(dispatch["gated_out"]) == {"hopper", "dq=atomic"} and "timed out" in dispatch["gated_out"]["dq=atomic"]
    assert dispatch["forward"] == "tma" and dispatch["dq"] == "separate"
    assert os.environ[table.ENV] == str(tmp_path / "dispatch.json") and os.environ["ATTNLRP_FAST_DQ"] == "separate"
    timed = {r["method"] for r in result["timings"]}
    assert not any("dq=atomic" in m for m in timed) and "attnlrp_fast[attnlrp]" in timed
    assert {"sdpa[default]", "attnlrp_fast[grad,path=sdpa]"} <= timed
    selection = gpu_check.test_selection(result["gate"]["verdicts"])
    assert selection[-1] == f"({gpu_check.TEST_WORDS}) and not hopper and not atomic"
    check = _smoke_check(verdicts=table.verdicts_of(dispatch)[0], forward=dispatch["forward"])   # as warm_cache.py
    assert check.order == ("tma", "portable") and not any("atomic" in n for n, _, _ in gpu_check.warm_items(check)[0])
    summary = "\n".join(bench_report.summary_lines(result))
    assert "Gated out (no later step ran them; the dispatch table names them): " in summary
    assert f"hopper: {verdicts['hopper']['why']}" in summary and "dq=atomic: " in summary


def test_no_valid_table_without_a_passing_forward_and_a_failed_gate_trusts_nothing(tmp_path, monkeypatch):
    def run_gate(units, smoke, log, seconds, **kw):
        return {u.name: _unit_result(u, "fail" if u.kind == "forward" else "pass") for u in units}
    monkeypatch.setattr(gate, "run_gate", run_gate)
    monkeypatch.setattr(gpu_check, "measure", _fake_measure(0))
    monkeypatch.delenv(table.ENV, raising=False)
    gpu_check.main(["--smoke", "--steps", "gate,timings", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("*-smoke.json")
    result = json.loads(path.read_text())
    assert result["table"] == {"written": False, "why": "no Triton flash forward passed the gate"}
    assert not (tmp_path / "dispatch.json").exists() and table.ENV not in os.environ
    ours = {r["method"] for r in result["timings"] if r["method"].startswith("attnlrp_fast")}
    assert ours == {"attnlrp_fast[grad,path=sdpa]", "attnlrp_fast[attnlrp,path=sdpa]"}   # the SDPA path passed

    def broken(*args, **kw):
        raise ImportError("no module named attnlrp_fast.kernels.attention_decode")
    monkeypatch.setattr(gate, "available_units", broken)
    gpu_check.main(["--smoke", "--steps", "gate,timings", "--out", str(tmp_path / "broken")])
    (path,) = (tmp_path / "broken").glob("*-smoke.json")
    result = json.loads(path.read_text())
    assert result["steps"]["gate"]["status"].startswith("error: ImportError") and result["gate"]["verdicts"] == {}
    assert not any(r["method"].startswith("attnlrp_fast") for r in result["timings"])   # only the baselines ran


def test_the_gate_kills_a_hanging_unit_and_fails_a_crashed_or_wrong_one(tmp_path, monkeypatch):
    """Real unit processes (smoke sizes): one hangs (killed at its time limit), one crashes, one fails a case; each
    verdict says so and the case lines of the others are in the log."""
    monkeypatch.setenv(gate.FORCE_ENV, "tma:hang,sdpa:crash,portable:fail")
    units = [u for u in gate.available_units(smoke=True) if u.variant in ("tma", "sdpa", "portable", "hopper")]
    log = tmp_path / "gate.jsonl"
    t = time.monotonic()
    results = gate.run_gate(units, True, log, seconds=60, jobs=4, unit_timeout=8)
    assert time.monotonic() - t < 40
    verdicts = gate.verdicts(results)
    assert verdicts["tma"]["status"] == "fail" and "timed out after" in verdicts["tma"]["why"]
    assert verdicts["sdpa"]["status"] == "fail" and "exited with status -11 after 0 of" in verdicts["sdpa"]["why"]
    assert verdicts["portable"]["status"] == "fail" and f"forced by {gate.FORCE_ENV}" in verdicts["portable"]["why"]
    assert verdicts["hopper"]["status"] == "pass" and verdicts["hopper"]["cases"] == {"pass": 4, "unsupported": 4}
    lines = _jsonl(log)
    assert {ln["variant"] for ln in lines} == {"hopper", "portable"}      # the hung and crashed units wrote none
    hopper = next(u for u in units if u.variant == "hopper")
    assert [ln["case"] for ln in lines if ln["variant"] == "hopper"] == [c.name for c in hopper.cases()]
    # a unit that only got what was left of the gate's time is not called hung; one never started is not run
    cut = gate.unit_verdict(hopper, [], {"returncode": None, "timed_out": True, "seconds": 3.0, "cut_by_gate": True})
    assert cut == {"status": "fail", "why": f"{hopper.name}: not finished when the gate's time ran out after 3 s "
                                            f"(0 of {len(hopper.cases())} cases done)"}
    assert gate.unit_verdict(hopper, [], None)["why"].endswith("not run (the gate's time ran out)")


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
                          env=_script_env(OUT=str(out), **env))
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
    record = _preflight(out / "env.txt")
    assert record["install"] == "target" and "attnlrp_fast_site." in record["imported_from"]["kernels"]
    assert record["versions"]["executable"] == sys.executable and record["forward_variants"]["portable"]["runs"]
    assert sorted(p.name for p in out.iterdir()) == ["env.txt"]      # step 0 only
    out, proc = _step0(tmp_path / "b", PIP=_fake_pip(tmp_path, True, True))
    assert "install: path" in proc.stdout
    record = _preflight(out / "env.txt")
    assert record["install"] == "path" and "attnlrp_fast_path." in record["imported_from"]["attnlrp_fast"]
    assert record["imported_from"]["kernels"] == str(ROOT / "kernels")      # the checkout's own files


# --- the plan and the warm-up -------------------------------------------------------------------------------
def _plan_rows(text):
    """{step: (budget, kernels, compiled here)} from the plan's table."""
    rows = {}
    for line in text.splitlines():
        t = line.split()
        if t and t[0] in gpu_check.STEPS:
            rows[t[0]] = ("rest", int(t[2]), int(t[3])) if t[1] == "rest" else (float(t[1]), int(t[3]), int(t[4]))
    return rows


def test_plan_prints_each_steps_compiles_and_budget_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", DEVICE_RUN, "--plan"], capture_output=True, text=True, timeout=300,
                          env=_script_env(OUT=str(out), LIMIT_S="500"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not out.exists()                       # nothing ran, nothing was written
    rows = _plan_rows(proc.stdout)
    assert list(rows) == list(gpu_check.STEPS)
    assert [r[0] for r in rows.values()] == [b if b is not None else "rest" for b, _, _ in gpu_check.STEPS.values()]
    # timings: 3 kinds of shape (D=128 causal, D=128 full, D=64 causal) x (4 forward kernels: the default and each
    # one forced + 4 dK/dV + 2 dQ) + the delta kernel for (D=128, H=16) and (D=64, H=32); profile and memory: forward,
    # delta, 2 dK/dV, 1 dQ (the SDPA path compiles none); spot: forward, delta, 3 dK/dV (one per rule), 2 dQ (cp has
    # none); dispatch (no gate: the default forward only): 2 head dims x 4 features x (forward, dK/dV, dQ) + 2 delta;
    # decode: the split-KV kernel of GQA 32/8, D = 128
    assert {s: rows[s][1] for s in ("spot", "timings", "profile", "memory", "dispatch", "decode")} == \
        {"spot": 7, "timings": 32, "profile": 5, "memory": 5, "dispatch": 26, "decode": 1}
    assert all(r[2] == 0 for s, r in rows.items() if s not in ("tests", "gate"))   # all compiled by the warm-up
    assert rows["tests"][1] == rows["tests"][2] == len(gpu_check.warm_items(_device_check())[1])
    assert rows["gate"][1] == rows["gate"][2] == sum(u.compiles() for u in gate.available_units(smoke=False))
    n_tests = int(proc.stdout.split(" GPU test cases")[0].split()[-1])
    assert n_tests >= 90 and "tests/test_attention_gpu.py" in proc.stdout
    assert f"within --limit-s {500 - 40} s" in proc.stdout


def test_warm_runs_have_the_specialisation_of_the_timed_runs():
    check = _device_check()
    items, warmed = gpu_check.warm_items(check)
    for step in gpu_check.WARMED_STEPS:              # every kernel a later step runs is compiled by the warm-up
        assert gpu_check.step_kernels(step, check) <= warmed, step
    timed = [s for step in ("spot", "timings", "dispatch", "memory", "sweep")
             for _, _, s in gpu_check.step_calls(step, check)]
    for shape in timed:
        small = warm_cache.warm_shape(shape, 512)
        assert small[3] <= 512 and small[3] % 16 == 0 and small[1:3] + small[4:] == shape[1:3] + shape[4:]
        assert warm_cache.int_classes(small) == warm_cache.int_classes(shape)
    assert warm_cache.int_classes((1, 16, 16, 500, 128, True)) != warm_cache.int_classes((1, 16, 16, 512, 128, True))
    assert items[0][2] == gpu_check.spot_shape(False) and items[-1][0] != "e2e"   # spot first, sweep last
    assert sum(name == "e2e" for name, _, _ in items) == 1


def test_shapes_are_the_issue_grid():
    shapes = gpu_check.sweep_shapes(smoke=False)
    mha = [s for s in shapes if s[1] == s[2]]
    assert {s[4] for s in mha} == {64, 128} and {s[5] for s in mha} == {True, False}
    assert sorted({s[3] for s in mha}) == [1024, 2048, 4096, 8192, 16384, 32768]
    assert all(s[0] == max(1, 16384 // s[3]) and s[1] * s[4] == 2048 for s in mha)   # B * N = 16k, at least B = 1
    assert sorted(s[3] for s in shapes if s[1] != s[2]) == [32768, 131072]
    assert all(s[1:3] == (32, 8) for s in shapes if s[1] != s[2])
    assert gpu_check.timing_shapes(False) == [(1, 16, 16, 16384, 128, True), (4, 16, 16, 4096, 128, True),
                                              (1, 16, 16, 16384, 128, False), (1, 32, 32, 16384, 64, True),
                                              (16, 16, 16, 1024, 128, True)]
    assert set(gpu_check.timing_shapes(False)) <= set(shapes)
    assert gpu_check.memory_shape(False) == (1, 32, 8, 131072, 128, True)
    rest = gpu_check.sweep_rest(False, set(gpu_check.timing_shapes(False)))
    assert len(rest) == len(shapes) - 5 and rest[-1][3] == 131072 and rest[0][4:] == (128, True)


# --- the LXT-style baseline ---------------------------------------------------------------------------------
def _tiny_llama():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, max_position_embeddings=128)
    return tf.LlamaForCausalLM(cfg).double().eval()


@pytest.mark.parametrize("checkpoint", [False, True])
def test_lxt_style_baseline_gives_af_explains_relevance(checkpoint):
    model = _tiny_llama()
    ids = torch.randint(0, 97, (2, 29), generator=torch.Generator().manual_seed(1))
    expected = af.explain(model, input_ids=ids, backend="torch").relevance
    baseline = e2e._shallow_patch_copy(model)
    assert all(a is b for a, b in zip(model.parameters(), baseline.parameters()))   # weights shared
    calls = []   # HF checkpoints a layer's forward (its own hooks stay outside): count a submodule's calls
    handle = baseline.model.layers[0].self_attn.register_forward_pre_hook(lambda *a: calls.append(1))
    got = lxt_style.explain(baseline, ids, checkpoint=checkpoint)
    handle.remove()
    assert len(calls) == (2 if checkpoint else 1)      # HF checkpointing recomputes the layer in the backward
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)   # both float32 from float64
    # the original model is untouched: its plain forward still uses SDPA
    assert model.config._attn_implementation == "sdpa" and baseline.config._attn_implementation == lxt_style.NAME


def test_lxt_style_refuses_a_model_without_llama_parts():
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="Llama-type models only"):
        lxt_style.patch(copy.deepcopy(model))


# --- plots and README tables --------------------------------------------------------------------------------
def test_report_writes_plots_and_tables_from_the_json(smoke_json, tmp_path):
    path = tmp_path / smoke_json.name          # plots go next to the JSON: keep the GPU run's folder as it was
    path.write_text(smoke_json.read_text())
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- table:attention -->\nold\n<!-- /table:attention -->\nmiddle\n"
                      "<!-- table:e2e -->\n<!-- /table:e2e -->\nend\n")
    written, tables = bench_report.render(path, readme)
    pngs = [Path(p) for p in written if p.endswith(".png")]
    assert len(pngs) == 2 and all(p.read_bytes()[:8] == PNG for p in pngs)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("end\n") and "old" not in text
    result = json.loads(path.read_text())
    summary = bench_report.attention_summary(result["timings"])
    assert len(summary) == len({gpu_check.shape_of(r) for r in result["timings"]})
    for s in summary:
        same = [r for r in result["timings"] if gpu_check.shape_of(r) == (s["B"], s["H"], s["Hkv"], s["N"], s["D"],
                                                                          s["causal"])]
        ours, portable = (next(r for r in same if r["method"] == m) for m in ("attnlrp_fast[grad]",
                                                                               "attnlrp_fast[grad,fwd=portable]"))
        best = max(r["fwd_tflops"] for r in same if r["method"].startswith("sdpa["))
        assert s["fwd_vs_sdpa"] == pytest.approx(ours["fwd_tflops"] / best)
        assert s["portable_fwd_tflops"] == portable["fwd_tflops"]
        assert f"{s['fwd_tflops']:.0f} | - | - | {portable['fwd_tflops']:.0f} | {best:.0f} | {s['fwd_vs_sdpa']:.2f}x" \
            in tables["attention"]                # no TMA or Hopper forward in fp32
    for row in result["memory"]["rows"]:                   # the memory step's table
        assert f"| {row['method']} | - | {row['seconds_one_run']:.2f} |" in tables["attention"]   # no peak on CPU
    for method, prof in result["profile"]["methods"].items():     # the profile step's table, largest first
        name, k = next(iter(prof["kernels"].items()))
        assert f"| {method} | `{name[:70]}` | {k['ms']:.3f} | {k['count']} |" in tables["attention"]
    assert "Steps (seconds / budget, Triton compiles): gate " in tables["attention"]
    assert "Correctness gate against float64 (7 units in parallel processes; cases: " in tables["attention"]
    for row in result["decode"]:                          # the decode table: one column per method
        assert f"| {row['method']} |" in tables["attention"].split("Decoding:")[1].split("\n")[2]
    rows = {(r["case"], r["path"]): r for r in result["dispatch_rows"]}     # the dispatch table's cases
    for case in {c for c, _ in rows}:
        sdpa, triton = rows[case, "sdpa"], rows[case, "triton"]
        assert f"| {case} | {sdpa['fwd_bwd_ms']:.3f} | {triton['fwd_bwd_ms']:.3f} ({triton['forward']}) |" \
            in tables["attention"]
    assert "attnlrp_fast" in tables["e2e"] and "lxt_style" in tables["e2e"] and "agree" in tables["e2e"]
    assert "| estimated GiB | measured / estimated |" in tables["e2e"]


def test_the_e2e_table_sets_the_measured_peak_against_the_estimate():
    e2e_result = {"shape": {**e2e.SHAPES["llama3-8b"], "name": "llama3-8b"}, "dtype": "bfloat16", "rows": [
        {"method": "forward", "tokens": 8192, "seconds": 0.5, "peak_mib": 100.0},
        {"method": "attnlrp_fast", "tokens": 8192, "seconds": 2.0, "peak_mib": 2662.4, "estimated_peak_mib": 2560.0,
         "explain_over_forward": 4.0},
        {"method": "lxt_style", "tokens": 8192, "error": "out of memory", "estimated_peak_mib": 4096.0}]}
    table = bench_report.e2e_table({"e2e": e2e_result, "device": "H200"})
    assert "| 8k | attnlrp_fast | 2.00 | 4.0x | 2.6 | 2.5 | 1.040 |" in table
    assert "| 8k | lxt_style | out of memory | - | - | 4.0 | - |" in table
    assert "| 8k | forward | 0.50 | - | 0.1 | - | - |" in table


def test_report_summary_prints_the_targets_and_writes_nothing(smoke_json, capsys):
    before = sorted(smoke_json.parent.iterdir())
    bench_report.main([str(smoke_json), "--summary"])
    out = capsys.readouterr().out
    skipped = json.loads(smoke_json.read_text())["gpu_tests"]["counts"]["SKIPPED"]
    assert out.startswith("Targets:\n- forward / best SDPA backend") and f"{skipped} skipped" in out
    assert sorted(smoke_json.parent.iterdir()) == before


def _row(method, N, D=128, causal=True, H=16, Hkv=16, **figures):
    return {"method": method, "B": 1, "H": H, "Hkv": Hkv, "N": N, "D": D, "causal": causal, **figures}


def test_report_targets_take_the_worst_shape_and_say_missed():
    timings = []
    for N, ours in ((4096, 420.0), (8192, 380.0)):
        timings += [_row("attnlrp_fast[grad]", N, fwd_tflops=ours, bwd_tflops=300.0),
                    _row("attnlrp_fast[attnlrp]", N, fwd_tflops=ours, bwd_tflops=310.0, peak_mib=100.0),
                    _row("attnlrp_fast[attnlrp,dq=atomic]", N, fwd_tflops=ours, bwd_tflops=N / 40, peak_mib=110.0),
                    _row("sdpa[flash_attention]", N, fwd_tflops=350.0, bwd_tflops=280.0, peak_mib=90.0),
                    _row("sdpa[cudnn_attention]", N, fwd_tflops=400.0, bwd_tflops=290.0, peak_mib=95.0),
                    _row("lxt_style[sdpa]", N, fwd_tflops=350.0, bwd_tflops=200.0)]
    timings += [_row("attnlrp_fast[attnlrp]", 131072, H=32, Hkv=8, peak_mib=1050.0),
                _row("sdpa[default]", 131072, H=32, Hkv=8, peak_mib=1000.0),
                _row("sdpa[cudnn_attention]", 131072, H=32, Hkv=8, error="out of memory")]
    lines = bench_report.targets_lines({"timings": timings})
    assert lines[0].endswith(f"{380 / 400:.2f}x (MISSED; target >= 1.0x)")      # 8k is the worst shape
    assert lines[1].endswith(f"{310 / 200:.2f}x (met; target >= 1.0x)")
    assert lines[2].endswith(f"{4096 / 40 / 200:.2f}x (MISSED; target >= 1.0x)")  # atomic dQ, worst at 4k
    assert lines[3].endswith("1.05x (met; target <= 1.1x)")                       # the failed baseline is skipped
    assert lines[4].endswith("not measured")
    assert all(line.endswith("not measured") for line in bench_report.targets_lines({"timings": []}))
    # the memory step's rows come before the sweep's; the e2e target takes the worst size from 32k up
    memory_step = {"shape": {"B": 1, "H": 32, "Hkv": 8, "N": 131072, "D": 128, "causal": True}, "rows": [
        {"method": "attnlrp_fast[attnlrp]", "peak_mib": 1200.0}, {"method": "sdpa[flash_attention]", "peak_mib": 1000.0},
        {"method": "sdpa[cudnn_attention]", "error": "No available kernel"}]}
    e2e_rows = [{"method": m, "tokens": n, "seconds": sec} for m, n, sec in (
        ("attnlrp_fast", 8192, 9.0), ("lxt_style", 8192, 3.0),                  # below 32k: not the target
        ("attnlrp_fast", 32768, 10.0), ("lxt_style", 32768, 12.0),
        ("attnlrp_fast", 65536, 30.0), ("lxt_style", 65536, 33.0))]
    lines = bench_report.targets_lines({"timings": timings, "memory": memory_step, "e2e": {"rows": e2e_rows}})
    assert lines[3].endswith("1.20x (MISSED; target <= 1.1x)")
    assert lines[4].endswith(f"{33 / 30:.2f}x (met; target >= 1.0x)")


def test_report_without_markers_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no <!-- table:e2e -->"):
        bench_report.replace_between("no markers here", "e2e", "x")


def test_cpu_memory_table_and_plot(tmp_path):
    rows = [{"mode": "low_memory", "tokens": n, "peak_extra_mb": 100 + n / 1000, "seconds": 1.0} for n in (2048, 4096)]
    rows += [{"mode": "eager", "tokens": 2048, "peak_extra_mb": 400.0, "seconds": 1.0},
             {"mode": "eager", "tokens": 4096, "error": "took longer than 60 s"}]
    fits = {"low_memory": dict(zip(("mb_at_zero", "kb_per_token", "worst_deviation_from_line"),
                                   (lambda a, b, w: (a, b * 1024, w))(*memory.linear_fit(rows[:2]))))}
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"device": "cpu", "rows": rows, "linear_fits": fits}))
    written, tables = bench_report.render(path)
    assert Path(written[0]).read_bytes()[:8] == PNG
    table = tables["cpu-memory"]
    assert "| low_memory | 102 MB | 104 MB | 100 + 1.0 | 0.0% |" in table
    assert "| eager | 400 MB | took longer than 60 s | - | - |" in table


def test_cpu_memory_table_calls_quadratic_growth_not_linear():
    rows = [{"mode": "eager", "tokens": n, "peak_extra_mb": (n / 1024) ** 2, "seconds": 1.0} for n in (1024, 2048, 8192)]
    a, b, worst = memory.linear_fit(rows)
    assert worst > 0.1
    table = bench_report.cpu_memory_table({"rows": rows, "linear_fits": {"eager": {
        "mb_at_zero": a, "kb_per_token": b * 1024, "worst_deviation_from_line": worst}}})
    assert f"| eager | 1 MB | 4 MB | 64 MB | not linear | {worst:.1%} |" in table


def test_memory_linear_fit_is_exact_on_a_line():
    a, b, worst = memory.linear_fit([{"tokens": n, "peak_extra_mb": 50 + 0.25 * n} for n in (1, 2, 8)])
    assert (a, b, worst) == pytest.approx((50, 0.25, 0), abs=1e-9)


# --- the pytest-benchmark suite -----------------------------------------------------------------------------
def test_pytest_benchmark_suite_runs_once_per_benchmark():
    pytest.importorskip("pytest_benchmark")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                           str(ROOT / "bench" / "test_bench_attention.py"),
                           str(ROOT / "bench" / "test_bench_cpu_explain.py")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1", "CPU_EXPLAIN_N": "128"}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


# --- the CPU explanation benchmark --------------------------------------------------------------------------
def test_cpu_explain_runs_each_method_and_they_agree(tmp_path):
    """bench/cpu_explain.py end to end at N = 64: every method measured in its own process, the same relevance (the
    LXT-style baselines compute AttnLRP too), and the README table with its target lines from the JSON."""
    out = tmp_path / "cpu.json"
    assert cpu_explain.main(["--sizes", "64", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["method"] for r in result["rows"]] == list(cpu_explain.METHODS)
    assert all("error" not in r and r["seconds"] > 0 and r["peak_extra_mb"] >= 0 for r in result["rows"])
    assert set(result["agreement"]) == {"lxt_style@64", "lxt_style_eager@64"}
    assert all(v < 1e-5 for v in result["agreement"].values())
    _, tables = bench_report.render(out)
    table = tables["cpu-explain"]
    ours = result["rows"][0]
    assert f"| 64 | attnlrp_fast | {ours['seconds']:.2f} | 1.00x |" in table
    assert "- 4k: not measured" in table and "- 16k: not measured" in table


def test_cpu_explain_targets_say_met_or_missed():
    def row(method, n, s, mb):
        return {"method": method, "tokens": n, "seconds": s, "peak_extra_mb": mb}
    rows = [row("attnlrp_fast", 4096, 1.0, 90.0), row("lxt_style", 4096, 1.25, 100.0),
            row("attnlrp_fast", 16384, 11.0, 90.0), row("lxt_style", 16384, 10.0, 100.0)]
    lines = bench_report.cpu_explain_targets({"rows": rows})
    assert lines == ["- 4k: time 0.80x, memory 0.90x the LXT-style approach (met; target <= 1.0x)",
                     "- 16k: time 1.10x, memory 0.90x the LXT-style approach (MISSED; target <= 1.0x)"]
