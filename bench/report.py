"""Plots and README tables from recorded benchmark JSON (no GPU needed).

    python bench/report.py bench/results/<date>-<device>.json [--readme README.md]   # gpu_check.py's JSON
    python bench/report.py bench/results/<date>-cpu-memory.json --readme README.md   # memory.py's JSON
    python bench/report.py bench/results/faithfulness.json --readme README.md        # attnlrp-fast evaluate's

Writes PNGs next to the JSON (<stem>-attention.png, <stem>-memory.png, <stem>-e2e.png, or <stem>.png for a
memory.py file) and, with --readme, replaces the text between the file's markers
`<!-- table:KIND -->` and `<!-- /table:KIND -->` (KIND: attention, e2e, cpu-memory, faithfulness) with tables generated
from the JSON. Every figure in them comes from the JSON; a missing or failed measurement shows as "-" or its
error.
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


def attention_summary(timings):
    """One dict per shape: our figures, the best baselines and the ratios the targets are about."""
    out = []
    for (D, causal, gqa, N, B, H, Hkv), rows in attention_groups(timings).items():
        ours = {r["method"]: r for r in rows if r["method"].startswith("attnlrp_fast") and _ok(r)}
        grad, lrp = ours.get("attnlrp_fast[grad]"), ours.get("attnlrp_fast[attnlrp]")
        lrp_atomic = ours.get("attnlrp_fast[attnlrp,dq=atomic]")   # the backward's other dQ mode
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
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def attention_table(result):
    lines = [
        f"Attention, {result.get('dtype', '?')} on {result['device']} (torch {result['versions'].get('torch')}, "
        f"Triton {result['versions'].get('triton')}); TFLOP/s, higher is better; ratios are ours / the best "
        "baseline in the same run.",
        "",
        "| D | causal | B x H/Hkv x N | fwd | best SDPA fwd | ratio | grad bwd | SDPA bwd | attnlrp bwd | "
        "LXT-style bwd | ratio | attnlrp bwd, atomic dQ | ratio | peak MiB | SDPA peak | eager fwd/bwd |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in attention_summary(result.get("timings", [])):
        lines.append(
            f"| {s['D']} | {'yes' if s['causal'] else 'no'} | {s['B']} x {s['H']}/{s['Hkv']} x {_tokens(s['N'])} | "
            f"{_f(s['fwd_tflops'])} | {_f(s['best_sdpa_fwd_tflops'])} | {_f(s['fwd_vs_sdpa'], '{:.2f}x')} | "
            f"{_f(s['grad_bwd_tflops'])} | {_f(s['best_sdpa_bwd_tflops'])} | {_f(s['attnlrp_bwd_tflops'])} | "
            f"{_f(s['best_lxt_bwd_tflops'])} | {_f(s['attnlrp_bwd_vs_lxt'], '{:.2f}x')} | "
            f"{_f(s['atomic_bwd_tflops'])} | {_f(s['atomic_bwd_vs_lxt'], '{:.2f}x')} | {_f(s['peak_mib'])} | "
            f"{_f(s['sdpa_peak_mib'])} | {s['eager'] or '-'} |")
    lines += ["", "Targets:"] + targets_lines(result)
    if result.get("unfinished"):
        lines += ["", f"Unfinished parts (cut off by the time limit): {', '.join(result['unfinished'])}."]
    tests = result.get("gpu_tests")
    if tests:
        last = next((t for t in reversed(tests.get("tail", [])) if t.strip()), "")
        lines += ["", f"GPU test suite in the same run: {last.strip('= ') or 'no output'}"]
    return "\n".join(lines)


def targets(timings):
    """Issue 5's three targets from the summary rows: (name, worst measured ratio or None, goal, comparison)."""
    summary = attention_summary(timings)

    def worst(key, rows):
        vals = [s[key] for s in rows if s[key] is not None]
        return min(vals) if vals else None

    def most(key, rows):
        vals = [s[key] for s in rows if s[key] is not None]
        return max(vals) if vals else None
    fwd_rows = [s for s in summary if s["D"] == 128 and s["causal"] and s["N"] >= 4096]
    long_rows = [s for s in summary if s["N"] >= 131072]
    return [
        ("forward / best SDPA backend, d = 128, causal, N >= 4k (worst shape)", worst("fwd_vs_sdpa", fwd_rows),
         1.0, ">="),
        ("attnlrp backward / LXT-style backward (worst shape)", worst("attnlrp_bwd_vs_lxt", summary), 1.0, ">="),
        ("the same with ATTNLRP_FAST_DQ=atomic (not the default)", worst("atomic_bwd_vs_lxt", summary), 1.0, ">="),
        ("peak memory of forward + backward / SDPA's, N = 128k", most("peak_vs_sdpa", long_rows), 1.1, "<="),
    ]


