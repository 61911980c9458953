"""The benchmark harness on CPU: gpu_check.py's smoke mode (spot check, attention sweep, end to end), the
LXT-style baseline computing the same relevance as af.explain, plots and README tables from the JSON, the
CPU memory benchmark, and the pytest-benchmark suite running once per benchmark."""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

import attnlrp_fast as af

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import e2e  # noqa: E402
import gpu_check  # noqa: E402
import lxt_style  # noqa: E402
import memory  # noqa: E402
import report as bench_report  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert gpu_check.main(["--smoke", "--out", str(out)]) == 0
    (path,) = out.glob("*-smoke.json")
    return path


def test_harness_smoke_records_every_part(smoke_json):
    result = json.loads(smoke_json.read_text())
    assert result["device"] and result["versions"]["torch"] == torch.__version__
    assert set(result["dates"]) == {"spot", "kernels", "e2e"}          # "tests" needs CUDA
    assert all(e is None or e < 1e-4 for errs in result["spot_check_rel_err"].values() for e in errs.values())
    methods = {row["method"] for row in result["timings"]}
    assert {"attnlrp_fast[attnlrp]", "attnlrp_fast[grad]", "attnlrp_fast[attnlrp,dq=atomic]",
            "attnlrp_fast[grad,dq=atomic]", "lxt_style[sdpa]", "sdpa[default]", "eager", "lxt_style[eager]"} <= methods
    for row in result["timings"]:
        assert "error" not in row and math.isfinite(row["fwd_ms"]) and row["fwd_ms"] > 0
        assert row["fwd_tflops"] == pytest.approx(gpu_check.flops_fwd(row["B"], row["H"], row["N"], row["N"], row["D"],
                                                                       row["causal"]) / row["fwd_ms"] / 1e9)
    e = result["e2e"]
    assert e["agreement"]["rel_err"] < 1e-5 and e["agreement"]["cosine"] > 0.99999
    assert {r["method"] for r in e["rows"]} == {"forward", "attnlrp_fast", "lxt_style"}
    assert all(r["explain_over_forward"] > 0 for r in e["rows"] if r["method"] != "forward" and not r.get("search"))
    assert set(e["longest"]) == {"attnlrp_fast", "lxt_style"} and all(n == 256 for n in e["longest"].values())


def test_parts_merge_into_one_file(tmp_path):
    assert gpu_check.main(["--smoke", "--parts", "spot", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*-smoke.json")
    first = json.loads(path.read_text())
    assert "timings" not in first and "spot_check_rel_err" in first
    assert gpu_check.main(["--smoke", "--parts", "kernels", "--out", str(tmp_path)]) == 0
    both = json.loads(path.read_text())
    assert both["spot_check_rel_err"] == first["spot_check_rel_err"] and both["timings"]
    assert set(both["dates"]) == {"spot", "kernels"}
    with pytest.raises(SystemExit):
        gpu_check.main(["--smoke", "--parts", "kernels,warp", "--out", str(tmp_path)])


def test_a_part_cut_off_keeps_its_rows_and_is_marked_unfinished(tmp_path, monkeypatch):
    calls = []
    real = gpu_check.measure

    def measure_then_stop(*args):
        if len(calls) == 3:   # as the device call's time limit would (timeout --signal=INT)
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args)
    monkeypatch.setattr(gpu_check, "measure", measure_then_stop)
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["--smoke", "--parts", "spot,kernels", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("*-smoke.json")
    result = json.loads(path.read_text())
    assert result["unfinished"] == ["kernels"] and set(result["dates"]) == {"spot"}
    assert len(result["timings"]) == 3 and all(math.isfinite(r["fwd_ms"]) for r in result["timings"])
    monkeypatch.setattr(gpu_check, "measure", real)
    assert gpu_check.main(["--smoke", "--parts", "kernels", "--out", str(tmp_path)]) == 0
    result = json.loads(path.read_text())
    assert "unfinished" not in result and len(result["timings"]) > 3


def test_device_script_runs_parts_and_returns_the_json(tmp_path):
    out, results = tmp_path / "out", tmp_path / "results"
    out.mkdir()
    env = {**os.environ, "SKIP_INSTALL": "1", "GPU_CHECK_ARGS": "--smoke", "RESULTS": str(results), "OUT": str(out),
           "TRITON_INTERPRET": "1"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "device_run.sh"), "spot"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (path,) = out.glob("*.json")
    assert "spot_check_rel_err" in json.loads(path.read_text())
    proc = subprocess.run(["bash", str(ROOT / "bench" / "device_run.sh")], capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "which parts" in proc.stderr


def test_sweep_shapes_are_the_issue_grid():
    shapes = gpu_check.sweep_shapes(smoke=False)
    mha = [s for s in shapes if s[1] == s[2]]
    assert {s[4] for s in mha} == {64, 128} and {s[5] for s in mha} == {True, False}
    assert sorted({s[3] for s in mha}) == [1024, 2048, 4096, 8192, 16384, 32768]
    assert all(s[0] == max(1, 16384 // s[3]) and s[1] * s[4] == 2048 for s in mha)   # B * N = 16k, at least B = 1
    assert sorted(s[3] for s in shapes if s[1] != s[2]) == [32768, 131072]
    assert all(s[1:3] == (32, 8) for s in shapes if s[1] != s[2])


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
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- table:attention -->\nold\n<!-- /table:attention -->\nmiddle\n"
                      "<!-- table:e2e -->\n<!-- /table:e2e -->\nend\n")
    written, tables = bench_report.render(smoke_json, readme)
    pngs = [Path(p) for p in written if p.endswith(".png")]
    assert len(pngs) == 2 and all(p.read_bytes()[:8] == PNG for p in pngs)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("end\n") and "old" not in text
    result = json.loads(smoke_json.read_text())
    summary = bench_report.attention_summary(result["timings"])
    assert len(summary) == len({(r["B"], r["H"], r["N"], r["D"], r["causal"]) for r in result["timings"]})
    for s in summary:
        ours = next(r for r in result["timings"] if r["method"] == "attnlrp_fast[grad]" and r["N"] == s["N"])
        best = max(r["fwd_tflops"] for r in result["timings"] if r["method"].startswith("sdpa[") and r["N"] == s["N"])
        assert s["fwd_vs_sdpa"] == pytest.approx(ours["fwd_tflops"] / best)
        assert f"{s['fwd_tflops']:.0f} | {best:.0f} | {s['fwd_vs_sdpa']:.2f}x" in tables["attention"]
    assert "attnlrp_fast" in tables["e2e"] and "lxt_style" in tables["e2e"] and "agree" in tables["e2e"]


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
    assert bench_report.targets_lines({"timings": []})[0].endswith("not measured")


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
                           str(ROOT / "bench" / "test_bench_attention.py")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
