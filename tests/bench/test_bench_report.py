"""bench/report.py on recorded JSON: the e2e table against the estimate, the targets (worst shape, "MISSED"), markers
required, the CPU memory table and plot, every committed result rendering in binary units."""

import json
import re
from pathlib import Path

import pytest

from bench import e2e, memory
from bench import report as bench_report
from device_run_helpers import PNG

ROOT = Path(__file__).resolve().parents[2]


def _row(method, N, D=128, causal=True, H=16, Hkv=16, **figures):
    return {"method": method, "B": 1, "H": H, "Hkv": Hkv, "N": N, "D": D, "causal": causal, **figures}


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
    assert "MiB (MiB = 2^20 bytes, KiB = 2^10 bytes)" in table and "| fit: MiB + KiB/token |" in table
    assert "| low_memory | 102 | 104 | 100 + 1.0 | 0.0% |" in table
    assert "| eager | 400 | took longer than 60 s | - | - |" in table


def test_cpu_memory_table_calls_quadratic_growth_not_linear():
    rows = [{"mode": "eager", "tokens": n, "peak_extra_mb": (n / 1024) ** 2, "seconds": 1.0} for n in (1024, 2048, 8192)]
    a, b, worst = memory.linear_fit(rows)
    assert worst > 0.1
    table = bench_report.cpu_memory_table({"rows": rows, "linear_fits": {"eager": {
        "mb_at_zero": a, "kb_per_token": b * 1024, "worst_deviation_from_line": worst}}})
    assert f"| eager | 1 | 4 | 64 | not linear | {worst:.1%} |" in table


def test_committed_results_render_in_binary_units(tmp_path):
    """Every results JSON in bench/results renders; those written before 2026-12-02 name their MiB figures "_mb"
    ("peak_extra_mb", "mb_at_zero", "kb_per_token") and render as the same file under the new names does; no table
    speaks of decimal KB, MB or GB."""
    renamed = {'"peak_extra_mb"': '"peak_extra_mib"', '"mb_at_zero"': '"mib_at_zero"', '"kb_per_token"': '"kib_per_token"'}
    kinds = set()
    for src in sorted((ROOT / "bench" / "results").glob("*.json")):
        text = src.read_text()
        (tmp_path / "old").mkdir(exist_ok=True)
        (tmp_path / "new").mkdir(exist_ok=True)
        (tmp_path / "old" / src.name).write_text(text)
        for old, new in renamed.items():
            text = text.replace(old, new)
        (tmp_path / "new" / src.name).write_text(text)
        _, tables = bench_report.render(tmp_path / "old" / src.name)
        assert tables and tables == bench_report.render(tmp_path / "new" / src.name)[1], src.name
        for body in tables.values():
            assert not re.search(r"\b[KMG]B\b", body), (src.name, re.search(r".*\b[KMG]B\b.*", body)[0])
        for note in json.loads(text).get("notes") or []:             # a file merged from runs says how
            assert f"Note: {note}" in "\n".join(tables.values()), (src.name, note)
        kinds |= set(tables)
    assert {"cpu-memory", "cpu-explain", "estimates"} <= kinds


