"""Plots and README tables from recorded benchmark JSON (no GPU needed).

    python bench/report.py bench/results/<date>-<device>.json [--readme README.md]   # gpu_check.py's JSON
    python bench/report.py bench/results/<date>-cpu-memory.json --readme README.md   # memory.py's JSON
    python bench/report.py bench/results/faithfulness.json --readme README.md        # attnlrp-fast evaluate's
    python bench/report.py $OUT/<date>-<device>.json --summary      # targets and the run's steps only; writes nothing

Writes PNGs next to the JSON (<stem>-attention.png, <stem>-memory.png, <stem>-e2e.png, or <stem>.png for a
memory.py file) and, with --readme, replaces the text between the file's markers
`<!-- table:KIND -->` and `<!-- /table:KIND -->` (KIND: attention, e2e, cpu-memory, faithfulness) with tables generated
from the JSON. Every figure in them comes from the JSON; a missing or failed measurement shows as "-" or its
error, a variant the correctness gate ruled out as "gated out". The attention section holds the timing table, the
decode table, the dispatch table's cases, the peak memory at 128k (gpu_check's memory step), the time per kernel
(its profile step), the target lines and how the run went (the gate's verdicts, steps cut off, GPU tests,
compiles).
"""

import argparse
import json
import re
from pathlib import Path


# --- reading ------------------------------------------------------------------------------------------------
def _ok(row):
    return "error" not in row


def _best(rows, prefix, key, highest=True):
    cands = [r for r in rows if r["method"].startswith(prefix) and _ok(r) and r.get(key) is not None]
    if not cands:
        return None
    return (max if highest else min)(cands, key=lambda r: r[key])


def attention_groups(timings):
    """{(D, causal, Hkv < H, N, B, H, Hkv): [rows]} in sweep order."""
    groups = {}
    for r in timings:
        key = (r["D"], r["causal"], r["Hkv"] < r["H"], r["N"], r["B"], r["H"], r["Hkv"])
        groups.setdefault(key, []).append(r)
    return groups


def _ratio(a, b):
    return a / b if a is not None and b else None


# Memory is binary everywhere: MiB = 2^20 bytes, GiB = 2^30, KiB = 2^10 (as `attnlrp-fast estimate` prints).
# bench/memory.py and bench/cpu_explain.py wrote their figures as "peak_extra_mb", "mb_at_zero" and "kb_per_token"
# until 2026-12-02; those held MiB and KiB/token all along (ru_maxrss KiB / 1024, CUDA bytes / 2^20), so the old
# names are read as the new ones.
def peak_mib(row):
    """A memory.py / cpu_explain.py row's peak above the model, MiB (None where it has none)."""
    return row["peak_extra_mib"] if "peak_extra_mib" in row else row.get("peak_extra_mb")


def fit_mib(fit):
    """memory.py's linear fit: (MiB at zero tokens, KiB per token)."""
    return (fit["mib_at_zero"] if "mib_at_zero" in fit else fit["mb_at_zero"],
            fit["kib_per_token"] if "kib_per_token" in fit else fit["kb_per_token"])


def attention_summary(timings):
    """One dict per shape: our figures, the best baselines and the ratios the targets are about."""
    out = []
    for (D, causal, gqa, N, B, H, Hkv), rows in attention_groups(timings).items():
        ours = {r["method"]: r for r in rows if r["method"].startswith("attnlrp_fast") and _ok(r)}
        grad, lrp = ours.get("attnlrp_fast[grad]"), ours.get("attnlrp_fast[attnlrp]")
        lrp_atomic = ours.get("attnlrp_fast[attnlrp,dq=atomic]")   # the backward's other dQ mode
        portable = ours.get("attnlrp_fast[grad,fwd=portable]")     # the forward kernel for any GPU
        tma = ours.get("attnlrp_fast[grad,fwd=tma]")               # descriptors, no warp specialisation
        hopper = ours.get("attnlrp_fast[grad,fwd=hopper]")         # descriptors, warp-specialised loop
        lrp_sdpa = ours.get("attnlrp_fast[attnlrp,path=sdpa]")     # the torch path on torch's SDPA kernels
        sdpa_fwd = _best(rows, "sdpa[", "fwd_tflops")
        sdpa_bwd = _best(rows, "sdpa[", "bwd_tflops")
        sdpa_mem = _best(rows, "sdpa[", "peak_mib", highest=False)
        lxt_bwd = _best(rows, "lxt_style[sdpa", "bwd_tflops")
        eager = next((r for r in rows if r["method"] == "eager"), None)
        out.append({
            "D": D, "causal": causal, "N": N, "B": B, "H": H, "Hkv": Hkv,
            "fwd_tflops": grad and grad.get("fwd_tflops"),
            "best_sdpa_fwd": sdpa_fwd and sdpa_fwd["method"], "best_sdpa_fwd_tflops": sdpa_fwd and sdpa_fwd["fwd_tflops"],
            "fwd_vs_sdpa": _ratio(grad and grad.get("fwd_tflops"), sdpa_fwd and sdpa_fwd["fwd_tflops"]),
            "portable_fwd_tflops": portable and portable.get("fwd_tflops"),
            "tma_fwd_tflops": tma and tma.get("fwd_tflops"),
            "hopper_fwd_tflops": hopper and hopper.get("fwd_tflops"),
            "sdpa_path_bwd_tflops": lrp_sdpa and lrp_sdpa.get("bwd_tflops"),
            "sdpa_path_bwd_vs_lxt": _ratio(lrp_sdpa and lrp_sdpa.get("bwd_tflops"),
                                           lxt_bwd and lxt_bwd["bwd_tflops"]),
            "grad_bwd_tflops": grad and grad.get("bwd_tflops"),
            "best_sdpa_bwd_tflops": sdpa_bwd and sdpa_bwd["bwd_tflops"],
            "grad_bwd_vs_sdpa": _ratio(grad and grad.get("bwd_tflops"), sdpa_bwd and sdpa_bwd["bwd_tflops"]),
            "attnlrp_bwd_tflops": lrp and lrp.get("bwd_tflops"),
            "best_lxt_bwd": lxt_bwd and lxt_bwd["method"], "best_lxt_bwd_tflops": lxt_bwd and lxt_bwd["bwd_tflops"],
            "attnlrp_bwd_vs_lxt": _ratio(lrp and lrp.get("bwd_tflops"), lxt_bwd and lxt_bwd["bwd_tflops"]),
            "atomic_bwd_tflops": lrp_atomic and lrp_atomic.get("bwd_tflops"),
            "atomic_bwd_vs_lxt": _ratio(lrp_atomic and lrp_atomic.get("bwd_tflops"),
                                        lxt_bwd and lxt_bwd["bwd_tflops"]),
            "atomic_peak_mib": lrp_atomic and lrp_atomic.get("peak_mib"),
            "peak_mib": lrp and lrp.get("peak_mib"), "sdpa_peak_mib": sdpa_mem and sdpa_mem["peak_mib"],
            "peak_vs_sdpa": _ratio(lrp and lrp.get("peak_mib"), sdpa_mem and sdpa_mem["peak_mib"]),
            "eager": ("out of memory" if eager and not _ok(eager) else
                      None if eager is None else f"{eager['fwd_tflops']:.0f}/{eager['bwd_tflops'] or 0:.0f}"),
        })
    return out


