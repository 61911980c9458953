"""The whole GPU check of one device, in time-capped steps (bench/device_run.sh runs it in one device call):

  tests    the GPU tests' bf16 subset (`pytest -m gpu -k bfloat16`) against float64, over parallel pytest-xdist
           workers, while bench/warm_cache.py compiles every Triton kernel the later steps run
  spot     a float64 spot check of bf16 output and gradients at N = 2000 (GQA 8/2, D = 128, causal)
  timings  the most important shapes first: D=128 causal 16k, 4k, non-causal 16k, D=64 causal 16k, D=128 causal 1k;
           ours (forward; forward+backward for grad and attnlrp in each dQ mode; the portable forward), SDPA
           (cuDNN, flash, default) and the LXT-style approach over each
  profile  one torch.profiler pass over one forward+backward of ours (attnlrp, each dQ mode): time per kernel
  memory   peak memory above the inputs at 128k (GQA 32/8, D = 128, causal): ours against SDPA cuDNN and flash
  e2e      bench/e2e.py: a Llama-3-8B-shaped explanation at 8k and 32k against the LXT-style baseline
  sweep    the rest of the sweep grid (sweep_shapes), every baseline (eager included), until the time is up

    python bench/gpu_check.py --out $OUT                  # all steps (on a CUDA machine)
    python bench/gpu_check.py --steps spot,memory         # some of them; results merge into the same JSON
    python bench/gpu_check.py --plan                      # each step's kernel compiles and budget; runs nothing
    TRITON_INTERPRET=1 python bench/gpu_check.py --smoke  # CPU, tiny sizes, Triton's interpreter
    python bench/report.py $OUT/<date>-<device>.json --readme README.md   # plots + README tables from the JSON

Results: `<out>/<date>-<device>.json` (rewritten after every measurement; steps not completed are listed under
"unfinished"), `<out>/<date>-<device>.jsonl` (one JSON line per event and measurement), `<out>/pytest-bf16.log`,
`<out>/warm.log`. FLOPs: forward 4 * B * H * N * M * D (halved when causal), a backward 2.5x the forward's. Times
are medians (triton.testing.do_bench); the backward time is forward+backward minus forward. Peak memory is
torch.cuda.max_memory_allocated over one forward+backward, less what was allocated before it (inputs excluded).
"""

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from attnlrp_fast.evaluation.lxt_style import ScaleGrad as _ScaleGrad

ROOT = Path(__file__).resolve().parent.parent
if __package__:   # imported as bench.<module> (the tests)
    from . import e2e, runner
else:             # run as a script (python bench/<module>.py): its folder is sys.path[0]
    import e2e
    import runner

RULES = ("grad", "attnlrp", "cp")
PROFILE_METHODS = ("attnlrp_fast[attnlrp]", "attnlrp_fast[attnlrp,dq=atomic]")
MEMORY_METHODS = ("attnlrp_fast[attnlrp]", "attnlrp_fast[attnlrp,dq=atomic]", "sdpa[cudnn_attention]",
                  "sdpa[flash_attention]", "sdpa[default]")
E2E_ARGS = {False: "--sizes 8192 32768 --repeats 1 --hops 3", True: "--repeats 1 --hops 2"}      # by smoke
TEST_SELECTION = ["-m", "gpu", "-k", "bfloat16"]     # the bf16 cases carry "bfloat16" in their ids


# --- what is measured ---------------------------------------------------------------------------------------
@dataclass
class Method:
    fn: Callable                      # (q, k, v, causal) -> o
    rule: str                         # the rule its backward implements
    env: dict = field(default_factory=dict)    # environment variables it runs under
    fwd_only: bool = False            # time the forward only
    core: bool = True                 # in the timing step's set (False: only in the sweep)
    ours: Optional[tuple] = None      # (rule, dq mode, forward kernel) for attnlrp_fast, None for baselines


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


def _ours(q, k, v, causal, rule, backend):
    import attnlrp_fast as af

    return af.attention(q, k, v, causal=causal, rule=rule, backend=backend)


def ours(rule, dq="separate", fwd="auto", backend=None, fwd_only=False):
    """attnlrp_fast's attention under `rule`, the backward's dQ mode (ATTNLRP_FAST_DQ: separate | atomic) and the
    forward kernel (ATTNLRP_FAST_FWD: auto = the warp-specialised Hopper kernel where available | tma | portable)."""
    return Method(partial(_ours, rule=rule, backend=backend), rule, {"ATTNLRP_FAST_DQ": dq, "ATTNLRP_FAST_FWD": fwd},
                  fwd_only=fwd_only, ours=(rule, dq, fwd))