def test_the_needle_table_says_what_ran_and_whether_pointing_met_its_target(tmp_path):
    def method(pointing, rank, share, seconds, abpc=None):
        r = {"pointing_accuracy": pointing, "evidence_rank": rank, "evidence_share": share, "seconds": seconds}
        return r if abpc is None else {**r, "abpc": abpc, "abpc_per_row": [abpc, abpc], "morf": [1, 0],
                                       "lerf": [1, 1], "fractions": [0, 1], "rise": 0.2, "mas": 0.3, "rise_ap": 0.3}
    task = dict(model="smollm2", target="sum of the answer tokens' logits", sampled=2, wrong=[])
    result = {"date": "2026-12-02", "device": "cpu", "versions": {"torch": "2.13.0+cpu"},
              "settings": {"steps": 5, "seed": 0, "perturb": "zero", "ig_steps": 8, "methods": ["attnlrp", "random"]},
              "tasks": {
                  "needle-1k": {**task, "task": "needle-1k", "curves": True, "samples": 2, "document_tokens_mean": 880,
                                "methods": {"attnlrp": method(1.0, 1.0, 0.42, 4.1, abpc=20.0),
                                            "random": method(0.0, 300.0, 0.02, 0.0, abpc=0.5)}},
                  "needle-8k": {**task, "task": "needle-8k", "curves": False, "samples": 1, "document_tokens_mean": 8010,
                                "wrong": [{"kind": "code", "fact": "x", "answer": "y"}],
                                "methods": {"attnlrp": method(0.5, 2.0, 0.3, 90.0),
                                            "random": method(0.0, 4000.0, 0.0, 0.0)}}}}
    path = tmp_path / "needle.json"
    path.write_text(json.dumps(result))
    _, tables = bench_report.render(path)
    assert set(tables) == {"needle"}
    body = tables["needle"]
    assert "5 perturbation steps (removed tokens' embeddings zeroed) at needle-1k" in body
    assert "integrated gradients with 8 path points" in body
    assert "- needle-8k: smollm2, documents of 8010 tokens on average; the model answers 1 of 2 samples right" in body
    assert "| needle-1k | attnlrp | 20.000 | - | 0.200 | 0.300 | 0.300 | 100.0% | 1.00 | 42.0% | 4.10 |" in body
    assert "| needle-8k | attnlrp | - | - | - | - | - | 50.0% | 2.00 | 30.0% | 90.00 |" in body
    assert "- needle-1k: AttnLRP points at the needle in 100% of 2 samples (met; target >= 90 %)" in body
    assert "- needle-8k: AttnLRP points at the needle in 50% of 1 samples (MISSED; target >= 90 %)" in body
    assert (tmp_path / "needle.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "not run here" not in body
    long = result["tasks"]["needle-8k"]
    long["methods_run"] = ["attnlrp"]
    del long["methods"]["random"]
    assert "samples right (those are explained); not run here: random" in bench_report.needle_table(result)
    result["notes"] = ["random from a second run", "one more"]      # a file merged from two runs says so
    body = bench_report.needle_table(result)
    assert "\nNote: random from a second run\nNote: one more\n" in body and body.count("Note:") == 2


def test_the_neuron_check_renders_from_its_json(tmp_path):
    drop = {"attnlrp": {"1": 0.5, "5": 2.0, "10": 3.0, "50": 4.0}, "random": {"1": 0.0, "5": 2.5, "10": 0.1, "50": 0.2}}
    result = {"device": "cpu", "neurons": {"neurons-needle-1k": {"task": "neurons-needle-1k", "prompts": 3,
                                                                 "sampled": 3, "drop": drop}}}
    path = tmp_path / "neurons-needle.json"
    path.write_text(json.dumps(result))
    _, tables = bench_report.render(path)
    assert set(tables) == {"neurons-needle"}
    assert "| neurons-needle-1k | 3 | attnlrp | **0.5** | 2 | **3** | **4** |" in tables["neurons-needle"]
    assert "| neurons-needle-1k | 3 | random | 0 | **2.5** | 0.1 | 0.2 |" in tables["neurons-needle"]
    result["neurons"]["neurons-recall"] = {**result["neurons"].pop("neurons-needle-1k"), "task": "neurons-recall"}
    path.write_text(json.dumps(result))
    assert set(bench_report.render(path)[1]) == {"neurons"}


def test_the_smollm2_cpu_table_sets_each_peak_against_the_estimate():
    def row(method, n, s, mib, est=None):
        return {"method": method, "tokens": n, "seconds": s, "peak_extra_mib": mib,
                **({} if est is None else {"estimated_peak_mib": est})}
    result = {"kind": "cpu-explain", "device": "cpu (x86_64)", "threads": 2, "versions": {"torch": "2.13.0+cpu"},
              "model": "SmolLM2-135M-Instruct", "repeats": 1,
              "rows": [row("attnlrp_fast", 8192, 90.0, 1000.0, 950.0), row("lxt_style", 8192, 120.0, 1250.0, 1400.0),
                       row("lxt_style_eager", 8192, 0, 0) | {"error": "not run past 1024 tokens (N x N attention)"}]}
    assert bench_report.cpu_explain_kind(result) == "cpu-explain-smollm2"
    table = bench_report.cpu_explain_table(result)
    assert "SmolLM2-135M-Instruct (real weights, 30 layers)" in table and "one run after a warm-up" in table
    assert "| 8k | attnlrp_fast | 90.00 | 1.00x | 1000 | 1.00x | 950 (-5%) |" in table
    assert "| 8k | lxt_style | 120.00 | 1.33x | 1250 | 1.25x | 1400 (+12%) |" in table
    assert "- 8k: time 0.75x, memory 0.80x the LXT-style approach (met; target <= 1.0x)" in table
