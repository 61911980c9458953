"""bench/merge_results.py: rows of slow methods from a second `evaluate` run of the same samples, added to a results
JSON with a note; runs of other samples are refused, with one line."""

import json
import random

import pytest

from bench import merge_results
from bench import report as bench_report


def _row(rng, n, abpc=None):
    rows = [rng.uniform(-1, 5) for _ in range(n)] if abpc is None else list(abpc)
    return {"abpc": sum(rows) / n, "abpc_per_row": rows, "morf": [1.0, 0.0], "lerf": [1.0, 1.0],
            "fractions": [0.0, 1.0], "seconds": rng.uniform(0.1, 2), "pointing_accuracy": 1.0, "evidence_rank": 1.0,
            "ranks": [1] * n, "rise": 0.1, "mas": 0.2, "rise_ap": 0.2}


def _run(rng, methods, n=5, lrp=None):
    rows = {m: _row(rng, n) for m in methods}
    if lrp is not None:
        rows["attnlrp[torch]"] = json.loads(json.dumps(lrp))
    return {"date": "2026-12-03", "device": "cpu", "versions": {"torch": "2.13.0+cpu"},
            "settings": {"steps": 10, "seed": 0, "perturb": "zero", "ig_steps": 32, "methods": list(rows)},
            "tasks": {"recall": {"task": "recall", "model": "tiny", "samples": n, "target": "logit",
                                 "model_accuracy": 1.0, "methods": rows}}}


@pytest.fixture
def runs():
    rng = random.Random()
    base = _run(rng, ["attnlrp[torch]", "cp", "random"])
    lrp = base["tasks"]["recall"]["methods"]["attnlrp[torch]"]
    other = _run(rng, ["atman", "smoothgrad"], lrp=lrp)
    other["settings"]["method_options"] = {"atman_group": 1, "atman_factor": 0.9, "atman_kappa": 0.7,
                                           "smoothgrad_samples": 16, "smoothgrad_noise": 0.1}
    return base, other


def test_the_rows_and_a_note_are_added_and_the_table_shows_both(runs, tmp_path):
    base, other = runs
    merged = merge_results.merge(base, other, ["atman"], "atman from a second run")
    methods = merged["tasks"]["recall"]["methods"]
    assert set(methods) == {"attnlrp[torch]", "cp", "random", "atman"}
    assert methods["atman"] == other["tasks"]["recall"]["methods"]["atman"]
    assert methods["cp"] == base["tasks"]["recall"]["methods"]["cp"]                    # the base's own untouched
    assert merged["settings"]["methods"] == ["attnlrp[torch]", "cp", "random", "atman"]
    assert merged["notes"] == ["atman from a second run"] and "notes" not in base      # base itself unchanged
    path = tmp_path / "faithfulness.json"
    path.write_text(json.dumps(merged))
    body = bench_report.render(path)[1]["faithfulness"]
    assert "Note: atman from a second run" in body and "| recall | atman |" in body
    assert "AtMan suppresses one token at a time" in body                             # its settings came along


def test_runs_of_other_samples_are_refused(runs):
    base, other = runs
    lrp = other["tasks"]["recall"]["methods"]["attnlrp[torch]"]
    lrp["abpc_per_row"][3] += 0.01
    with pytest.raises(merge_results.Mismatch, match="ABPC differs by 0.01"):
        merge_results.merge(base, other, ["atman"], "x")
    lrp["abpc_per_row"][3] -= 0.01
    other["settings"]["seed"] = 1
    with pytest.raises(merge_results.Mismatch, match="seed"):
        merge_results.merge(base, other, ["atman"], "x")
    other["settings"]["seed"] = 0
    other["tasks"]["recall"]["samples"] = 4
    with pytest.raises(merge_results.Mismatch, match="5 samples here, 4 in the other run"):
        merge_results.merge(base, other, ["atman"], "x")
    other["tasks"]["recall"]["samples"] = 5
    with pytest.raises(merge_results.Mismatch, match="no rows of integrated_gradients"):
        merge_results.merge(base, other, ["integrated_gradients"], "x")


def test_the_command_writes_in_place_or_says_what_is_wrong_in_one_line(runs, tmp_path, capsys):
    base, other = runs
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(base))
    b.write_text(json.dumps(other))
    assert merge_results.main([str(a), str(b), "--methods", "atman,smoothgrad", "--note", "both"]) == 0
    assert set(json.loads(a.read_text())["tasks"]["recall"]["methods"]) >= {"atman", "smoothgrad"}
    assert merge_results.main([str(a), str(tmp_path / "missing.json"), "--methods", "atman", "--note", "x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("merge_results: ") and "missing.json" in err[0]
