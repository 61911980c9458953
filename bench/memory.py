"""Peak memory of one explanation against the input length: does it grow linearly, and how long can an input be?

Each (mode, N) runs in a fresh subprocess: build a random Llama-shaped model, warm up on 64 tokens, reset the
peak, explain N random tokens (target: the argmax logit at the last position, AttnLRP), read the peak again.
The difference is what the explanation needed on top of the model. On CPU the peak is the process's peak
resident memory (ru_maxrss); on CUDA it is torch's peak allocated memory. Recorded in MiB (2^20 bytes: ru_maxrss is
in KiB on Linux, / 1024; CUDA bytes / 2^20) as "peak_extra_mib", the line's slope in KiB per token; files written
before 2026-12-02 call the same figures "peak_extra_mb", "mb_at_zero" and "kb_per_token" (bench/report.py reads
both).

Modes:
  low_memory  af.explain(..., checkpoint=True): every layer checkpointed, MLP in 1024-token chunks (the CLI's
              default)
  plain       af.explain(...): all activations kept for the backward
  eager       plain autograd gradient x input with HF's eager attention (N x N attention weights, as the
              reference implementation's attention rules need them), as a contrast

    python bench/memory.py                          # CPU, small model, 2k..32k (plain, eager to 8k):
                                                    # bench/results/<date>-cpu-memory.json
    python bench/memory.py --quick                  # CPU, 1k/2k/4k, prints only
    python bench/memory.py --device cuda --longest  # GPU, Llama-1B shape in bf16: double N from 8k until a mode runs
                                                    # out of memory (or --max-tokens / --child-timeout);
                                                    # bench/results/<date>-<gpu>-memory.json
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000),
    "quick": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=1, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=1000),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}
MODES = ("low_memory", "plain", "eager")


def _child(mode, n, shape, device):
    """Runs in the subprocess; prints one JSON line."""
    import resource
    import time

    import torch
    import transformers as tf

    import attnlrp_fast as af

    cuda = device == "cuda"
    torch.manual_seed(0)
    config = tf.LlamaConfig(**SHAPES[shape], max_position_embeddings=max(n, 128),
                            attn_implementation="eager" if mode == "eager" else "sdpa")
    with torch.device(device):
        model = tf.LlamaForCausalLM(config).to(torch.bfloat16 if cuda else torch.float32).eval()
    ids = torch.randint(0, config.vocab_size, (1, n), device=device)

    def run(x):
        if mode == "eager":
            for p in model.parameters():
                p.requires_grad_(False)
            emb = model.get_input_embeddings()(x).detach().requires_grad_()
            logits = model(inputs_embeds=emb, use_cache=False, logits_to_keep=1).logits[0, -1]
            logits.max().backward()
            return (emb * emb.grad).float().sum(-1)
        return af.explain(model, input_ids=x, backend=None if cuda else "torch",
                          checkpoint=(mode == "low_memory")).relevance

    def peak():
        if cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    run(ids[:, :64])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = peak()
    t = time.perf_counter()
    try:
        rel = run(ids)
    except torch.OutOfMemoryError:
        print(json.dumps({"mode": mode, "tokens": n, "error": "out of memory"}))
        return
    after = peak()
    seconds = time.perf_counter() - t
    assert torch.isfinite(rel).all()
    print(json.dumps({"mode": mode, "tokens": n, "peak_extra_mib": after - before, "seconds": seconds}))


def measure(mode, n, shape, device, timeout):
    env = dict(os.environ, TRITON_INTERPRET="0")
    if device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "2")
        # large blocks straight from mmap and back to the system when freed, so that the peak RSS follows the
        # peak of live memory rather than what glibc's heap keeps cached
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
        env.setdefault("MALLOC_ARENA_MAX", "2")
    try:
        out = subprocess.run([sys.executable, __file__, "--child", mode, str(n), shape, device], capture_output=True,
                             text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "tokens": n, "error": f"took longer than {timeout} s"}
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or [f"exit status {out.returncode}"]
        return {"mode": mode, "tokens": n, "error": tail[0]}
    return json.loads(lines[-1])


def _peak_mib(row):
    """The row's peak in MiB, under its name before 2026-12-02 ("peak_extra_mb", MiB as well) or now."""
    return row["peak_extra_mib"] if "peak_extra_mib" in row else row["peak_extra_mb"]


def linear_fit(rows):
    """Least-squares MiB = a + b * tokens; returns (a, b, worst relative deviation of a point from the line)."""
    xs = [r["tokens"] for r in rows]
    ys = [_peak_mib(r) for r in rows]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    a = my - b * mx
    worst = max(abs(y - (a + b * x)) / max(y, 1e-9) for x, y in zip(xs, ys))
    return a, b, worst


