"""Warm Triton's on-disk compile cache for bench/gpu_check.py: run every attention kernel variant the later steps
(spot, timings, decode, dispatch, profile, memory, e2e, sweep) use once, so that those steps load compiled kernels
instead of compiling them. gpu_check's tests step runs this next to the GPU tests; what the gate ruled out (the
dispatch table ATTNLRP_FAST_DISPATCH names, under "gated_out") is never run.

A run has the specialisation of the timed one when everything Triton's JIT specialises on agrees: constexprs
(head dim, causal and mask flags, rule, dQ mode, block sizes), dtypes, integer arguments equal to 1 or divisible
by 16, and pointers aligned to 16 bytes. So each variant runs with the same H, Hkv, D, causal flag, key padding,
rule, dQ mode, forward kernel, layout and dtype, at B = 1 and a small N that is a multiple of 16 like every timed N.
The decode step's kernels run once at the decode step's own shapes (its split sizes are part of the
specialisation); the end-to-end model's kernels (attention, RMSNorm, GLU) are warmed by one explanation of a
one-layer model of the same shape.

    python bench/warm_cache.py [--jobs 6] [--n 512]     # prints one JSON line per run
    TRITON_INTERPRET=1 python bench/warm_cache.py --smoke --jobs 2   # CPU, the smoke sizes (checks the script)
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

if __package__:   # imported as bench.<module> (the tests)
    from . import e2e, gpu_check, table
else:             # run as a script (python bench/<module>.py): its folder is sys.path[0]
    import e2e
    import gpu_check
    import table


def warm_shape(shape, n):
    """The shape a warm-up runs for a timed `shape`: B = 1, N = min(N, n) when N % 16 == 0 (else N itself)."""
    _, H, Hkv, N, D, causal = shape
    return (1, H, Hkv, min(N, n) if N % 16 == 0 else N, D, causal)


def int_classes(shape):
    """How Triton's JIT classes the integer arguments the attention launchers pass for contiguous (B, H, N, D)
    inputs (strides of q and k, H, Hkv, H / Hkv, N, M, M - N): "1" (made a constant), "16" (divisible by 16)
    or "" (neither)."""
    _, H, Hkv, N, D, _ = shape
    ints = (H * N * D, N * D, D, 1, Hkv * N * D, N * D, D, 1, H, Hkv, H // Hkv, N, N, 0)
    return tuple("1" if x == 1 else "16" if x % 16 == 0 else "" for x in ints)


def warm_attention(method, shape, check):
    q, k, v = gpu_check.make_inputs(shape, check.device, check.dtype)
    kpm = gpu_check.padding_mask(shape[0], shape[3], check.device) if method.padding else None
    fwd, fwd_bwd, _ = gpu_check.runners(method, q, k, v, shape[5], kpm)
    with gpu_check.environment(gpu_check.call_env(method, q, k, v, kpm)):
        fwd()
        if not method.fwd_only:
            fwd_bwd()
    if check.cuda:
        torch.cuda.synchronize()


def warm_decode(check):
    """Each of our decode step's calls once at its own shapes (no timing)."""
    calls = {n: c for n, c in gpu_check.decode_methods(check).items() if n.startswith("attnlrp_fast")}
    for shape in gpu_check.decode_shapes(check.smoke):
        for name, (fn, env) in calls.items():
            row = gpu_check.decode_row(name, fn, env, shape, check, timed=False)
            if "error" in row:
                raise RuntimeError(f"{name} at {shape}: {row['error']}")


def warm_e2e(check, n):
    """One explanation of a one-layer model of e2e.py's shape: its attention (on the Triton kernels, as the e2e step's
    forced-Triton row runs it, where a Triton forward passed the gate), RMSNorm and GLU kernels."""
    shape = "tiny" if check.smoke else "llama3-8b"
    device = torch.device(check.device)
    model = e2e.build(shape, device, check.dtype, max_positions=n, layers=1)
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0)).to(device)
    e2e.run_once("attnlrp_fast", model, None, ids, "triton" if check.triton_ok else None)


def work(items, check, n):
    """Run each item, one JSON line per item; an error is recorded and the next item runs."""
    for name, method, shape in items:
        line = {"item": name, "shape": None if shape is None else warm_shape(shape, n)}
        t = time.perf_counter()
        try:
            if name == "e2e":
                warm_e2e(check, n)
            elif name == "decode":
                warm_decode(check)
            else:
                warm_attention(method, warm_shape(shape, n), check)
        except Exception as e:  # noqa: BLE001 - the step that needs the kernel will say what fails
            line["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        line["seconds"] = round(time.perf_counter() - t, 2)
        print(json.dumps(line), flush=True)


def spawn(jobs, args):
    """`jobs` worker processes, each taking every jobs-th item; returns how many exited with an error."""
    base = [sys.executable, __file__, "--jobs", str(jobs), "--n", str(args.n)] + (["--smoke"] if args.smoke else [])
    procs = [subprocess.Popen(base + ["--worker", str(i)]) for i in range(jobs)]
    return sum(p.wait() != 0 for p in procs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=6, help="worker processes (compiles run in parallel)")
    p.add_argument("--n", type=int, default=512, help="N of each run, a multiple of 16")
    p.add_argument("--smoke", action="store_true", help="the smoke sizes on CPU")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.n <= 0 or args.n % 16:
        p.error(f"--n must be a positive multiple of 16, got {args.n}")
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        p.error("no CUDA device: run with --smoke on CPU")
    path = os.environ.get(table.ENV)        # the gate's verdicts, as the run's dispatch table states them
    verdicts, forward = table.verdicts_of(table.load(path)) if path else (None, None)
    check = gpu_check.Check(smoke=args.smoke, cuda=cuda, out=Path("."), e2e_args="", verdicts=verdicts,
                            forward=forward, dq_tables=table.dq_tables(path) if path else {})
    items, keys = gpu_check.warm_items(check)
    if args.worker is not None:
        work(items[args.worker::args.jobs], check, args.n)
        return 0
    jobs = min(args.jobs, len(items))
    print(json.dumps({"planned": len(items), "kernels": len(keys), "jobs": jobs, "n": args.n}), flush=True)
    t = time.perf_counter()
    failed = 0
    if jobs > 1:
        failed = spawn(jobs, args)
    else:
        work(items, check, args.n)
    print(json.dumps({"finished_s": round(time.perf_counter() - t, 1), "failed_workers": failed}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
