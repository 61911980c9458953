"""Everything the GPU benchmark needs, on one device: the GPU correctness suite (`pytest -m gpu`, bf16 included),
a float64 spot check of bf16, the attention kernels against torch SDPA (each backend it offers), the LXT-style
approach (SDPA with dq, dk scaled by 1/4 and dv by 1/2 through autograd) and eager attention (N x N, until it
runs out of memory), and the end-to-end explanation of a Llama-3-8B-shaped model (bench/e2e.py).

    python bench/gpu_check.py                           # on a CUDA machine: all parts
    python bench/gpu_check.py --parts tests,spot,kernels    # some of them (one device call each, under 10 min)
    python bench/gpu_check.py --parts e2e --out $OUT    # results merge into the same <date>-<device>.json
    python bench/gpu_check.py --smoke                   # CPU, tiny sizes, torch path: checks the harness itself
    python bench/report.py bench/results/<file>.json --readme README.md   # plots + README table from the JSON

Attention sweep: bf16, head dims 64 and 128, causal and not, N = 1k..32k at B*N = 16k tokens and
H = 2048 / D, plus GQA 32/8 (D = 128, causal) at N = 32k and 128k. FLOPs: forward 4 * B * H * N * M * D
(halved when causal), a backward 2.5x the forward's. Times are medians (triton.testing.do_bench); the backward
time is forward+backward minus forward. Peak memory is torch.cuda.max_memory_allocated over one
forward+backward, less what was allocated before it (inputs excluded).
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from lxt_style import ScaleGrad as _ScaleGrad  # noqa: E402


def sdpa(q, k, v, causal, backend=None, lrp=False):
    if lrp:
        q, k, v = _ScaleGrad.apply(q, 0.25), _ScaleGrad.apply(k, 0.25), _ScaleGrad.apply(v, 0.5)
    gqa = q.shape[1] != k.shape[1]
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)


def eager(q, k, v, causal, lrp=False):
    """Materialised N x M attention (what HF's eager path does), with LXT-style rules when lrp."""
    if lrp:
        q, k, v = _ScaleGrad.apply(q, 0.25), _ScaleGrad.apply(k, 0.25), _ScaleGrad.apply(v, 0.5)
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        n, m = s.shape[-2:]
        s = s.masked_fill(torch.ones(n, m, dtype=torch.bool, device=s.device).tril(m - n).logical_not(), float("-inf"))
    return torch.softmax(s.float(), -1).to(q.dtype) @ v


def methods(smoke):
    """name -> (forward fn, rule of the backward it implements, environment variables it runs under).

    Ours run in both dQ modes of the backward (kernels/attention_bwd.py): "separate" (the default, deterministic)
    and "atomic" (FlashAttention-2's fp32 atomics), so one run says which is faster on this device."""
    import attnlrp_fast as af

    backend = "torch" if smoke else None
    out = {}
    for mode, tag in (("separate", ""), ("atomic", ",dq=atomic")):
        env = {"ATTNLRP_FAST_DQ": mode}
        out[f"attnlrp_fast[grad{tag}]"] = (lambda q, k, v, c: af.attention(q, k, v, causal=c, backend=backend),
                                           "grad", env)
        out[f"attnlrp_fast[attnlrp{tag}]"] = (
            lambda q, k, v, c: af.attention(q, k, v, causal=c, rule="attnlrp", backend=backend), "attnlrp", env)
    out.update({
        "sdpa[default]": (lambda q, k, v, c: sdpa(q, k, v, c), "grad", {}),
        "lxt_style[sdpa]": (lambda q, k, v, c: sdpa(q, k, v, c, lrp=True), "attnlrp", {}),
        "eager": (lambda q, k, v, c: eager(q, k, v, c), "grad", {}),
        "lxt_style[eager]": (lambda q, k, v, c: eager(q, k, v, c, lrp=True), "attnlrp", {}),
    })
    if not smoke:
        from torch.nn.attention import SDPBackend

        for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            be = getattr(SDPBackend, name, None)
            if be is not None:
                out[f"sdpa[{name.lower()}]"] = (lambda q, k, v, c, be=be: sdpa(q, k, v, c, be), "grad", {})
                out[f"lxt_style[sdpa_{name.lower()}]"] = (lambda q, k, v, c, be=be: sdpa(q, k, v, c, be, lrp=True),
                                                          "attnlrp", {})
    return out


@contextlib.contextmanager
def environment(env):
    """Set env (a dict) for the duration of the block, then put back what was there."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def bench_ms(fn, cuda, grad_to_none=None):
    if cuda:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
        for x in grad_to_none or ():
            x.grad = None
    return sorted(times)[1]


def measure(fn, q, k, v, causal, cuda):
    """Forward ms (no grad), forward+backward ms, peak MiB of forward+backward."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    do = torch.randn_like(q)

    def fwd():
        with torch.no_grad():
            fn(q, k, v, causal)

    def fwd_bwd():
        fn(*leaves, causal).backward(do)

    row = {"fwd_ms": bench_ms(fwd, cuda), "fwd_bwd_ms": bench_ms(fwd_bwd, cuda, grad_to_none=leaves)}
    if cuda:
        torch.cuda.synchronize()
        for x in leaves:
            x.grad = None
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        torch.cuda.synchronize()
        row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return row


def flops_fwd(B, H, N, M, D, causal):
    f = 4.0 * B * H * N * M * D
    return f / 2 if causal else f


def sweep_shapes(smoke, quick=False):
    """(B, H, Hkv, N, D, causal) of the attention sweep."""
    if smoke:
        return [(2, 2, 2, 128, 32, True), (1, 4, 2, 256, 64, False)]
    ns = (1024, 4096, 16384) if quick else (1024, 2048, 4096, 8192, 16384, 32768)
    shapes = [(max(1, 16384 // n), 2048 // d, 2048 // d, n, d, c) for d in (64, 128) for c in (False, True) for n in ns]
    return shapes + [(1, 32, 8, n, 128, True) for n in ((32768,) if quick else (32768, 131072))]


def run_timings(args, cuda, device, on_row=None):
    """The attention sweep; on_row(rows) after each measurement (the caller saves partial results)."""
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = []
    oom = set()   # an eager method that ran out of memory is not tried again at a larger N of the same kind
    for B, H, Hkv, N, D, causal in sweep_shapes(args.smoke, args.quick):
        g = torch.Generator().manual_seed(N + D)
        q = torch.randn(B, H, N, D, generator=g).to(device, dtype)
        k = torch.randn(B, Hkv, N, D, generator=g).to(device, dtype)
        v = torch.randn(B, Hkv, N, D, generator=g).to(device, dtype)
        fl = flops_fwd(B, H, N, N, D, causal)
        for name, (fn, rule, env) in methods(args.smoke).items():
            if name.startswith(("eager", "lxt_style[eager")) and (name, D, causal, H == Hkv) in oom:
                continue
            row = {"method": name, "rule": rule, "B": B, "H": H, "Hkv": Hkv, "N": N, "D": D, "causal": causal,
                   "dtype": str(dtype).split(".")[-1]}
            try:
                with environment(env):
                    row.update(measure(fn, q, k, v, causal, cuda))
                row["fwd_tflops"] = fl / row["fwd_ms"] / 1e9
                bwd_ms = row["fwd_bwd_ms"] - row["fwd_ms"]
                row["bwd_ms"] = bwd_ms
                row["bwd_tflops"] = 2.5 * fl / bwd_ms / 1e9 if bwd_ms > 0 else None
            except torch.cuda.OutOfMemoryError:
                row["error"] = "out of memory"
                oom.add((name, D, causal, H == Hkv))
            except RuntimeError as e:  # e.g. an SDPA backend that does not take these inputs
                row["error"] = str(e).splitlines()[0][:200]
            if cuda:
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
            if on_row:
                on_row(rows)
        del q, k, v
    return rows


def spot_check(cuda, device):
    """bf16 (fp32 on CPU) output and attnlrp gradients against float64 at one long-ish shape."""
    import attnlrp_fast as af
    from attnlrp_fast.reference import attention_dense

    dtype = torch.bfloat16 if cuda else torch.float32
    B, H, Hkv, N, D = (1, 8, 2, 2000, 128) if cuda else (1, 2, 1, 100, 32)
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(B, h, N, D, generator=g).to(device, dtype) for h in (H, Hkv, Hkv, H))
    out = {}
    for rule in ("grad", "attnlrp", "cp"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        o = af.attention(*leaves, causal=True, rule=rule, backend=None if cuda else "torch")
        o.backward(do)
        ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
        ref = attention_dense(*ref_leaves, causal=True, rule=rule)
        ref.backward(do.double())
        errs = {"o": o.double(), "dq": leaves[0].grad.double(), "dk": leaves[1].grad.double(),
                "dv": leaves[2].grad.double()}
        refs = {"o": ref, "dq": ref_leaves[0].grad, "dk": ref_leaves[1].grad, "dv": ref_leaves[2].grad}
        out[rule] = {n: (None if refs[n] is None or refs[n].norm() == 0 else
                         ((errs[n] - refs[n]).norm() / refs[n].norm()).item()) for n in errs}
    return out


def run_gpu_tests(timeout=480):
    env = dict(os.environ, TRITON_INTERPRET="0")
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        tail = text.strip().splitlines()[-15:] + [f"(stopped after {timeout} s)"]
        print("\n".join(tail), flush=True)
        return {"returncode": None, "timed_out": True, "tail": tail}
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    print("\n".join(tail), flush=True)
    return {"returncode": proc.returncode, "tail": tail}


def versions():
    import triton

    out = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        out["transformers"] = None
    return out


PARTS = ("tests", "spot", "kernels", "e2e")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, torch path: checks the harness")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--quick", action="store_true", help="a third of the attention sweep (N = 1k, 4k, 16k, GQA at 32k)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the JSON")
    p.add_argument("--autotune", choices=("0", "1"), default="1", help="ATTNLRP_FAST_AUTOTUNE for the timings")
    p.add_argument("--e2e-args", default="--longest", help="arguments for bench/e2e.py (part e2e)")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        p.error("no CUDA device: run with --smoke to check the harness on CPU")
    device = "cuda" if cuda else "cpu"
    os.environ["ATTNLRP_FAST_AUTOTUNE"] = args.autotune
    name = torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    path = out / f"{datetime.date.today().isoformat()}-{slug}{'-smoke' if args.smoke else ''}.json"
    # parts run in separate device calls add to the same file
    result = json.loads(path.read_text()) if path.exists() else {}
    result.update({"device": name, "versions": versions(), "smoke": args.smoke, "dtype": "bfloat16" if cuda else
                   "float32"})
    result.setdefault("dates", {})

    result.setdefault("unfinished", [])

    def save():
        path.write_text(json.dumps(result, indent=1))

    def start(part):
        # a part cut off (the device call's time limit) keeps what it measured and stays marked unfinished
        if part not in result["unfinished"]:
            result["unfinished"].append(part)
        save()

    def done(part):
        result["dates"][part] = datetime.datetime.now().isoformat(timespec="seconds")
        result["unfinished"].remove(part)
        save()

    if "tests" in parts and cuda:
        start("tests")
        result["gpu_tests"] = run_gpu_tests()
        done("tests")
    if "spot" in parts:
        start("spot")
        result["spot_check_rel_err"] = spot_check(cuda, device)
        print(json.dumps(result["spot_check_rel_err"]), flush=True)
        done("spot")
    if "kernels" in parts:
        start("kernels")
        result["autotune"] = args.autotune == "1"
        result["timings"] = []

        def on_row(rows):
            result["timings"] = rows
            save()
        run_timings(args, cuda, device, on_row)
        done("kernels")
    if "e2e" in parts:
        import shlex

        import e2e

        start("e2e")

        def on_update(e):
            result["e2e"] = e
            save()
        e2e.main(shlex.split(args.e2e_args) + (["--smoke"] if args.smoke else []), on_update=on_update)
        done("e2e")
    if not result["unfinished"]:
        del result["unfinished"]
        save()
    print(f"wrote {path}")
    return 0 if result.get("gpu_tests", {}).get("returncode", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