def _device_name(device):
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), help="model shape (default: small on CPU, llama-1b on CUDA)")
    p.add_argument("--quick", action="store_true", help="CPU, 1k/2k/4k on a wider one-layer model, prints only")
    p.add_argument("--sizes", type=int, nargs="*")
    p.add_argument("--modes", nargs="*", choices=MODES, default=list(MODES))
    p.add_argument("--contrast-max", type=int, default=8192,
                   help="largest N for the plain and eager modes (without --longest); low_memory runs every size")
    p.add_argument("--longest", action="store_true", help="per mode, double N until it fails (out of memory or "
                                                          "--child-timeout) or passes --max-tokens")
    p.add_argument("--start", type=int, default=8192, help="first N of --longest")
    p.add_argument("--max-tokens", type=int, default=1 << 20)
    p.add_argument("--child-timeout", type=int, default=None,
                   help="seconds one (mode, N) may take (default: 300 on CUDA, 3600 on CPU)")
    p.add_argument("--resume", action="store_true", help="keep the rows that ran in an existing --out file and "
                                                         "measure only the others")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/<date>-<device>-memory.json; "
                                              "--quick prints only)")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        mode, n, shape, device = args.child
        return _child(mode, int(n), shape, device)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    shape = args.shape or ("quick" if args.quick else "llama-1b" if args.device == "cuda" else "small")
    if args.child_timeout is None:
        args.child_timeout = 300 if args.device == "cuda" else 3600
    device_name = _device_name(args.device)
    tag = "cpu" if args.device == "cpu" else device_name.replace(" ", "-").lower()
    out = args.out or (None if args.quick else
                       Path(__file__).parent / "results" / f"{datetime.date.today().isoformat()}-{tag}-memory.json")
    done = {}
    if args.resume and out and Path(out).exists():
        old = json.loads(Path(out).read_text())
        if old["model"].get("shape", shape) != shape:
            p.error(f"--resume: {out} was measured on the {old['model'].get('shape')} shape, not {shape}")
        done = {(r["mode"], r["tokens"]): {**{k: v for k, v in r.items() if k != "peak_extra_mb"},
                                           "peak_extra_mib": _peak_mib(r)} for r in old["rows"] if "error" not in r}
    rows, longest = [], {}
    for mode in args.modes:
        if args.longest:
            n = args.start
            while n <= args.max_tokens:
                row = done.get((mode, n)) or measure(mode, n, shape, args.device, args.child_timeout)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if "error" in row:
                    break
                longest[mode] = n
                n *= 2
            continue
        sizes = args.sizes or ([1024, 2048, 4096] if args.quick else [2048, 4096, 8192, 16384, 32768])
        for n in sizes:
            if mode != "low_memory" and n > args.contrast_max:
                continue
            row = done.get((mode, n)) or measure(mode, n, shape, args.device, args.child_timeout)
            rows.append(row)
            print(json.dumps(row), flush=True)
    fits = {}
    for mode in args.modes:
        ok = [r for r in rows if r["mode"] == mode and "error" not in r]
        if len(ok) >= 2:
            a, b, worst = linear_fit(ok)
            fits[mode] = {"mib_at_zero": a, "kib_per_token": b * 1024, "worst_deviation_from_line": worst}
            print(f"{mode}: {b * 1024:.1f} KiB per token (+{a:.0f} MiB); worst point off the line by {worst:.0%}")
    for mode, n in longest.items():
        print(f"{mode}: longest input that ran: {n} tokens")

    import transformers

    import attnlrp_fast

    result = {
        "device": device_name, "date": datetime.date.today().isoformat(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "attnlrp_fast": attnlrp_fast.__version__,
        "model": {**SHAPES[shape], "family": "llama", "shape": shape,
                  "dtype": "bfloat16" if args.device == "cuda" else "float32"},
        "measure": ("torch.cuda.max_memory_allocated during the explanation minus memory allocated before it"
                    if args.device == "cuda" else
                    "peak RSS of a fresh process during the explanation minus the peak before it"),
        "rows": rows, "linear_fits": fits,
    }
    if args.longest:
        result["longest_tokens"] = longest
        result["longest_search"] = {"start": args.start, "max_tokens": args.max_tokens,
                                    "child_timeout_s": args.child_timeout}
    if args.device == "cuda":
        import triton

        result["triton"] = triton.__version__
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
