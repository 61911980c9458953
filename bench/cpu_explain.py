"""One AttnLRP explanation on CPU, side by side: attnlrp-fast against the LXT-style approach (the reference
implementation's way: torch SDPA with the gradients rescaled, norms and GLU patched in Python;
attnlrp_fast/baselines/lxt_style.py) and against the same LXT-style rules on eager attention (the N x N matrix),
on the same random Llama and inputs, the same machine and run. Time (median of --repeats after one warm-up) and peak memory above the model (peak RSS
of a fresh process per measurement, large blocks straight from mmap so that the peak follows live memory), in MiB
(2^20 bytes: ru_maxrss is in KiB on Linux) as "peak_extra_mib" (files before 2026-12-02: "peak_extra_mb", also MiB).

    python bench/cpu_explain.py                      # N = 1k, 4k, 16k: bench/results/<date>-cpu-explain.json
    python bench/cpu_explain.py --sizes 256 --repeats 1 --out /tmp/x.json    # quick
    python bench/report.py bench/results/<date>-cpu-explain.json --readme README.md

The model: 4-layer Llama, hidden 256, 8 query / 2 key-value heads, FFN 1024, fp32, 2 threads (the issue's). The
target: the argmax logit at the last position. attnlrp-fast runs af.explain on its CPU path (torch's fused attention)
inside af.lrp applied once, as the LXT-style model is patched once. Both give the same relevance (checked).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=32000)
METHODS = ("attnlrp_fast", "lxt_style", "lxt_style_eager")
EAGER_MAX = 8192   # eager attention holds H x N x N floats per layer: past this it is not run


def _build(n, attn):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(**SHAPE, max_position_embeddings=max(n, 128), attn_implementation=attn)
    model = tf.LlamaForCausalLM(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _explainer(method, n):
    """A function ids -> relevance (1, N) float32, the model patched once outside it."""
    import attnlrp_fast as af

    if method == "attnlrp_fast":
        model = _build(n, "sdpa")
        af.lrp(model, "attnlrp")
        return lambda ids: af.explain(model, input_ids=ids).relevance
    from attnlrp_fast.baselines import lxt_style

    model = lxt_style.patch(_build(n, "sdpa"))
    if method == "lxt_style_eager":
        model.set_attn_implementation(lxt_style.EAGER_NAME)
    return lambda ids: lxt_style.explain(model, ids, checkpoint=False)


def child(method, n, repeats):
    """Runs in a fresh process: one JSON line with seconds (median), peak MiB above the model, and the relevance
    of the first 8 tokens' sum (for the agreement check)."""
    import resource
    import time

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    explain = _explainer(method, n)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, n), generator=torch.Generator().manual_seed(n))
    explain(ids[:, :64])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times, rel = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        rel = explain(ids)
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    assert torch.isfinite(rel).all()
    print(json.dumps({"method": method, "tokens": n, "seconds": statistics.median(times), "runs": times,
                      "peak_extra_mib": peak, "relevance": rel[0].tolist() if n <= 1024 else None}))


def measure(method, n, repeats, timeout):
    env = dict(os.environ, TRITON_INTERPRET="0", MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="2")
    env.setdefault("OMP_NUM_THREADS", "2")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, str(n), str(repeats)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"method": method, "tokens": n, "error": f"took longer than {timeout} s"}
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or [f"exit status {out.returncode}"]
        return {"method": method, "tokens": n, "error": tail[0][:300]}
    return json.loads(lines[-1])


def agreement(rows):
    """Relative difference of each method's relevance from attnlrp_fast's, where both were kept (N <= 1024)."""
    import torch

    by = {(r["method"], r["tokens"]): r.get("relevance") for r in rows}
    out = {}
    for (method, n), rel in by.items():
        ours = by.get(("attnlrp_fast", n))
        if method != "attnlrp_fast" and rel is not None and ours is not None:
            a, b = torch.tensor(rel, dtype=torch.float64), torch.tensor(ours, dtype=torch.float64)
            out[f"{method}@{n}"] = ((a - b).norm() / b.norm()).item()
    return out


def run(sizes, repeats, timeout, on_row=print):
    rows = []
    for n in sizes:
        for method in METHODS:
            if method == "lxt_style_eager" and n > EAGER_MAX:
                row = {"method": method, "tokens": n, "error": f"not run past {EAGER_MAX} tokens (N x N attention)"}
            else:
                row = measure(method, n, repeats, timeout)
            rows.append(row)
            on_row({k: v for k, v in row.items() if k != "relevance"})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement")
    p.add_argument("--out", default=None, help=f"default: bench/results/<date>-cpu-explain.json")
    p.add_argument("--child", nargs=3, metavar=("METHOD", "N", "REPEATS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child[0], int(args.child[1]), int(args.child[2]))
    if any(n < 64 for n in args.sizes) or args.repeats < 1:
        p.error("--sizes must be at least 64 tokens and --repeats at least 1")
    rows = run(args.sizes, args.repeats, args.timeout)
    import torch
    import transformers

    result = {"kind": "cpu-explain", "device": f"cpu ({platform.processor() or platform.machine()})",
              "threads": int(os.environ.get("OMP_NUM_THREADS", "2")), "model": SHAPE, "repeats": args.repeats,
              "date": datetime.date.today().isoformat(),
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__},
              "agreement": agreement(rows),
              "rows": [{k: v for k, v in r.items() if k != "relevance"} for r in rows]}
    out = Path(args.out or ROOT / "bench" / "results" / f"{result['date']}-cpu-explain.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
