"""bench/device_run.sh, the whole GPU check, run end to end on CPU in smoke mode (Triton's interpreter, tiny sizes:
the pre-flight record, the correctness gate, the tests step, the warm-up, spot check, timings, decode, dispatch
table, profile, memory, end to end, sweep) and the report of its JSON; gpu_check's steps: merged into one file, time
caps and partial results, rows that raise, the plan, the warm-up's specialisation, the shapes."""

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import e2e, gate, gpu_check, runner, table, warm_cache
from bench import report as bench_report
from device_run_helpers import (DEVICE_RUN, OUT_FILES, PNG, device_check, fake_measure, jsonl, preflight_record,
                                script_env, smoke_check)


@pytest.fixture(scope="module")
def device_smoke(tmp_path_factory):
    """`SMOKE=1 bash bench/device_run.sh`, no argument: the whole check, as a GPU machine runs it."""
    out = tmp_path_factory.mktemp("out")
    t = time.monotonic()
    proc = subprocess.run(["bash", DEVICE_RUN], capture_output=True, text=True, timeout=400,
                          env=script_env(SMOKE="1", OUT=str(out)))
    return out, proc, time.monotonic() - t


@pytest.fixture(scope="module")
def smoke_json(device_smoke):
    out, proc, _ = device_smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = out.glob("*-smoke.json")
    return path


# --- the whole check, end to end ----------------------------------------------------------------------------
@pytest.mark.slow
def test_device_script_runs_every_step_and_returns_its_files(device_smoke, smoke_json):
    out, proc, seconds = device_smoke
    files = sorted(p.name for p in out.iterdir())
    assert all((out / f).is_file() for f in files) and len(files) == OUT_FILES <= 8       # what comes back
    assert set(files) == {smoke_json.name, smoke_json.stem + ".jsonl", "env.txt", "run.log", "pytest-gpu.log",
                          "warm.log", "dispatch.json"}
    env_txt = (out / "env.txt").read_text()
    assert "torch" in env_txt and "install: skipped" in env_txt and "[sweep] done" in (out / "run.log").read_text()
    record = preflight_record(out / "env.txt")
    assert record["install"] == "skipped" and record["versions"]["executable"] == sys.executable
    result = json.loads(smoke_json.read_text())
    assert result["preflight"]["forward_variants"] == record["forward_variants"]
    assert "unfinished" not in result and set(result["dates"]) == set(gpu_check.STEPS)
    assert [r["status"] for r in result["steps"].values()] == ["done"] * len(gpu_check.STEPS)
    assert sum(r["seconds"] for r in result["steps"].values()) < result["limit_s"] < 500
    events = jsonl(out / (smoke_json.stem + ".jsonl"))
    for step in gpu_check.STEPS:                     # each step's start and end, in order, as JSON lines
        assert [e["event"] for e in events if e["step"] == step and e["event"] in ("start", "end")] == ["start", "end"]
    logged = [e for e in events if e["event"] == "row" and e["step"] in ("timings", "sweep")]
    assert [e["method"] for e in logged] == [r["method"] for r in result["timings"]]
    assert "Targets:" in proc.stdout and "Steps (seconds / budget" in proc.stdout
    assert "Correctness gate against float64" in proc.stdout
    print(f"device_run.sh smoke: {seconds:.0f} s")


@pytest.mark.slow
def test_smoke_gate_checks_every_variant_and_logs_each_case(smoke_json):
    result = json.loads(smoke_json.read_text())
    units = gate.available_units(smoke=True)
    verdicts = result["gate"]["verdicts"]
    assert set(verdicts) == {u.variant for u in units} >= {"hopper", "tma", "portable", "dq=separate", "dq=atomic",
                                                            "sdpa"}
    assert all(v["status"] == "pass" for v in verdicts.values()), verdicts
    cases = [e for e in jsonl(smoke_json.with_suffix(".jsonl")) if e["event"] == "case"]
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