def methods(smoke, backend=None):
    """name -> Method. Ours in both dQ modes of the backward (kernels/attention_bwd.py: "separate", deterministic,
    and "atomic", FlashAttention-2's fp32 atomics) and with the portable and the TMA forward kernels (forward
    only); SDPA with
    each backend it offers and its default; the LXT-style approach over each; eager attention (sweep only)."""
    out = {}
    for dq, tag in (("separate", ""), ("atomic", ",dq=atomic")):
        for rule in ("grad", "attnlrp"):
            out[f"attnlrp_fast[{rule}{tag}]"] = ours(rule, dq, backend=backend)
    out["attnlrp_fast[grad,fwd=portable]"] = ours("grad", fwd="portable", backend=backend, fwd_only=True)
    if not smoke:   # the descriptor forward without warp specialisation (bf16/fp16 only: the smoke runs fp32)
        out["attnlrp_fast[grad,fwd=tma]"] = ours("grad", fwd="tma", backend=backend, fwd_only=True)
    out["sdpa[default]"] = Method(lambda q, k, v, c: sdpa(q, k, v, c), "grad")
    out["lxt_style[sdpa]"] = Method(lambda q, k, v, c: sdpa(q, k, v, c, lrp=True), "attnlrp")
    if not smoke:
        from torch.nn.attention import SDPBackend

        for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
            be = getattr(SDPBackend, name, None)
            if be is not None:
                core = name != "EFFICIENT_ATTENTION"
                out[f"sdpa[{name.lower()}]"] = Method(lambda q, k, v, c, be=be: sdpa(q, k, v, c, be), "grad", core=core)
                out[f"lxt_style[sdpa_{name.lower()}]"] = Method(
                    lambda q, k, v, c, be=be: sdpa(q, k, v, c, be, lrp=True), "attnlrp", core=core)
    out["eager"] = Method(lambda q, k, v, c: eager(q, k, v, c), "grad", core=False)
    out["lxt_style[eager]"] = Method(lambda q, k, v, c: eager(q, k, v, c, lrp=True), "attnlrp", core=False)
    return out


