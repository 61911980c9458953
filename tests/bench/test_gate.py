"""The correctness gate (bench/gate.py) and the dispatch table it feeds (bench/table.py): verdicts decide what the
later steps run, no valid table without a passing forward, a hanging unit killed, a crashed or wrong one failed."""

import json
import os
import time

import pytest

from bench import gate, gpu_check, table
from bench import report as bench_report
from device_run_helpers import fake_measure, jsonl, smoke_check


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
    monkeypatch.setattr(gpu_check, "measure", fake_measure(0))
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
    check = smoke_check(verdicts=table.verdicts_of(dispatch)[0], forward=dispatch["forward"])   # as warm_cache.py
    assert check.order == ("tma", "portable") and not any("atomic" in n for n, _, _ in gpu_check.warm_items(check)[0])
    summary = "\n".join(bench_report.summary_lines(result))
    assert "Gated out (no later step ran them; the dispatch table names them): " in summary
    assert f"hopper: {verdicts['hopper']['why']}" in summary and "dq=atomic: " in summary


def test_no_valid_table_without_a_passing_forward_and_a_failed_gate_trusts_nothing(tmp_path, monkeypatch):
    def run_gate(units, smoke, log, seconds, **kw):
        return {u.name: _unit_result(u, "fail" if u.kind == "forward" else "pass") for u in units}
    monkeypatch.setattr(gate, "run_gate", run_gate)
    monkeypatch.setattr(gpu_check, "measure", fake_measure(0))
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


@pytest.mark.slow
def test_the_gate_kills_a_hanging_unit_and_fails_a_crashed_or_wrong_one(tmp_path, monkeypatch):
    """Real unit processes (smoke sizes): one hangs (killed at its time limit), one crashes, one fails a case; each
    verdict says so and the case lines of the others are in the log."""
    monkeypatch.setenv(gate.FORCE_ENV, "tma:hang,sdpa:crash,portable:fail")
    units = [u for u in gate.available_units(smoke=True) if u.variant in ("tma", "sdpa", "portable", "hopper")]
    log = tmp_path / "gate.jsonl"
    t = time.monotonic()
    # 20 s per unit: the passing one must finish on a loaded machine (the suite runs on both cores); the hanging one
    # is killed then, long before the step's 90 s
    results = gate.run_gate(units, True, log, seconds=90, jobs=4, unit_timeout=20)
    assert time.monotonic() - t < 60
    verdicts = gate.verdicts(results)
    assert verdicts["tma"]["status"] == "fail" and "timed out after" in verdicts["tma"]["why"]
    assert verdicts["sdpa"]["status"] == "fail" and "exited with status -11 after 0 of" in verdicts["sdpa"]["why"]
    assert verdicts["portable"]["status"] == "fail" and f"forced by {gate.FORCE_ENV}" in verdicts["portable"]["why"]
    assert verdicts["hopper"]["status"] == "pass" and verdicts["hopper"]["cases"] == {"pass": 4, "unsupported": 4}
    lines = jsonl(log)
    assert {ln["variant"] for ln in lines} == {"hopper", "portable"}      # the hung and crashed units wrote none
    hopper = next(u for u in units if u.variant == "hopper")
    assert [ln["case"] for ln in lines if ln["variant"] == "hopper"] == [c.name for c in hopper.cases()]
    # a unit that only got what was left of the gate's time is not called hung; one never started is not run
    cut = gate.unit_verdict(hopper, [], {"returncode": None, "timed_out": True, "seconds": 3.0, "cut_by_gate": True})
    assert cut == {"status": "fail", "why": f"{hopper.name}: not finished when the gate's time ran out after 3 s "
                                            f"(0 of {len(hopper.cases())} cases done)"}
    assert gate.unit_verdict(hopper, [], None)["why"].endswith("not run (the gate's time ran out)")
