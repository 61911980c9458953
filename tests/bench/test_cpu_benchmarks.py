"""The CPU benchmarks: bench/memory.py's linear fit, bench/cpu_explain.py (each method runs and they agree; the targets
say met or missed) and the pytest-benchmark suites running once per benchmark."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import cpu_explain, memory
from bench import report as bench_report

ROOT = Path(__file__).resolve().parents[2]


def test_memory_linear_fit_is_exact_on_a_line():
    a, b, worst = memory.linear_fit([{"tokens": n, "peak_extra_mb": 50 + 0.25 * n} for n in (1, 2, 8)])
    assert (a, b, worst) == pytest.approx((50, 0.25, 0), abs=1e-9)


# --- the pytest-benchmark suite -----------------------------------------------------------------------------
@pytest.mark.slow
def test_pytest_benchmark_suite_runs_once_per_benchmark():
    pytest.importorskip("pytest_benchmark")
    # each as its docstring runs it: the attention suite on the Triton kernels (the interpreter here), the CPU
    # explanation suite on the CPU path (TRITON_INTERPRET=0)
    for suite, interpret in (("test_bench_attention.py", "1"), ("test_bench_cpu_explain.py", "0")):
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                               str(ROOT / "bench" / suite)], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "TRITON_INTERPRET": interpret, "CPU_EXPLAIN_N": "128"}, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert " passed" in proc.stdout and "failed" not in proc.stdout, proc.stdout[-2000:]


# --- the CPU explanation benchmark --------------------------------------------------------------------------
@pytest.mark.slow
def test_cpu_explain_runs_each_method_and_they_agree(tmp_path):
    """bench/cpu_explain.py end to end at N = 64: every method measured in its own process, the same relevance (the
    LXT-style baselines compute AttnLRP too), and the README table with its target lines from the JSON."""
    out = tmp_path / "cpu.json"
    assert cpu_explain.main(["--sizes", "64", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["method"] for r in result["rows"]] == list(cpu_explain.METHODS)
    assert all("error" not in r and r["seconds"] > 0 and r["peak_extra_mib"] >= 0 for r in result["rows"])
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


def test_cpu_explain_on_smollm2_reads_the_report_and_stays_in_its_context(capsys):
    ids = cpu_explain._inputs(6000, "smollm2")            # longer than the report: it repeats
    assert ids.shape == (1, 6000) and ids.dtype == torch.long
    assert torch.equal(ids[0, :100], cpu_explain._inputs(100, "smollm2")[0])
    with pytest.raises(SystemExit):
        cpu_explain.main(["--model", "smollm2", "--sizes", "16384"])
    assert "its context is 8192 tokens" in capsys.readouterr().err
    est = cpu_explain._estimate("attnlrp_fast", 1024, "smollm2")
    assert est["estimated_mode"] == "low_memory" and est["estimated_peak_mib"] > 0
    assert cpu_explain._estimate("lxt_style_eager", 1024, "smollm2") == {}