@pytest.mark.slow
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
    items, _ = gpu_check.warm_items(smoke_check(verdicts=result["gate"]["verdicts"]))
    warm = result["warm"]
    assert warm["returncode"] == 0 and warm["planned"] == warm["warmed"] == len(items) and warm["errors"] == []
    assert result["plan"]["timings"]["compiled_here"] == 0 and result["plan"]["tests"]["kernels"] > 0


@pytest.mark.slow
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
    # after every size's other rows, at its own length (--offload-tokens 96 in the smoke run, 128k on a GPU): a
    # forward, the plain explanation and the offloaded one beside it: the same relevance, host memory estimated
    assert [r["method"] for r in e["rows"]][-4:] == [e2e.HOPS, "forward", "attnlrp_fast", e2e.OFFLOAD]
    offloaded, plain = e["rows"][-1], e["rows"][-2]
    assert offloaded["tokens"] == plain["tokens"] == 96 and offloaded["estimated_host_mib"] > 0
    assert offloaded["explain_over_forward"] > 0 and plain["explain_over_forward"] > 0
    assert e["offload_agreement"]["tokens"] == offloaded["tokens"] and e["offload_agreement"]["rel_err"] < 1e-6
    # beside each explanation, the meta estimate of the same config, length, dtype and mode (the GPU's peak is its
    # measurement; on CPU there is none)
    for r in e["rows"]:
        assert (r["estimated_peak_mib"] > 0 and "layer" in r["estimated_where"]) if r["method"] != "forward" \
            else "estimated_peak_mib" not in r


# --- steps, budgets, partial results ------------------------------------------------------------------------
@pytest.mark.slow
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


def test_a_step_stops_at_its_budget_and_keeps_its_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "measure", fake_measure(0.4))
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
        return fake_measure(0)(*args)
    monkeypatch.setattr(gpu_check, "measure", measure_then_stop)
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["--smoke", "--steps", "spot,timings", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("*-smoke.json")
    result = json.loads(path.read_text())
    assert result["unfinished"] == ["timings"] and set(result["dates"]) == {"spot"}
    assert result["steps"]["timings"]["status"] == "interrupted" and len(result["timings"]) == 3
    monkeypatch.setattr(gpu_check, "measure", fake_measure(0, fwd_ms=2.0))
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


# --- the plan and the warm-up -------------------------------------------------------------------------------
def _plan_rows(text):
    """{step: (budget, kernels, compiled here)} from the plan's table."""
    rows = {}
    for line in text.splitlines():
        t = line.split()
        if t and t[0] in gpu_check.STEPS:
            rows[t[0]] = ("rest", int(t[2]), int(t[3])) if t[1] == "rest" else (float(t[1]), int(t[3]), int(t[4]))
    return rows


@pytest.mark.slow
def test_plan_prints_each_steps_compiles_and_budget_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", DEVICE_RUN, "--plan"], capture_output=True, text=True, timeout=300,
                          env=script_env(OUT=str(out), LIMIT_S="500"))
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
    assert rows["tests"][1] == rows["tests"][2] == len(gpu_check.warm_items(device_check())[1])
    assert rows["gate"][1] == rows["gate"][2] == sum(u.compiles() for u in gate.available_units(smoke=False))
    n_tests = int(proc.stdout.split(" GPU test cases")[0].split()[-1])
    assert n_tests >= 90 and "tests/kernels/test_attention_gpu.py" in proc.stdout
    assert f"within --limit-s {500 - 40} s" in proc.stdout


def test_warm_runs_have_the_specialisation_of_the_timed_runs():
    check = device_check()
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


# --- plots and README tables --------------------------------------------------------------------------------
@pytest.mark.slow
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


@pytest.mark.slow
def test_report_summary_prints_the_targets_and_writes_nothing(smoke_json, capsys):
    before = sorted(smoke_json.parent.iterdir())
    bench_report.main([str(smoke_json), "--summary"])
    out = capsys.readouterr().out
    skipped = json.loads(smoke_json.read_text())["gpu_tests"]["counts"]["SKIPPED"]
    assert out.startswith("Targets:\n- forward / best SDPA backend") and f"{skipped} skipped" in out
    assert sorted(smoke_json.parent.iterdir()) == before