# --- tables -------------------------------------------------------------------------------------------------
def _f(x, fmt="{:.0f}"):
    return "-" if x is None else fmt.format(x)


def _tokens(n):
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def gated(result):
    """{variant: why} of what the run's correctness gate ruled out (bench/gate.py)."""
    verdicts = (result.get("gate") or {}).get("verdicts") or {}
    return {v: r.get("why") or r.get("status") for v, r in verdicts.items() if r.get("status") != "pass"}


def _cell(value, variant, out, fmt="{:.0f}"):
    """A figure, or "gated out" where the gate ruled its variant out."""
    return "gated out" if value is None and variant in out else _f(value, fmt)


def attention_table(result):
    out = gated(result)
    lines = [
        f"Attention, {result.get('dtype', '?')} on {result['device']} (torch {result['versions'].get('torch')}, "
        f"Triton {result['versions'].get('triton')}); TFLOP/s, higher is better; ratios are ours / the best "
        "baseline in the same run; peak memory in MiB (2^20 bytes).",
        "",
        "| D | causal | B x H/Hkv x N | fwd | TMA fwd | Hopper fwd | portable fwd | best SDPA fwd | ratio | grad bwd | "
        "SDPA bwd | attnlrp bwd | LXT-style bwd | ratio | attnlrp bwd, atomic dQ | ratio | attnlrp bwd, SDPA path | "
        "ratio | peak MiB | SDPA peak | eager fwd/bwd |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in attention_summary(result.get("timings", [])):
        lines.append(
            f"| {s['D']} | {'yes' if s['causal'] else 'no'} | {s['B']} x {s['H']}/{s['Hkv']} x {_tokens(s['N'])} | "
            f"{_f(s['fwd_tflops'])} | {_cell(s['tma_fwd_tflops'], 'tma', out)} | "
            f"{_cell(s['hopper_fwd_tflops'], 'hopper', out)} | {_cell(s['portable_fwd_tflops'], 'portable', out)} | "
            f"{_f(s['best_sdpa_fwd_tflops'])} | "
            f"{_f(s['fwd_vs_sdpa'], '{:.2f}x')} | "
            f"{_f(s['grad_bwd_tflops'])} | {_f(s['best_sdpa_bwd_tflops'])} | {_f(s['attnlrp_bwd_tflops'])} | "
            f"{_f(s['best_lxt_bwd_tflops'])} | {_f(s['attnlrp_bwd_vs_lxt'], '{:.2f}x')} | "
            f"{_cell(s['atomic_bwd_tflops'], 'dq=atomic', out)} | {_f(s['atomic_bwd_vs_lxt'], '{:.2f}x')} | "
            f"{_cell(s['sdpa_path_bwd_tflops'], 'sdpa', out)} | {_f(s['sdpa_path_bwd_vs_lxt'], '{:.2f}x')} | "
            f"{_f(s['peak_mib'])} | {_f(s['sdpa_peak_mib'])} | {s['eager'] or '-'} |")
    for part in (decode_table(result), dispatch_table(result), memory_table(result), profile_table(result)):
        if part:
            lines += [""] + part
    return "\n".join(lines + [""] + summary_lines(result))


def decode_table(result):
    """The decode step: ms of one query against the cache per method, and best SDPA over ours."""
    rows = result.get("decode") or []
    if not rows:
        return []
    methods = list(dict.fromkeys(r["method"] for r in rows))
    shapes = list(dict.fromkeys((r["M"], r["B"], r["H"], r["Hkv"], r["D"]) for r in rows))
    lines = [f"Decoding: one query against a KV cache, {rows[0].get('dtype', '?')}, no gradients; ms (lower is "
             "better); ratio = the fastest SDPA backend / ours, >= 1.0 is no slower:", "",
             "| cache | B x H/Hkv, D | " + " | ".join(methods) + " | ratio, auto | ratio, Triton |",
             "|" + "---|" * (len(methods) + 4)]
    for M, B, H, Hkv, D in shapes:
        cell = {r["method"]: r for r in rows if (r["M"], r["B"], r["H"], r["Hkv"], r["D"]) == (M, B, H, Hkv, D)}

        def text(r):
            if r is None:
                return "-"
            if "error" in r:
                return r["error"][:60]
            how = r.get("forward") if r.get("path", "triton") == "triton" else r.get("path")
            return f"{r['ms']:.3f}" + (f" ({how})" if how and r["method"].startswith("attnlrp_fast") else "")
        ratios = [_f(decode_ratio(cell, m), "{:.2f}x") for m in ("attnlrp_fast[auto]", "attnlrp_fast[triton]")]
        lines.append(f"| {_tokens(M)} | {B} x {H}/{Hkv}, {D} | " + " | ".join(text(cell.get(m)) for m in methods) +
                     f" | {' | '.join(ratios)} |")
    return lines


def decode_ratio(cell, method):
    """Fastest SDPA backend's ms / `method`'s ms in one decode shape (None when either is missing)."""
    sdpa = [r["ms"] for m, r in cell.items() if m.startswith("sdpa[") and r.get("ms")]
    ours = cell.get(method)
    return _ratio(min(sdpa) if sdpa else None, ours.get("ms") if ours else None)


def dispatch_table(result):
    """The dispatch step: per case, forward+backward (attnlrp) on each path and each forward kernel alone."""
    rows = result.get("dispatch_rows") or []
    if not rows:
        return []
    cases = list(dict.fromkeys(r["case"] for r in rows))
    variants = list(dict.fromkeys(r["path"].split("=")[1] for r in rows if r["path"].startswith("forward=")))
    info = result.get("table") or {}
    out = gated(result)
    r0 = rows[0]
    head = (f"The dispatch table's cases (GQA {r0['H']}/{r0['Hkv']}, B x N = {_tokens(r0['B'] * r0['N'])} tokens, "
            f"{r0.get('dtype', '?')}): forward+backward ms under attnlrp on each path, the faster one is what auto "
            "takes; forward ms of each forward kernel alone.")
    if info.get("written"):
        head += (f" The table ({info.get('path')}): forward {info.get('forward')}, dQ {info.get('dq')}"
                 + (f"; gated out: {', '.join(sorted(info.get('gated_out') or {}))}" if info.get("gated_out") else "")
                 + ".")
    elif info:
        head += f" No table written: {info.get('why')}."
    lines = [head, "", "| case | SDPA path | Triton path | faster | " +
             " | ".join(f"{v} fwd" for v in variants) + " |", "|" + "---|" * (4 + len(variants))]
    for case in cases:
        cell = {r["path"]: r for r in rows if r["case"] == case}

        def ms(r, key="fwd_bwd_ms"):
            return "-" if r is None else r.get("error", "")[:60] if "error" in r else _f(r.get(key), "{:.3f}")
        sdpa, triton = cell.get("sdpa"), cell.get("triton")
        times = {p: r.get("fwd_bwd_ms") for p, r in (("sdpa", sdpa), ("triton", triton)) if r and r.get("fwd_bwd_ms")}
        faster = min(times, key=times.get) if times else "-"
        sdpa_text = "gated out" if sdpa is None and "sdpa" in out else ms(sdpa)
        triton_text = ms(triton) + (f" ({triton['forward']})" if triton and triton.get("forward") else "")
        lines.append(f"| {case} | {sdpa_text} | {triton_text} | {faster} | " +
                     " | ".join(ms(cell.get(f"forward={v}"), "fwd_ms") for v in variants) + " |")
    return lines


def memory_table(result):
    """Peak memory above the inputs of one forward+backward at the long shape (the memory step)."""
    mem = result.get("memory")
    if not mem or not mem.get("rows"):
        return []
    sh = mem["shape"]
    lines = [f"Peak memory above the inputs, one forward+backward, {sh['B']} x {sh['H']}/{sh['Hkv']} x "
             f"{_tokens(sh['N'])}, D = {sh['D']}, {'causal' if sh['causal'] else 'full'}, {mem.get('dtype', '?')} "
             f"(MiB = 2^20 bytes):", "",
             "| method | peak MiB | seconds (one run) |", "|---|---|---|"]
    for r in mem["rows"]:
        peak = r.get("error") or _f(r.get("peak_mib"))
        lines.append(f"| {r['method']} | {peak} | {_f(r.get('seconds_one_run'), '{:.2f}')} |")
    return lines


def profile_table(result, top=6):
    """Time per kernel of one profiled forward+backward of ours (the profile step), largest first."""
    prof = result.get("profile")
    if not prof or not prof.get("methods"):
        return []
    sh = prof["shape"]
    unit = "GPU" if prof.get("activity") == "cuda" else "CPU (smoke: ops, not kernels)"
    lines = [f"{unit} time per kernel, one forward+backward at {sh['B']} x {sh['H']}/{sh['Hkv']} x {_tokens(sh['N'])}, "
             f"D = {sh['D']}, {'causal' if sh['causal'] else 'full'} (torch.profiler):", "",
             "| method | kernel | ms | calls | share |", "|---|---|---|---|---|"]
    for method, p in prof["methods"].items():
        if "error" in p:
            lines.append(f"| {method} | {p['error'][:90]} | - | - | - |")
            continue
        for name, k in list(p["kernels"].items())[:top]:
            share = k["ms"] / p["total_ms"] if p["total_ms"] else None
            lines.append(f"| {method} | `{name[:70]}` | {k['ms']:.3f} | {k['count']} | {_f(share, '{:.0%}')} |")
    return lines


def gate_lines(result):
    """The correctness gate: what passed, what was gated out (left out of every later step) and why."""
    g = result.get("gate")
    if not g:
        return []
    verdicts = g.get("verdicts") or {}
    if not verdicts:
        return ["Correctness gate: no verdicts (it did not finish): every kernel variant and path of ours was left out "
                "of the later steps."]
    cases = {}
    for r in verdicts.values():
        for status, n in (r.get("cases") or {}).items():
            cases[status] = cases.get(status, 0) + n
    counts = ", ".join(f"{n} {status}" for status, n in sorted(cases.items()))
    passed = [v for v, r in verdicts.items() if r.get("status") == "pass"]
    lines = [f"Correctness gate against float64 ({len(g.get('units', {}))} units in parallel processes"
             f"{'; cases: ' + counts if counts else ''}): passed {', '.join(passed) or 'nothing'}."]
    out = gated(result)
    if out:
        lines.append("Gated out (no later step ran them; the dispatch table names them): " +
                     "; ".join(f"{v}: {why}" for v, why in out.items()) + ".")
    info = result.get("table") or {}
    if info.get("written"):
        lines.append(f"Dispatch table ({info.get('path')}): forward {info.get('forward')}, dQ {info.get('dq')}, "
                     f"{info.get('cases', 0)} measured cases.")
    elif info:
        lines.append(f"No dispatch table written: {info.get('why')}.")
    return lines


def summary_lines(result):
    """Targets, then how the run went: the gate's verdicts, steps cut off, the GPU tests, each step's seconds and
    compiles."""
    lines = ["Targets:"] + targets_lines(result)
    gate = gate_lines(result)
    if gate:
        lines += [""] + gate
    if result.get("unfinished"):
        lines += ["", f"Unfinished steps (cut off by their time budget or failed): {', '.join(result['unfinished'])}."]
    tests = result.get("gpu_tests")
    if tests:
        counts = ", ".join(f"{n} {o.lower()}" for o, n in tests.get("counts", {}).items())
        last = tests.get("summary") or next((t for t in reversed(tests.get("tail", [])) if t.strip()), "no output")
        timed_out = " (stopped at its time limit)" if tests.get("timed_out") else ""
        workers = tests.get("workers", 1)
        lines += ["", f"GPU tests in the same run ({tests.get('selection', 'pytest -m gpu')}, "
                      f"{f'{workers} pytest-xdist workers' if workers > 1 else 'one process'}){timed_out}: "
                      f"{counts or last.strip('= ')}."]
        if tests.get("failed"):
            lines.append("Failed: " + ", ".join(tests["failed"][:10]))
    steps = result.get("steps")
    if steps:
        lines += ["", "Steps (seconds / budget, Triton compiles): " + "; ".join(
            f"{n} {r.get('seconds', '-')}/{_f(r.get('budget_s'))} s, {r.get('triton_compiles', '-')} "
            f"({r.get('status', '?')})" for n, r in steps.items()) + "."]
    return lines


def _worst(key, rows, highest=False):
    vals = [s[key] for s in rows if s[key] is not None]
    return (max if highest else min)(vals) if vals else None


def memory_ratio(result):
    """Peak memory of ours (attnlrp, default dQ mode) / the lowest SDPA peak at N >= 128k: the memory step's rows,
    else the sweep's rows at that N."""
    mem = result.get("memory")
    if mem and mem.get("rows") and mem["shape"]["N"] >= 131072:
        rows = {r["method"]: r for r in mem["rows"] if _ok(r) and r.get("peak_mib") is not None}
        ours = rows.get("attnlrp_fast[attnlrp]")
        sdpa = [r["peak_mib"] for m, r in rows.items() if m.startswith("sdpa[")]
        return _ratio(ours and ours["peak_mib"], min(sdpa) if sdpa else None)
    long_rows = [s for s in attention_summary(result.get("timings", [])) if s["N"] >= 131072]
    return _worst("peak_vs_sdpa", long_rows, highest=True)


def e2e_ratio(result, tokens=32768, method="attnlrp_fast"):
    """LXT-style seconds / `method`'s for the explanation at `tokens` or more (worst size): >= 1.0 is no slower."""
    rows = [r for r in (result.get("e2e") or {}).get("rows", []) if _ok(r) and r.get("seconds") and
            not r.get("search") and r["tokens"] >= tokens]
    ratios = []
    for n in sorted({r["tokens"] for r in rows}):
        secs = {r["method"]: r["seconds"] for r in rows if r["tokens"] == n}
        if method in secs and "lxt_style" in secs:
            ratios.append(secs["lxt_style"] / secs[method])
    return min(ratios) if ratios else None


def decode_target(result, cache=131072, method="attnlrp_fast[triton]"):
    """Fastest SDPA backend's ms / ours at a cache of `cache` or more (worst batch size)."""
    rows = [r for r in result.get("decode") or [] if r["M"] >= cache and _ok(r)]
    ratios = []
    for shape in dict.fromkeys((r["M"], r["B"], r["H"], r["Hkv"], r["D"]) for r in rows):
        cell = {r["method"]: r for r in rows if (r["M"], r["B"], r["H"], r["Hkv"], r["D"]) == shape}
        ratio = decode_ratio(cell, method)
        if ratio is not None:
            ratios.append(ratio)
    return min(ratios) if ratios else None


def targets(result):
    """The benchmark targets: (name, worst measured ratio or None, goal, comparison)."""
    summary = attention_summary(result.get("timings", []))
    fwd_rows = [s for s in summary if s["D"] == 128 and s["causal"] and s["N"] >= 4096]
    return [
        ("forward / best SDPA backend, d = 128, causal, N >= 4k (worst shape)", _worst("fwd_vs_sdpa", fwd_rows),
         1.0, ">="),
        ("attnlrp backward / LXT-style backward (worst shape)", _worst("attnlrp_bwd_vs_lxt", summary), 1.0, ">="),
        ("the same with ATTNLRP_FAST_DQ=atomic (not the default)", _worst("atomic_bwd_vs_lxt", summary), 1.0, ">="),
        ("peak memory of forward + backward / SDPA's, N = 128k", memory_ratio(result), 1.1, "<="),
        ("8B-shaped explanation at 32k: LXT-style seconds / ours", e2e_ratio(result), 1.0, ">="),
        ("the same with the Triton kernels forced (to become the default)",
         e2e_ratio(result, method="attnlrp_fast_triton"), 1.0, ">="),
        ("decode, 1 query on a 128k cache (worst batch): fastest SDPA / ours on the Triton kernels",
         decode_target(result), 1.0, ">="),
    ]


def targets_lines(result):
    lines = []
    for name, value, goal, op in targets(result):
        if value is None:
            verdict = "not measured"
        else:
            met = value >= goal if op == ">=" else value <= goal
            verdict = f"{value:.2f}x ({'met' if met else 'MISSED'}; target {op} {goal:.1f}x)"
        lines.append(f"- {name}: {verdict}")
    return lines


def e2e_table(result):
    e = result.get("e2e")
    if not e:
        return "No end-to-end run recorded."
    sh = e["shape"]
    lines = [
        f"One explanation of a {sh['name']}-shaped model ({sh['num_hidden_layers']} layers, hidden "
        f"{sh['hidden_size']}, {sh['num_attention_heads']}/{sh['num_key_value_heads']} heads, FFN "
        f"{sh['intermediate_size']}, {e['dtype']}, random weights) on {result['device']} (GiB = 2^30 bytes):",
        "",
        "| tokens | method | seconds | explanation / forward | peak GiB | estimated GiB | measured / estimated |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in e["rows"]:
        if r.get("search"):
            continue
        secs = r.get("error") or _f(r.get("seconds"), "{:.2f}")
        peak, est = r.get("peak_mib"), r.get("estimated_peak_mib")
        ratio = _f(peak / est if peak is not None and est else None, "{:.3f}")
        method = r["method"] + (f" ({r['hops']} hops, {_tokens(r['reasoning_tokens'])} reasoning tokens)"
                                if "hops" in r else "")
        lines.append(f"| {_tokens(r['tokens'])} | {method} | {secs} | "
                     f"{_f(r.get('explain_over_forward'), '{:.1f}x')} | "
                     f"{_f(peak / 1024 if peak is not None else None, '{:.1f}')} | "
                     f"{_f(est / 1024 if est is not None else None, '{:.1f}')} | {ratio} |")
    if e.get("longest"):
        lines += ["", "Longest input that ran (doubling N): " + ", ".join(
            f"{m} {_tokens(n) if n else 'none'}" for m, n in e["longest"].items()) + "."]
    for key, what in (("agreement", "attnlrp_fast's"), ("agreement_triton", "attnlrp_fast_triton's")):
        if e.get(key):
            a = e[key]
            lines += ["", f"{what} relevance and the LXT-style baseline's agree at {_tokens(a['tokens'])} tokens: "
                          f"cosine {a['cosine']:.4f}, relative error {a['rel_err']:.2g}."]
    return "\n".join(lines)


def faithfulness_table(result):
    from attnlrp_fast.evaluation import faithfulness

    lines = [f"Measured {result.get('date', '?')} on {result.get('device', '?')} (torch "
             f"{result.get('versions', {}).get('torch', '?')}); {result['settings']['steps']} perturbation steps, "
             f"removed tokens' embeddings {'zeroed' if result['settings']['perturb'] == 'zero' else 'replaced'}; "
             "ABPC in the target's unit, averaged over samples." + baseline_settings(result["settings"]), ""]
    for task, out in result["tasks"].items():
        extra = f", the model answers {out['model_accuracy']:.1%} correctly" if "model_accuracy" in out else ""
        if "sampled" in out:
            extra = f" (the {out['samples']} of {out['sampled']} sampled that the model gets right)"
        lines.append(f"- {task}: {out['model']}, {out['samples']} samples{extra}; target: {out['target']}")
        if "hop0_top_is_reasoning_token" in out:
            lines.append(f"  - one hop of AttnLRP: the most relevant token is the reasoning token in "
                         f"{out['hop0_top_is_reasoning_token']:.1%} of the samples; it holds "
                         f"{out['hop0_positive_share_on_reasoning_token']:.1%} of the positive relevance on average")
    lines += ["", "RISE, MAS and RISE+AP (lower is better): the log-probability of the generation as the most "
                  f"relevant tokens go in {result['settings']['steps']} groups, normalised, against the attribution mass "
                  "removed; '-' where the "
                  "target is not a token (minilm's cosine). Attribution s: the seconds of attribution for all of a "
                  "task's samples together."]
    lines += [f"Note: {note}" for note in result.get("notes") or []]
    return "\n".join(lines + ["", faithfulness.table(result)])


def baseline_settings(settings, options=None):
    """' The paper baselines: ...' stating AtMan's and SmoothGrad's settings (paper_baselines.Options; `options`
    overrides the run's), or '' for a JSON without them."""
    o = {**(settings.get("method_options") or {}), **(options or {})}
    if "atman_group" not in o:
        return ""
    group = "one token" if o["atman_group"] == 1 else f"runs of {o['atman_group']} tokens"
    kappa = "off" if o.get("atman_kappa") is None else f"at cosine >= {o['atman_kappa']}"
    return (f" The paper baselines: AtMan suppresses {group} at a time (scores x {1 - o['atman_factor']:.2g}, "
            f"conceptual suppression {kappa}); SmoothGrad x input averages {o['smoothgrad_samples']} samples of "
            f"noise {o['smoothgrad_noise']} x (max - min) of the embeddings; attention rollout and Grad x AttnRoll "
            "from the target position(s).")


def needle_table(result):
    """attnlrp-fast evaluate --task needle: the settings, each length's samples, the table, and the target (AttnLRP's
    pointing >= 90 % at every length where the model answers)."""
    from attnlrp_fast.evaluation import faithfulness

    settings = result["settings"]
    curves = [t for t, out in result["tasks"].items() if out.get("curves")]
    lines = [f"Measured {result.get('date', '?')} on {result.get('device', '?')} (torch "
             f"{result.get('versions', {}).get('torch', '?')}), {settings['steps']} perturbation steps (removed tokens' "
             f"embeddings zeroed) at {', '.join(curves) or 'no length'}, integrated gradients with "
             f"{settings.get('ig_steps', '?')} path points; the other lengths report pointing, rank and share only.", ""]
    for task, out in result["tasks"].items():
        ran = out.get("methods_run", settings["methods"])
        left = [m for m in settings["methods"] if m not in ran]
        lines.append(f"- {task}: {out['model']}, documents of {out['document_tokens_mean']:.0f} tokens on average; the "
                     f"model answers {out['samples']} of {out['sampled']} samples right (those are explained)" +
                     (f"; not run here: {', '.join(left)}" if left else "") +
                     (";" + baseline_settings(settings, out["method_options"]).removeprefix(" The paper baselines:")
                      if "method_options" in out else ""))
    lines += ["", "Pointing: the most relevant document token lies in the needle sentence; evidence rank: where the "
                  "needle's best token ranks among the document's; evidence share: the needle's share of the "
                  "document's positive relevance; attribution s: seconds per explanation."]
    lines += [f"Note: {note}" for note in result.get("notes") or []]
    lines += ["", faithfulness.table(result), ""]
    for task, out in result["tasks"].items():
        lrp = next((r for m, r in out["methods"].items() if m.split("[")[0] == "attnlrp"), None)
        if lrp is None:
            lines.append(f"- {task}: no sample answered right, nothing explained")
            continue
        verdict = "met" if lrp["pointing_accuracy"] >= 0.9 else "MISSED"
        lines.append(f"- {task}: AttnLRP points at the needle in {lrp['pointing_accuracy']:.0%} of "
                     f"{out['samples']} samples ({verdict}; target >= 90 %)")
    return "\n".join(lines)


def cpu_memory_table(result):
    fits = result.get("linear_fits", {})
    modes = [m for m in ("low_memory", "plain", "eager") if any(r["mode"] == m for r in result["rows"])]
    sizes = sorted({r["tokens"] for r in result["rows"]})
    cell = {(r["mode"], r["tokens"]): r for r in result["rows"]}
    head = "| mode | " + " | ".join(_tokens(n) for n in sizes) + " | fit: MiB + KiB/token | worst point off the line |"
    lines = [f"Peak memory of one explanation on top of the model on {result.get('device', '?')}, MiB (MiB = 2^20 "
             "bytes, KiB = 2^10 bytes); fit: a least-squares line through each mode's points.", "",
             head, "|" + "---|" * (len(sizes) + 3)]
    for m in modes:
        vals = []
        for n in sizes:
            r = cell.get((m, n))
            vals.append("-" if r is None else r.get("error", None) or f"{peak_mib(r):.0f}")
        f = fits.get(m)
        # a straight line that misses a point by more than 10 % is no description of the growth
        linear = f is not None and f["worst_deviation_from_line"] <= 0.1
        fit = "{:.0f} + {:.1f}".format(*fit_mib(f)) if linear else "not linear" if f else "-"
        worst = f"{f['worst_deviation_from_line']:.1%}" if f else "-"
        lines.append(f"| {m} | " + " | ".join(vals) + f" | {fit} | {worst} |")
    return "\n".join(lines)


def cpu_explain_kind(result):
    """The README marker of a bench/cpu_explain.py file: cpu-explain, or cpu-explain-smollm2 for the real model."""
    return "cpu-explain-smollm2" if result.get("model") == "SmolLM2-135M-Instruct" else "cpu-explain"


def cpu_explain_table(result):
    """bench/cpu_explain.py: one explanation on CPU, time and peak memory of each method with the ratios to
    attnlrp-fast, and the targets (at 4k and 16k, SmolLM2's at 8k: time and memory <= 1.0x the LXT-style
    approach)."""
    rows = {(r["method"], r["tokens"]): r for r in result["rows"]}
    sizes = sorted({r["tokens"] for r in result["rows"]})
    real = cpu_explain_kind(result) == "cpu-explain-smollm2"
    model = ("SmolLM2-135M-Instruct (real weights, 30 layers), every layer checkpointed in both methods, the sample "
             "report's tokens" if real else "4-layer Llama, hidden 256, 8/2 heads")
    runs = f"median of {result['repeats']} runs" if result["repeats"] > 1 else "one run after a warm-up"
    lines = [f"One AttnLRP explanation on {result['device']}, {result['threads']} threads, torch "
             f"{result['versions']['torch']} (bench/cpu_explain.py: {model}, fp32; {runs}; peak memory above the "
             "model, MiB = 2^20 bytes). Ratio: the method over attnlrp-fast." +
             (" Estimated: af.estimate_memory's peak for the method's mode in float32 (from the config, on meta "
              "tensors), and how far it is from the measured peak." if real else ""), "",
             "| N | method | seconds | ratio | peak MiB | ratio |" + (" estimated MiB |" if real else ""),
             "|---|---|---|---|---|---|" + ("---|" if real else "")]
    for n in sizes:
        ours = rows.get(("attnlrp_fast", n), {})
        for method in ("attnlrp_fast", "lxt_style", "lxt_style_eager"):
            r = rows.get((method, n))
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {_tokens(n)} | {method} | {r['error']} | - | - | - |")
                continue
            t, m = _ratio(r["seconds"], ours.get("seconds")), _ratio(peak_mib(r), peak_mib(ours))
            est = r.get("estimated_peak_mib")
            estimate = (f" | {est:.0f} ({(est - peak_mib(r)) / peak_mib(r):+.0%})" if est is not None else " | -") \
                if real else ""
            lines.append(f"| {_tokens(n)} | {method} | {r['seconds']:.2f} | {_f(t, '{:.2f}x')} | "
                         f"{peak_mib(r):.0f} | {_f(m, '{:.2f}x')}{estimate} |")
    lines += ["", *cpu_explain_targets(result, (8192,) if real else (4096, 16384))]
    agree = result.get("agreement", {})
    if agree:
        lines += ["", "Relevance agreement with attnlrp-fast (relative difference): " +
                     ", ".join(f"{k} {v:.1e}" for k, v in sorted(agree.items())) + "."]
    return "\n".join(lines)


def cpu_explain_targets(result, sizes=(4096, 16384)):
    """One line per target size: ours over the LXT-style approach, time and memory, met or missed."""
    rows = {(r["method"], r["tokens"]): r for r in result["rows"] if "error" not in r}
    out = []
    for n in sizes:
        ours, lxt = rows.get(("attnlrp_fast", n)), rows.get(("lxt_style", n))
        if not ours or not lxt:
            out.append(f"- {_tokens(n)}: not measured")
            continue
        t, m = ours["seconds"] / lxt["seconds"], peak_mib(ours) / peak_mib(lxt)
        verdict = "met" if t <= 1.0 and m <= 1.0 else "MISSED"
        out.append(f"- {_tokens(n)}: time {t:.2f}x, memory {m:.2f}x the LXT-style approach ({verdict}; target <= 1.0x)")
    return out


def _gib(n):
    return f"{n / 2**30:.0f}" if n >= 100 * 2**30 else f"{n / 2**30:.1f}"


def estimates_table(result):
    """bench/estimate_table.py: predicted peak memory (weights + live tensors) of one explanation per model shape,
    mode and length, and the longest document each mode fits on each GPU (the JSON's "gpus": label -> bytes)."""
    rows = result["rows"]
    sizes = sorted({int(n) for r in rows for n in r.get("by_tokens", {})})
    gpus = list(result["gpus"])
    lines = [f"Predicted peak memory of one explanation, GiB (GiB = 2^30 bytes; weights + the peak of live tensors), "
             f"batch 1, {result['dtype']}, from `attnlrp-fast estimate` on meta tensors (torch {result['torch']}, "
             f"bench/estimate_table.py). Longest: the most tokens (a multiple of 4k) whose total fits the GPU's "
             f"memory, with the `--mlp-chunk` that reaches it.", "",
             "| model | mode | " + " | ".join(_tokens(n) for n in sizes) + " | " +
             " | ".join(f"longest on {g}" for g in gpus) + " |",
             "|" + "---|" * (2 + len(sizes) + len(gpus))]
    notes = {}
    for r in rows:
        if "error" in r:
            mark = notes.setdefault(r["error"], len(notes) + 1)
            lines.append(f"| {r['model']} | {r['mode']} | " + " | ".join(["n/a"] * len(sizes)) + " | " +
                         " | ".join([f"not covered ({mark})"] * len(gpus)) + " |")
            continue
        cells = [_gib(r["by_tokens"][str(n)]["total"]) + _host(r["by_tokens"][str(n)]) if str(n) in r["by_tokens"]
                 else "-" for n in sizes]
        weights = next(iter(r["by_tokens"].values()))["weights"] if r["by_tokens"] else 0
        longest = []
        for g in gpus:
            found = r["longest"].get(g)
            if found is None:
                longest.append("-")
            elif found["tokens"] == 0 and weights >= result["gpus"][g]:
                longest.append(f"does not fit on one GPU (weights {_gib(weights)} GiB)")
            elif found["tokens"] == 0:
                longest.append("< 4k")
            else:
                chunk = f" (mlp-chunk {found['mlp_chunk']})" if found.get("mlp_chunk") else ""
                longest.append(f"{_tokens(found['tokens'])}{chunk}")
        mode = r["mode"] + (" + offload" if r.get("offload") else "") + \
            (f" + seq-chunk {_tokens(r['seq_chunk'])}" if r.get("seq_chunk") else "")
        lines.append(f"| {r['model']} | {mode} | " + " | ".join(cells) + " | " + " | ".join(longest) + " |")
    if any(r.get("offload") for r in rows):
        lines += ["", "low_memory + offload: the layers' checkpoints in host memory (`--offload cpu`), shown as "
                  "(+ host GiB) beside the GPU's total; the longest documents count the GPU's memory only. "
                  "+ seq-chunk: each layer run in chunks of that many tokens, only its keys and values full length "
                  "(`--seq-chunk`)."]
    for error, mark in notes.items():
        lines += ["", f"({mark}) {error}"]
    return "\n".join(lines)


def context_parallel_table(result):
    """bench/context_table.py: the longest document per model, GPU memory, GPU count and offload, by the estimator."""
    rows = result["rows"]
    gpus = sorted({r["gpus"] for r in rows})
    columns = [(g, k) for g in dict.fromkeys(r["gpu"] for r in rows) for k in gpus]
    lines = [f"Longest document one explanation fits (tokens, a multiple of 4k, to 1/16), predicted by the estimator "
             f"on meta tensors (torch {result['torch']}, bench/context_table.py): {result['dtype']}, "
             f"{result['mode']}, --mlp-chunk {result['mlp_chunk']}; K GPUs = context parallelism over K "
             f"(`--context-parallel`), the figures per GPU: total GPU memory (weights + peak), + host memory of the "
             f"offloaded checkpoints, ring traffic per layer. k = 1024 tokens, M = 1024k (as `--tokens` reads "
             f"them).", "",
             "| model | checkpoints | " + " | ".join(f"{k} x {g}" for g, k in columns) + " |",
             "|" + "---|" * (2 + len(columns))]
    for model in dict.fromkeys(r["model"] for r in rows):
        for offload in (None, "cpu"):
            cells = []
            for g, k in columns:
                r = next((r for r in rows if r["model"] == model and r["offload"] == offload and r["gpu"] == g and
                          r["gpus"] == k), None)
                if r is None:
                    cells.append("-")
                elif not r["tokens"]:
                    cells.append("< 4k")
                else:
                    extra = (f" + {_gib(r['host'])} GiB host" if r.get("host") else "") + \
                        (f"; ring {_gib(r['ring_bytes'])} GiB/layer" if r.get("ring_bytes") else "")
                    n = r["tokens"]
                    count = f"{n / 2**20:.2f}M" if n >= 2**20 else _tokens(n)
                    cells.append(f"**{count}** ({_gib(r['total'])} GiB{extra})")
            where = "on the host (`--offload cpu`)" if offload else "on the GPU"
            lines.append(f"| {model} | {where} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _host(entry):
    """' (+N host)' for an estimate with offloaded checkpoints."""
    return f" (+{_gib(entry['host'])} host)" if entry.get("host") else ""


def replace_between(text, kind, body):
    pattern = re.compile(rf"(<!-- table:{re.escape(kind)} -->\n)(?:.*?\n)?(<!-- /table:{re.escape(kind)} -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"no <!-- table:{kind} --> ... <!-- /table:{kind} --> markers in the README")
    return pattern.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), text)


# --- plots --------------------------------------------------------------------------------------------------
def _figure(rows, cols, size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def plot_attention(result, path):
    timings = [r for r in result.get("timings", []) if r["H"] == r["Hkv"]]
    kinds = sorted({(r["D"], r["causal"]) for r in timings})
    if not kinds:
        return None
    fig, axes = _figure(len(kinds), 3, (15, 3.2 * len(kinds)))
    for row, (D, causal) in enumerate(kinds):
        rows = [r for r in timings if (r["D"], r["causal"]) == (D, causal)]
        for col, (key, label) in enumerate((("fwd_tflops", "forward TFLOP/s"), ("bwd_tflops", "backward TFLOP/s"),
                                            ("peak_mib", "peak MiB, fwd+bwd"))):
            ax = axes[row][col]
            for method in dict.fromkeys(r["method"] for r in rows):
                pts = [(r["N"], r[key]) for r in rows if r["method"] == method and _ok(r) and r.get(key) is not None]
                if pts:
                    style = "-" if method.startswith("attnlrp_fast") else "--"
                    ax.plot(*zip(*pts), style, marker="o", markersize=3, label=method, linewidth=2 if
                            style == "-" else 1)
            ax.set_xscale("log", base=2)
            if key == "peak_mib":
                ax.set_yscale("log")
            ax.set_title(f"D={D}, {'causal' if causal else 'full'}: {label}", fontsize=9)
            ax.set_xlabel("N (B*N = 16k)", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=6, loc="lower right")
    fig.suptitle(f"Attention, {result.get('dtype')} on {result['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_e2e(result, path):
    e = result.get("e2e")
    if not e:
        return None
    rows = [r for r in e["rows"] if _ok(r) and r.get("seconds") is not None]
    fig, axes = _figure(1, 2, (11, 3.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["tokens"], r["seconds"], r.get("peak_mib")) for r in rows if r["method"] == method)
        axes[0][0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        if all(p[2] is not None for p in pts):
            axes[0][1].plot([p[0] for p in pts], [p[2] / 1024 for p in pts], marker="o", label=method)
    for ax, label in zip(axes[0], ("seconds", "peak GiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
        ax.set_ylabel(label)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(f"One explanation, {e['shape']['name']} shape, on {result['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_cpu_memory(result, path):
    fig, axes = _figure(1, 1, (7, 4))
    ax = axes[0][0]
    for mode in dict.fromkeys(r["mode"] for r in result["rows"]):
        pts = sorted((r["tokens"], peak_mib(r)) for r in result["rows"] if r["mode"] == mode and _ok(r))
        ax.plot(*zip(*pts), marker="o", label=mode)
    ax.set_xlabel("tokens")
    ax.set_ylabel("peak memory of the explanation, MiB")
    ax.set_title(f"Memory against input length on {result['device']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# --- main ---------------------------------------------------------------------------------------------------
def render(json_path, readme=None):
    """Write the plots next to the JSON and, with `readme`, the tables into it. Returns the paths written."""
    json_path = Path(json_path)
    result = json.loads(json_path.read_text())
    stem = json_path.with_suffix("")
    written, tables = [], {}
    if "tasks" in result:                # attnlrp-fast evaluate
        from attnlrp_fast.evaluation import faithfulness

        written.append(faithfulness.plot_curves(result, f"{stem}.png"))
        needle = all(t.startswith("needle") for t in result["tasks"])
        tables["needle" if needle else "faithfulness"] = needle_table(result) if needle else faithfulness_table(result)
    elif "neurons" in result:            # attnlrp-fast evaluate --task neurons / neurons-needle
        from attnlrp_fast.evaluation import neuron_ablation

        needle = all(t.startswith("neurons-needle") for t in result["neurons"])
        tables["neurons-needle" if needle else "neurons"] = neuron_ablation.table(result["neurons"])
    elif result.get("kind") == "estimates":      # bench/estimate_table.py
        tables["estimates"] = estimates_table(result)
    elif result.get("kind") == "context-parallel":   # bench/context_table.py
        tables["context-parallel"] = context_parallel_table(result)
    elif result.get("kind") == "cpu-explain":    # bench/cpu_explain.py
        tables[cpu_explain_kind(result)] = cpu_explain_table(result)
    elif "linear_fits" in result:        # bench/memory.py
        written.append(plot_cpu_memory(result, f"{stem}.png"))
        tables["cpu-memory"] = cpu_memory_table(result)
    else:                                # bench/gpu_check.py
        written += [p for p in (plot_attention(result, f"{stem}-attention.png"), plot_e2e(result, f"{stem}-e2e.png"))
                    if p]
        if result.get("timings") or result.get("memory") or result.get("profile"):
            tables["attention"] = attention_table(result)
        if result.get("e2e"):
            tables["e2e"] = e2e_table(result)
    if readme:
        text = Path(readme).read_text()
        for kind, body in tables.items():
            text = replace_between(text, kind, body)
        Path(readme).write_text(text)
        written.append(readme)
    return [str(p) for p in written], tables


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", help="a results JSON from bench/gpu_check.py, bench/memory.py, bench/cpu_explain.py, "
                                "bench/estimate_table.py or attnlrp-fast evaluate (--task neurons too)")
    p.add_argument("--readme", help="replace the tables between this file's markers")
    p.add_argument("--summary", action="store_true", help="print the targets and how the run went; write nothing")
    args = p.parse_args(argv)
    if args.summary:
        print("\n".join(summary_lines(json.loads(Path(args.json).read_text()))))
        return
    written, tables = render(args.json, args.readme)
    for body in tables.values():
        print(body + "\n")
    if written:
        print("wrote " + ", ".join(written))


if __name__ == "__main__":
    main()