def mha(n, d, causal):
    """The sweep's shape for (N, D): B * N = 16k tokens (at least B = 1), H = 2048 / D."""
    return (max(1, 16384 // n), 2048 // d, 2048 // d, n, d, causal)


def timing_shapes(smoke):
    """(B, H, Hkv, N, D, causal) of the timing step, most important first."""
    if smoke:
        return [(1, 2, 2, 64, 16, True), (2, 2, 2, 32, 16, False)]
    return [mha(16384, 128, True), mha(4096, 128, True), mha(16384, 128, False), mha(16384, 64, True),
            mha(1024, 128, True)]


def memory_shape(smoke):
    return (1, 4, 2, 128, 16, True) if smoke else (1, 32, 8, 131072, 128, True)


def spot_shape(smoke):
    return (1, 2, 1, 100, 32, True) if smoke else (1, 8, 2, 2000, 128, True)


def sweep_shapes(smoke, quick=False):
    """(B, H, Hkv, N, D, causal) of the attention sweep."""
    if smoke:
        return [(1, 2, 2, 64, 16, True), (1, 4, 2, 64, 16, False)]
    ns = (1024, 4096, 16384) if quick else (1024, 2048, 4096, 8192, 16384, 32768)
    shapes = [mha(n, d, c) for d in (64, 128) for c in (False, True) for n in ns]
    return shapes + [(1, 32, 8, n, 128, True) for n in ((32768,) if quick else (32768, 131072))]


def sweep_rest(smoke, measured, quick=False):
    """The sweep's shapes not in `measured`: D = 128 before 64, causal first, small N first, N > 32k last."""
    rest = [s for s in sweep_shapes(smoke, quick) if tuple(s) not in measured]
    return sorted(rest, key=lambda s: (s[3] > 32768, s[4] != 128, not s[5], s[3]))


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


# --- measuring ----------------------------------------------------------------------------------------------
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


def runners(method, q, k, v, causal):
    """(forward without grad, forward+backward on fresh leaves, those leaves) of `method` at these inputs."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    do = torch.randn_like(q)

    def fwd():
        with torch.no_grad():
            method.fn(q, k, v, causal)

    def fwd_bwd():
        method.fn(*leaves, causal).backward(do)
    return fwd, fwd_bwd, leaves


def peak_mib(fn, leaves, cuda):
    """Peak MiB allocated while fn runs, above what was allocated before (None on CPU)."""
    if not cuda:
        fn()
        return None
    torch.cuda.synchronize()
    for x in leaves:
        x.grad = None
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure(method, q, k, v, causal, cuda):
    """Forward ms (no grad); unless fwd_only, forward+backward ms and peak MiB of forward+backward."""
    fwd, fwd_bwd, leaves = runners(method, q, k, v, causal)
    with environment(method.env):
        row = {"fwd_ms": bench_ms(fwd, cuda)}
        if not method.fwd_only:
            row["fwd_bwd_ms"] = bench_ms(fwd_bwd, cuda, grad_to_none=leaves)
            if cuda:
                row["peak_mib"] = peak_mib(fwd_bwd, leaves, cuda)
    return row


def flops_fwd(B, H, N, M, D, causal):
    f = 4.0 * B * H * N * M * D
    return f / 2 if causal else f


def _error(e):
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
        return "out of memory"
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def timing_row(name, method, shape, inputs, cuda):
    """One measured row: ms, TFLOP/s and peak MiB, or the error (out of memory, inputs a backend refuses)."""
    B, H, Hkv, N, D, causal = shape
    row = {"method": name, "rule": method.rule, "B": B, "H": H, "Hkv": Hkv, "N": N, "D": D, "causal": causal,
           "dtype": str(inputs[0].dtype).split(".")[-1]}
    try:
        row.update(measure(method, *inputs, causal, cuda))
    except RuntimeError as e:           # torch.cuda.OutOfMemoryError included
        row["error"] = _error(e)
        return row
    finally:
        if cuda:
            torch.cuda.empty_cache()
    fl = flops_fwd(B, H, N, N, D, causal)
    row["fwd_tflops"] = fl / row["fwd_ms"] / 1e9
    if "fwd_bwd_ms" in row:
        row["bwd_ms"] = row["fwd_bwd_ms"] - row["fwd_ms"]
        row["bwd_tflops"] = 2.5 * fl / row["bwd_ms"] / 1e9 if row["bwd_ms"] > 0 else None
    return row


def make_inputs(shape, device, dtype):
    B, H, Hkv, N, D, _ = shape
    g = torch.Generator().manual_seed(N + D)
    return [torch.randn(B, h, N, D, generator=g).to(device, dtype) for h in (H, Hkv, Hkv)]


def spot_check(cuda, device, shape=None):
    """bf16 (fp32 on CPU) output and gradients of each rule against float64: relative errors (selfcheck)."""
    from attnlrp_fast.selfcheck import attention_errors

    B, H, Hkv, N, D, causal = shape or spot_shape(not cuda)
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(B, h, N, D, generator=g).to(device, dtype) for h in (H, Hkv, Hkv, H))
    return {rule: attention_errors(q, k, v, do, causal=causal, rule=rule) for rule in RULES}


def kernel_times(prof, cuda, top=20):
    """{name: {"ms", "count"}} of a profiled pass, longest first: GPU kernels on CUDA, the ops' own CPU time on CPU."""
    totals = {}
    if cuda:
        from torch.autograd import DeviceType

        events = [(e.name, e.time_range.elapsed_us(), 1) for e in prof.events() if e.device_type == DeviceType.CUDA]
    else:
        events = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages()]
    for name, us, count in events:
        ms, n = totals.get(name[:160], (0.0, 0))
        totals[name[:160]] = (ms + us / 1e3, n + count)
    ranked = sorted(((k, v) for k, v in totals.items() if v[0] > 0), key=lambda kv: -kv[1][0])[:top]
    return {k: {"ms": round(ms, 4), "count": n} for k, (ms, n) in ranked}


def profile_method(method, shape, device, dtype, cuda):
    """Per-kernel times of one forward+backward of `method` (after one unprofiled pass that compiles)."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v = make_inputs(shape, device, dtype)
    _, fwd_bwd, _ = runners(method, q, k, v, shape[5])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with environment(method.env):
        fwd_bwd()
        sync()
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            fwd_bwd()
            sync()
    kernels = kernel_times(prof, cuda)
    return {"total_ms": round(sum(k["ms"] for k in kernels.values()), 4), "kernels": kernels}


def memory_row(name, method, shape, device, dtype, cuda):
    """Peak MiB above the inputs of one forward+backward, with that run's seconds (or the error)."""
    row = {"method": name, "rule": method.rule}
    try:
        q, k, v = make_inputs(shape, device, dtype)
        _, fwd_bwd, leaves = runners(method, q, k, v, shape[5])
        t = time.perf_counter()
        with environment(method.env):
            row["peak_mib"] = peak_mib(fwd_bwd, leaves, cuda)
        row["seconds_one_run"] = time.perf_counter() - t
    except RuntimeError as e:
        row["error"] = _error(e)
    finally:
        q = k = v = leaves = fwd_bwd = None
        if cuda:
            torch.cuda.empty_cache()
    return row


# --- the kernels each step compiles (an estimate for --plan and the warm-up) ---------------------------------
def kernel_keys(method, shape, dtype):
    """The Triton kernel specialisations one forward+backward of `method` at `shape` compiles, from the launchers
    in kernels/attention_fwd.py and attention_bwd.py: a forward kernel; then the delta kernel, the dK/dV kernel
    and, unless dQ is atomic or the rule is cp, the dQ kernel. H, Hkv and H / Hkv (== 1 or not) enter Triton's
    specialisation; B does not, and N only through N % 16 (every timed N is a multiple of 16).
    SDPA, LXT-style and eager compile none."""
    if method.ours is None:
        return set()
    rule, dq, fwd = method.ours
    _, H, Hkv, _, D, causal = shape
    dtype = str(dtype).split(".")[-1]
    keys = {("attention_fwd", fwd, D, causal, H, Hkv, dtype)}
    if method.fwd_only:
        return keys
    atomic = dq == "atomic" and rule != "cp"
    keys |= {("attention_bwd_delta", D, H, dtype), ("attention_bwd_dkdv", rule, atomic, D, causal, H, Hkv, dtype)}
    if not atomic and rule != "cp":
        keys.add(("attention_bwd_dq", rule, D, causal, H, Hkv, dtype))
    return keys


def e2e_shape(smoke):
    """(B, H, Hkv, N, D, causal) of the attention inside bench/e2e.py's model (N: any multiple of 16)."""
    sh = e2e.SHAPES["tiny" if smoke else "llama3-8b"]
    return (1, sh["num_attention_heads"], sh["num_key_value_heads"], 1024,
            sh["hidden_size"] // sh["num_attention_heads"], True)


def e2e_keys(smoke, dtype):
    """Kernels of one af.explain of e2e.py's model: attention (attnlrp) plus RMSNorm and GLU, forward and backward."""
    dt = str(dtype).split(".")[-1]
    return kernel_keys(ours("attnlrp"), e2e_shape(smoke), dtype) | {("norm_fwd", dt), ("norm_bwd", dt),
                                                                      ("glu_fwd", dt), ("glu_bwd", dt)}


# --- the steps ----------------------------------------------------------------------------------------------
@dataclass
class Check:
    """What every step needs: sizes (smoke or device), where it runs, the methods, where results go."""
    smoke: bool
    cuda: bool
    out: Path
    e2e_args: str
    test_workers: int = 8
    warm_jobs: int = 6
    warm_n: int = 512
    quick: bool = False
    methods: dict = field(default_factory=dict)
    oom: set = field(default_factory=set)       # (eager method, D, causal, MHA) that ran out of memory

    def __post_init__(self):
        self.methods = self.methods or methods(self.smoke)

    @property
    def device(self):
        return "cuda" if self.cuda else "cpu"

    @property
    def dtype(self):
        return torch.float32 if self.smoke else torch.bfloat16


EAGER = ("eager", "lxt_style[eager]")
OUTCOME = re.compile(r"(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b|"
                     r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (tests/\S+::\S+)")


def shape_dict(shape):
    return dict(zip(("B", "H", "Hkv", "N", "D", "causal"), shape))


def shape_of(row):
    return tuple(row[k] for k in ("B", "H", "Hkv", "N", "D", "causal"))


def core_names(ms):
    return [n for n, m in ms.items() if m.core]


def test_outcomes(text):
    """{"counts": {outcome: n}, "failed": [ids]} from `pytest -v` output (with or without xdist), and the summary."""
    last = {}
    for m in OUTCOME.finditer(text):
        node, outcome = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
        last[node] = outcome
    counts = {o: sum(1 for v in last.values() if v == o) for o in sorted(set(last.values()))}
    lines = [ln.strip("= ") for ln in text.splitlines() if re.match(r"^=+ .* in [\d.]+s", ln)]
    return {"counts": counts, "failed": sorted(n for n, o in last.items() if o in ("FAILED", "ERROR"))[:50],
            "summary": lines[-1] if lines else None}


def run_gpu_tests(run, check):
    """The GPU tests' bf16 subset over pytest-xdist workers (one process without xdist), capped by the step."""
    workers = check.test_workers if importlib.util.find_spec("xdist") else 1
    cmd = [sys.executable, "-m", "pytest", "-v", "--tb=short", "-p", "no:cacheprovider", *TEST_SELECTION, "tests/"]
    cmd += ["-n", str(workers)] if workers > 1 else []
    env = dict(os.environ, TRITON_INTERPRET="0") if check.cuda else None
    log = check.out / "pytest-bf16.log"
    with open(log, "w") as f:
        status = runner.Capped(cmd, run.step_left(), f, env=env).wait()
    text = log.read_text()
    out = {"selection": " ".join(TEST_SELECTION), "workers": workers, **status, **test_outcomes(text),
           "tail": text.strip().splitlines()[-15:]}
    run.result["gpu_tests"] = out
    run.log("tests", "pytest", **{k: v for k, v in out.items() if k != "tail"})
    run.save()
    print("\n".join(out["tail"]), flush=True)
    return out


def warm_summary(path):
    """Counts from bench/warm_cache.py's JSON lines: items planned, warmed, and the errors."""
    lines = [json.loads(ln) for ln in path.read_text().splitlines() if ln.startswith("{")]
    done = [ln for ln in lines if "item" in ln]
    return {"planned": next((ln["planned"] for ln in lines if "planned" in ln), None),
            "warmed": sum("error" not in ln for ln in done),
            "errors": [f"{ln['item']}: {ln['error']}" for ln in done if "error" in ln][:20]}


def step_tests(run, check):
    """bf16 GPU tests while bench/warm_cache.py compiles the later steps' kernels; both end by the step's end."""
    cmd = [sys.executable, str(ROOT / "bench" / "warm_cache.py"), "--jobs", str(check.warm_jobs),
           "--n", str(check.warm_n)] + (["--smoke"] if check.smoke else [])
    log = check.out / "warm.log"
    with open(log, "w") as f:
        warm = runner.Capped(cmd, run.step_left(), f)
    try:
        tests = run_gpu_tests(run, check)
        status = warm.wait()
    finally:
        warm.kill()
    run.result["warm"] = {**status, **warm_summary(log)}
    run.log("tests", "warm", **run.result["warm"])
    run.save()
    return not (tests["timed_out"] or status["timed_out"])


def step_spot(run, check):
    errs = spot_check(check.cuda, check.device, spot_shape(check.smoke))
    run.result["spot_check_rel_err"] = errs
    run.log("spot", "row", **errs)
    print(json.dumps(errs), flush=True)


def time_shapes(run, check, step, shapes, names):
    """Time `names` at each shape in order until the step's time is up (False if it stopped early)."""
    for shape in shapes:
        if run.step_left() <= 0:
            return False
        inputs = make_inputs(shape, check.device, check.dtype)
        for name in names:
            if run.step_left() <= 0:
                return False
            eager_key = (name, shape[4], shape[5], shape[1] == shape[2])
            if name in EAGER and eager_key in check.oom:   # not tried again at a larger N of the same kind
                continue
            row = timing_row(name, check.methods[name], shape, inputs, check.cuda)
            if name in EAGER and row.get("error") == "out of memory":
                check.oom.add(eager_key)
            run.row(step, "timings", row)
        del inputs
    return True


def _drop_rows(run, step):
    """A step run again replaces its own rows."""
    run.result["timings"] = [r for r in run.result.get("timings", []) if r.get("step") != step]


def step_timings(run, check):
    _drop_rows(run, "timings")
    return time_shapes(run, check, "timings", timing_shapes(check.smoke), core_names(check.methods))


def step_sweep(run, check):
    _drop_rows(run, "sweep")
    measured = {shape_of(r) for r in run.result["timings"]}
    return time_shapes(run, check, "sweep", sweep_rest(check.smoke, measured, check.quick), list(check.methods))


def step_profile(run, check):
    shape = timing_shapes(check.smoke)[0]
    prof = {"shape": shape_dict(shape), "activity": "cuda" if check.cuda else "cpu", "methods": {}}
    run.result["profile"] = prof
    for name in PROFILE_METHODS:
        if run.step_left() <= 0:
            return False
        prof["methods"][name] = profile_method(check.methods[name], shape, check.device, check.dtype, check.cuda)
        run.log("profile", "row", method=name, **prof["methods"][name])
        print(json.dumps({"profile": name, "total_ms": prof["methods"][name]["total_ms"]}), flush=True)
        run.save()
    return True


def step_memory(run, check):
    shape = memory_shape(check.smoke)
    mem = run.result["memory"] = {"shape": shape_dict(shape), "dtype": str(check.dtype).split(".")[-1], "rows": []}
    for name in MEMORY_METHODS:
        if name not in check.methods:
            continue
        if run.step_left() <= 0:
            return False
        row = memory_row(name, check.methods[name], shape, check.device, check.dtype, check.cuda)
        mem["rows"].append(row)
        run.log("memory", "row", **row)
        print(json.dumps(row), flush=True)
        run.save()
    return True


def _json_line(line):
    with contextlib.suppress(ValueError):
        value = json.loads(line)
        return value if isinstance(value, dict) else None
    return None


def step_e2e(run, check):
    """bench/e2e.py in a child process killed at the step's end; its rows are logged as they come."""
    state = Path(tempfile.mkdtemp()) / "e2e.json"
    cmd = [sys.executable, str(ROOT / "bench" / "e2e.py"), *shlex.split(check.e2e_args), "--out", str(state)]
    child = runner.Capped(cmd + (["--smoke"] if check.smoke else []), run.step_left(), subprocess.PIPE)
    try:
        for line in child.proc.stdout:
            print(line, end="", flush=True)
            row = _json_line(line)
            if row is not None:
                run.log("e2e", "row", **row)
                with contextlib.suppress(OSError, ValueError):
                    run.result["e2e"] = json.loads(state.read_text())
                run.save()
    except BaseException:
        child.kill()
        raise
    status = child.wait()
    if state.exists():
        run.result["e2e"] = {**json.loads(state.read_text()), "process": status}
    if status["timed_out"]:
        return False
    if status["returncode"] != 0:
        raise RuntimeError(f"bench/e2e.py exited with status {status['returncode']} (its output is above)")
    return True


# budget in seconds (None: whatever time is left), the step, what it does
STEPS = {
    "tests": (90, step_tests, "the GPU tests' bf16 subset on pytest-xdist workers; meanwhile the warm-up"),
    "spot": (15, step_spot, "float64 spot check of bf16 output and gradients, each rule"),
    "timings": (150, step_timings, "5 shapes, most important first; ours, SDPA, LXT-style"),
    "profile": (15, step_profile, "one profiled forward+backward of ours (attnlrp), each dQ mode"),
    "memory": (30, step_memory, "peak memory above inputs at 128k, GQA 32/8: ours vs SDPA"),
    "e2e": (120, step_e2e, "Llama-3-8B-shaped explanation at 8k and 32k vs the LXT-style baseline"),
    "sweep": (None, step_sweep, "the rest of the sweep grid, every baseline, while time remains"),
}
ALIASES = {"kernels": ("timings", "profile", "memory", "sweep")}
WARMED_STEPS = ("spot", "timings", "profile", "memory", "e2e", "sweep")     # what bench/warm_cache.py compiles


# --- the plan: kernel compiles per step -----------------------------------------------------------------------
def step_calls(step, check, measured=None):
    """(method name, Method, shape) of each measurement `step` makes (the sweep: skipping `measured` shapes,
    by default the timing step's). The tests and e2e steps have none here."""
    ms, smoke = check.methods, check.smoke
    if step == "spot":
        return [(f"attnlrp_fast[{r}]", ours(r), spot_shape(smoke)) for r in RULES]
    if step == "timings":
        return [(n, ms[n], s) for s in timing_shapes(smoke) for n in core_names(ms)]
    if step == "profile":
        return [(n, ms[n], timing_shapes(smoke)[0]) for n in PROFILE_METHODS]
    if step == "memory":
        return [(n, ms[n], memory_shape(smoke)) for n in MEMORY_METHODS if n in ms]
    if step == "sweep":
        measured = set(timing_shapes(smoke)) if measured is None else measured
        return [(n, m, s) for s in sweep_rest(smoke, measured, check.quick) for n, m in ms.items()]
    return []


def step_kernels(step, check):
    if step == "e2e":
        return e2e_keys(check.smoke, check.dtype)
    return set().union(*(kernel_keys(m, s, check.dtype) for _, m, s in step_calls(step, check)))


def warm_items(check):
    """What bench/warm_cache.py runs, in step order: each call that brings a kernel no earlier call compiled
    ((name, Method, shape), or ("e2e", None, None) for the end-to-end model). Returns (items, kernel keys)."""
    covered, items = set(), []
    for step in WARMED_STEPS:
        for name, method, shape in ([("e2e", None, None)] if step == "e2e" else step_calls(step, check)):
            keys = e2e_keys(check.smoke, check.dtype) if name == "e2e" else kernel_keys(method, shape, check.dtype)
            if keys - covered:
                items.append((name, method, shape))
                covered |= keys
    return items, covered


def plan(check, budgets):
    """One row per step: its budget, the kernels it runs and how many of them it compiles itself (the warm-up
    in the tests step compiles the rest's: 0 after a complete warm-up). An estimate: see kernel_keys."""
    items, warmed = warm_items(check)
    rows, seen = [], set()
    for step, (_, _, what) in STEPS.items():
        keys = warmed if step == "tests" else step_kernels(step, check)
        rows.append({"step": step, "budget_s": budgets[step], "kernels": len(keys),
                     "compiled_here": len(keys if step == "tests" else keys - warmed - seen), "what": what})
        seen |= keys
    rows[0]["warm_runs"] = len(items)
    return rows


def count_tests():
    """How many tests the tests step selects (pytest --collect-only: nothing runs), or None."""
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *TEST_SELECTION, "tests/"]
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180).stdout
    except subprocess.TimeoutExpired:
        return None
    return sum("::" in ln for ln in out.splitlines()) or None


def print_plan(check, budgets, limit_s):
    rows = plan(check, budgets)
    fixed = sum(r["budget_s"] for r in rows if r["budget_s"] is not None)
    print(f"Plan ({'smoke' if check.smoke else 'device'} sizes, {str(check.dtype).split('.')[-1]}): the steps run in "
          f"order, each capped by its budget, all within --limit-s {limit_s:.0f} s. Kernel compiles are estimates.")
    print(f"{'step':<8} {'budget':>7} {'kernels':>8} {'compiled here':>14}  what")
    for r in rows:
        budget = f"{r['budget_s']:.0f} s" if r["budget_s"] is not None else "rest"
        print(f"{r['step']:<8} {budget:>7} {r['kernels']:>8} {r['compiled_here']:>14}  {r['what']}")
    tests = count_tests()
    print(f"tests: {tests if tests is not None else '?'} bf16 test cases (`pytest {' '.join(TEST_SELECTION)} tests/`) "
          f"on {check.test_workers} pytest-xdist workers, plus the kernels they compile themselves; the warm-up: "
          f"{rows[0]['warm_runs']} runs at N = {check.warm_n} in {check.warm_jobs} processes.")
    print(f"Budgets: {fixed:.0f} s, then the sweep until the limit (at least {limit_s - fixed:.0f} s).")
    return rows


# --- main ---------------------------------------------------------------------------------------------------
def versions():
    import triton

    out = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        out["transformers"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                      "sms": props.multi_processor_count, "capability": f"{props.major}.{props.minor}"}
    return out


def parse_steps(p, text):
    names = []
    for part in (x.strip() for x in text.split(",") if x.strip()):
        if part == "all":
            names += list(STEPS)
        elif part in ALIASES or part in STEPS:
            names += list(ALIASES.get(part, (part,)))
        else:
            p.error(f"unknown step {part!r}; choose from {', '.join(STEPS)} (or all, {', '.join(ALIASES)})")
    return [s for s in STEPS if s in names]


def parse_budgets(p, items):
    budgets = {name: spec[0] for name, spec in STEPS.items()}
    for item in items:
        name, _, seconds = item.partition("=")
        if name not in STEPS:
            p.error(f"--budget {item!r}: unknown step {name!r}; choose from {', '.join(STEPS)}")
        try:
            budgets[name] = float(seconds)
        except ValueError:
            p.error(f"--budget {item!r}: give STEP=SECONDS, e.g. timings=120")
    return budgets


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (Triton's interpreter with TRITON_INTERPRET=1)")
    p.add_argument("--steps", "--parts", default="all", help=f"comma-separated, of {', '.join(STEPS)} (default all; "
                   "kernels = timings,profile,memory,sweep)")
    p.add_argument("--plan", action="store_true", help="print each step's kernel compiles and budget; run nothing")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the JSON and the logs")
    p.add_argument("--limit-s", type=float, default=480.0, help="the whole run ends by then (default 480)")
    p.add_argument("--budget", action="append", default=[], metavar="STEP=SECONDS", help="change a step's budget")
    p.add_argument("--quick", action="store_true", help="a third of the sweep grid (N = 1k, 4k, 16k, GQA at 32k)")
    p.add_argument("--autotune", choices=("0", "1"), default="0", help="ATTNLRP_FAST_AUTOTUNE (default 0)")
    p.add_argument("--e2e-args", default=None, help=f"arguments for bench/e2e.py (default {E2E_ARGS[False]!r})")
    p.add_argument("--test-workers", type=int, default=None, help="pytest-xdist workers for the tests step "
                   "(default 8; smoke 2)")
    p.add_argument("--warm-jobs", type=int, default=None, help="processes compiling kernels during the tests step "
                   "(default 6; smoke 2)")
    p.add_argument("--warm-n", type=int, default=None, help="N of the warm-up runs, a multiple of 16 like every timed "
                   "N (default 512; smoke 32)")
    args = p.parse_args(argv)
    if args.warm_n is None:
        args.warm_n = 32 if args.smoke else 512
    if args.warm_n <= 0 or args.warm_n % 16:
        p.error(f"--warm-n must be a positive multiple of 16 (Triton specialises on N % 16), got {args.warm_n}")
    if args.test_workers is None:
        args.test_workers = 2 if args.smoke else 8
    if args.warm_jobs is None:
        args.warm_jobs = 2 if args.smoke else 6
    if args.test_workers < 1 or args.warm_jobs < 1:
        p.error("--test-workers and --warm-jobs must be at least 1")
    return p, args, parse_steps(p, args.steps), parse_budgets(p, args.budget)


def open_run(check, args, budgets):
    name = torch.cuda.get_device_name() if check.cuda else f"cpu ({platform.processor() or platform.machine()})"
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    stem = f"{datetime.date.today().isoformat()}-{slug}{'-smoke' if check.smoke else ''}"
    path = check.out / f"{stem}.json"
    result = json.loads(path.read_text()) if path.exists() else {}   # steps run in separate calls merge
    result.update({"device": name, "versions": versions(), "smoke": check.smoke,
                   "dtype": str(check.dtype).split(".")[-1], "autotune": args.autotune == "1", "limit_s": args.limit_s,
                   "plan": {r["step"]: {k: r[k] for k in ("budget_s", "kernels", "compiled_here")}
                            for r in plan(check, budgets)}})
    return runner.Run(result, path, check.out / f"{stem}.jsonl", deadline=time.monotonic() + args.limit_s)


def exit_status(result):
    """1 when a step failed or a GPU test failed (steps cut off by their budget are not failures), else 0."""
    failed = [n for n, r in result.get("steps", {}).items() if str(r.get("status", "")).startswith("error")]
    tests = result.get("gpu_tests", {})
    return 1 if failed or tests.get("returncode") not in (0, None) or tests.get("failed") else 0


def main(argv=None):
    p, args, steps, budgets = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    check = Check(smoke=args.smoke, cuda=cuda, out=Path(args.out), e2e_args=args.e2e_args or E2E_ARGS[args.smoke],
                  test_workers=args.test_workers, warm_jobs=args.warm_jobs, warm_n=args.warm_n, quick=args.quick)
    if args.plan:
        print_plan(check, budgets, args.limit_s)
        return 0
    if not cuda and not args.smoke:
        p.error("no CUDA device: run with --smoke to check the harness on CPU, or --plan")
    os.environ["ATTNLRP_FAST_AUTOTUNE"] = args.autotune
    check.out.mkdir(parents=True, exist_ok=True)
    run = open_run(check, args, budgets)
    try:
        for name in steps:
            budget = budgets[name] if budgets[name] is not None else run.left() - runner.GRACE_S
            runner.run_step(run, name, budget, partial(STEPS[name][1], check=check))
    finally:
        if not run.result.get("unfinished"):
            run.result.pop("unfinished", None)
        run.save()
        print(f"wrote {run.json_path}", flush=True)
    return exit_status(run.result)


if __name__ == "__main__":
    if "--smoke" in sys.argv:
        os.environ.setdefault("TRITON_INTERPRET", "1")    # before attnlrp_fast (and Triton's jit) is imported
    sys.exit(main())