def targets_lines(result):
    lines = []
    for name, value, goal, op in targets(result.get("timings", [])):
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
        f"{sh['intermediate_size']}, {e['dtype']}, random weights) on {result['device']}:",
        "",
        "| tokens | method | seconds | explanation / forward | peak GiB |",
        "|---|---|---|---|---|",
    ]
    for r in e["rows"]:
        if r.get("search"):
            continue
        secs = r.get("error") or _f(r.get("seconds"), "{:.2f}")
        peak = _f(r["peak_mib"] / 1024 if r.get("peak_mib") is not None else None, "{:.1f}")
        lines.append(f"| {_tokens(r['tokens'])} | {r['method']} | {secs} | "
                     f"{_f(r.get('explain_over_forward'), '{:.1f}x')} | {peak} |")
    if e.get("longest"):
        lines += ["", "Longest input that ran (doubling N): " + ", ".join(
            f"{m} {_tokens(n) if n else 'none'}" for m, n in e["longest"].items()) + "."]
    if e.get("agreement"):
        a = e["agreement"]
        lines += ["", f"The two relevance maps agree at {_tokens(a['tokens'])} tokens: cosine {a['cosine']:.4f}, "
                      f"relative error {a['rel_err']:.2g}."]
    return "\n".join(lines)


def faithfulness_table(result):
    from attnlrp_fast import faithfulness

    lines = [f"Measured {result.get('date', '?')} on {result.get('device', '?')} (torch "
             f"{result.get('versions', {}).get('torch', '?')}); {result['settings']['steps']} perturbation steps, "
             f"removed tokens' embeddings {'zeroed' if result['settings']['perturb'] == 'zero' else 'replaced'}; "
             "ABPC in the target's unit, averaged over samples.", ""]
    for task, out in result["tasks"].items():
        extra = f", the model answers {out['model_accuracy']:.1%} correctly" if "model_accuracy" in out else ""
        lines.append(f"- {task}: {out['model']}, {out['samples']} samples{extra}; target: {out['target']}")
    return "\n".join(lines + ["", faithfulness.table(result)])


def cpu_memory_table(result):
    fits = result.get("linear_fits", {})
    modes = [m for m in ("low_memory", "plain", "eager") if any(r["mode"] == m for r in result["rows"])]
    sizes = sorted({r["tokens"] for r in result["rows"]})
    cell = {(r["mode"], r["tokens"]): r for r in result["rows"]}
    head = "| mode | " + " | ".join(_tokens(n) for n in sizes) + " | fit: MB + KB/token | worst point off the line |"
    lines = [head, "|" + "---|" * (len(sizes) + 3)]
    for m in modes:
        vals = []
        for n in sizes:
            r = cell.get((m, n))
            vals.append("-" if r is None else r.get("error", None) or f"{r['peak_extra_mb']:.0f} MB")
        f = fits.get(m)
        # a straight line that misses a point by more than 10 % is no description of the growth
        linear = f is not None and f["worst_deviation_from_line"] <= 0.1
        fit = f"{f['mb_at_zero']:.0f} + {f['kb_per_token']:.1f}" if linear else "not linear" if f else "-"
        worst = f"{f['worst_deviation_from_line']:.1%}" if f else "-"
        lines.append(f"| {m} | " + " | ".join(vals) + f" | {fit} | {worst} |")
    return "\n".join(lines)


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
        pts = sorted((r["tokens"], r["peak_extra_mb"]) for r in result["rows"] if r["mode"] == mode and _ok(r))
        ax.plot(*zip(*pts), marker="o", label=mode)
    ax.set_xlabel("tokens")
    ax.set_ylabel("peak memory of the explanation, MB")
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
        from attnlrp_fast import faithfulness

        written.append(faithfulness.plot_curves(result, f"{stem}.png"))
        tables["faithfulness"] = faithfulness_table(result)
    elif "linear_fits" in result:        # bench/memory.py
        written.append(plot_cpu_memory(result, f"{stem}.png"))
        tables["cpu-memory"] = cpu_memory_table(result)
    else:                                # bench/gpu_check.py
        written += [p for p in (plot_attention(result, f"{stem}-attention.png"), plot_e2e(result, f"{stem}-e2e.png"))
                    if p]
        if result.get("timings"):
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
    p.add_argument("json", help="a results JSON from bench/gpu_check.py or bench/memory.py")
    p.add_argument("--readme", help="replace the tables between this file's markers")
    args = p.parse_args(argv)
    written, tables = render(args.json, args.readme)
    for body in tables.values():
        print(body + "\n")
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    main()
