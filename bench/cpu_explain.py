"""One AttnLRP explanation on CPU, side by side: attnlrp-fast against the LXT-style approach (the reference
implementation's way: torch SDPA with the gradients rescaled, norms and GLU patched in Python;
attnlrp_fast/baselines/lxt_style.py) and against the same LXT-style rules on eager attention (the N x N matrix),
on the same random Llama and inputs, the same machine and run. Time (median of --repeats after one warm-up) and peak memory above the model (peak RSS
of a fresh process per measurement, large blocks straight from mmap so that the peak follows live memory), in MiB
(2^20 bytes: ru_maxrss is in KiB on Linux) as "peak_extra_mib" (files before 2026-12-02: "peak_extra_mb", also MiB).

    python bench/cpu_explain.py                      # N = 1k, 4k, 16k: bench/results/<date>-cpu-explain.json
    python bench/cpu_explain.py --sizes 256 --repeats 1 --out /tmp/x.json    # quick
    python bench/cpu_explain.py --model smollm2      # real weights, N = 1k, 8k: <date>-cpu-explain-smollm2.json
    python bench/report.py bench/results/<date>-cpu-explain.json --readme README.md

The model: a random 4-layer Llama, hidden 256, 8 query / 2 key-value heads, FFN 1024, fp32, 2 threads; or with
--model smollm2 SmolLM2-135M-Instruct (30 layers, hidden 576, 9 / 3 heads, FFN 1536; attnlrp_fast/smollm2.py), where
both methods checkpoint every layer (as `attnlrp-fast explain` does: without it 30 layers' activations at 8k tokens
fill the machine), the document the sample report's tokens. The target: the argmax logit at the last position.
attnlrp-fast runs af.explain on its CPU path (torch's fused attention) inside af.lrp applied once, as the LXT-style
model is patched once. Both give the same relevance (checked where N <= 1024, and at every N on SmolLM2).
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
SMOLLM2_SIZES = (1024, 8192)
SMOLLM2_EAGER_MAX = 1024   # 30 layers x 9 heads x N x N floats: past this it is not run


def _build(n, attn):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(**SHAPE, max_position_embeddings=max(n, 128), attn_implementation=attn)
    model = tf.LlamaForCausalLM(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _smollm2():
    from attnlrp_fast import smollm2

    model, _ = smollm2.load(attn_implementation="sdpa")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _explainer(method, n, model_name="tiny"):
    """A function ids -> relevance (1, N) float32, the model patched once outside it."""
    import attnlrp_fast as af

    real = model_name == "smollm2"
    build = _smollm2 if real else (lambda: _build(n, "sdpa"))
    if method == "attnlrp_fast":
        model = build()
        af.lrp(model, "attnlrp")
        return lambda ids: af.explain(model, input_ids=ids, checkpoint=real).relevance
    from attnlrp_fast.baselines import lxt_style

    model = lxt_style.patch(build())
    if method == "lxt_style_eager":
        model.set_attn_implementation(lxt_style.EAGER_NAME)
    return lambda ids: lxt_style.explain(model, ids, checkpoint=real)


def _inputs(n, model_name):
    """(1, n) token ids: random for the random model, the sample report's tokens (repeated) for SmolLM2."""
    import torch

    if model_name != "smollm2":
        return torch.randint(0, SHAPE["vocab_size"], (1, n), generator=torch.Generator().manual_seed(n))
    from transformers import AutoTokenizer

    from attnlrp_fast import smollm2
    from attnlrp_fast.app.demo import sample_document_path

    tokenizer = AutoTokenizer.from_pretrained(smollm2.folder())
    ids = tokenizer(sample_document_path().read_text(encoding="utf-8"), return_tensors="pt").input_ids
    return ids.repeat(1, -(-n // ids.shape[1]))[:, :n]


def child(method, n, repeats, model_name="tiny"):
    """Runs in a fresh process: one JSON line with seconds (median), peak MiB above the model, and the relevance
    (for the agreement check: N <= 1024, or any N on SmolLM2)."""
    import resource
    import time

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    explain = _explainer(method, n, model_name)
    ids = _inputs(n, model_name)
    explain(ids[:, :64])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times, rel = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        rel = explain(ids)
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    assert torch.isfinite(rel).all()
    estimate = _estimate(method, n, model_name) if model_name == "smollm2" else {}
    print(json.dumps({"method": method, "tokens": n, "seconds": statistics.median(times), "runs": times,
                      "peak_extra_mib": peak, **estimate,
                      "relevance": rel[0].tolist() if n <= 1024 or model_name == "smollm2" else None}))


def _estimate(method, n, model_name):
    """{"estimated_peak_mib": af.estimate_memory's peak on top of the weights for this method's mode (low_memory for
    ours, lxt_style for the LXT-style approach) in float32}, {} for the eager rules."""
    import torch

    import attnlrp_fast as af
    from attnlrp_fast import smollm2

    mode = {"attnlrp_fast": "low_memory", "lxt_style": "lxt_style"}.get(method)
    if mode is None:
        return {}
    e = af.estimate_memory(smollm2.config(), n, dtype=torch.float32, mode=mode)
    return {"estimated_peak_mib": e.peak / 2**20, "estimated_mode": mode}


def measure(method, n, repeats, timeout, model_name="tiny"):
    env = dict(os.environ, TRITON_INTERPRET="0", MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="2")
    env.setdefault("OMP_NUM_THREADS", "2")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, str(n), str(repeats), model_name]
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


def run(sizes, repeats, timeout, on_row=print, model_name="tiny"):
    rows = []
    eager_max = SMOLLM2_EAGER_MAX if model_name == "smollm2" else EAGER_MAX
    for n in sizes:
        for method in METHODS:
            if method == "lxt_style_eager" and n > eager_max:
                row = {"method": method, "tokens": n, "error": f"not run past {eager_max} tokens (N x N attention)"}
            else:
                row = measure(method, n, repeats, timeout, model_name)
            rows.append(row)
            on_row({k: v for k, v in row.items() if k != "relevance"})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="default: 1024 4096 16384; with --model smollm2 1024 8192")
    p.add_argument("--repeats", type=int, default=None, help="default 3; with --model smollm2 1")
    p.add_argument("--model", choices=("tiny", "smollm2"), default="tiny",
                   help="tiny: the random 4-layer Llama; smollm2: SmolLM2-135M-Instruct's real weights")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement")
    p.add_argument("--out", default=None, help=f"default: bench/results/<date>-cpu-explain.json")
    p.add_argument("--child", nargs=4, metavar=("METHOD", "N", "REPEATS", "MODEL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child[0], int(args.child[1]), int(args.child[2]), args.child[3])
    real = args.model == "smollm2"
    args.sizes = args.sizes or list(SMOLLM2_SIZES if real else (1024, 4096, 16384))
    args.repeats = args.repeats or (1 if real else 3)
    if any(n < 64 for n in args.sizes) or args.repeats < 1:
        p.error("--sizes must be at least 64 tokens and --repeats at least 1")
    if real and max(args.sizes) > 8192:
        p.error("--model smollm2: its context is 8192 tokens")
    rows = run(args.sizes, args.repeats, args.timeout, model_name=args.model)
    import torch
    import transformers

    result = {"kind": "cpu-explain", "device": f"cpu ({platform.processor() or platform.machine()})",
              "threads": int(os.environ.get("OMP_NUM_THREADS", "2")),
              "model": "SmolLM2-135M-Instruct" if real else SHAPE, "checkpoint": real, "repeats": args.repeats,
              "date": datetime.date.today().isoformat(),
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__},
              "agreement": agreement(rows),
              "rows": [{k: v for k, v in r.items() if k != "relevance"} for r in rows]}
    suffix = "-smollm2" if real else ""
    out = Path(args.out or ROOT / "bench" / "results" / f"{result['date']}-cpu-explain{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
