"""The whole GPU check of one GPU machine, in time-capped steps (bench/device_run.sh runs them all within one time
limit; bench/README.md has the budgets):

  gate     every kernel variant and path against float64 (bench/gate.py: one process per unit, in parallel, a hang
           killed): forward hopper / tma / portable / decode, backward dQ separate / atomic, the SDPA path. What
           fails is gated out of every later step; a provisional dispatch table (bench/table.py) goes to
           <out>/dispatch.json and ATTNLRP_FAST_DISPATCH points every later step at it
  tests    the GPU tests (`pytest -m gpu -k "bfloat16 or head_dims or decode or ..."`, less what was gated out) on
           pytest-xdist workers, while bench/warm_cache.py compiles every Triton kernel the later steps run
  spot     a float64 spot check of bf16 output and gradients at N = 2000 (GQA 8/2, D = 128, causal): each rule on the
           Triton path (the run's forward and dQ mode), grad and attnlrp on the SDPA path
  timings  the most important shapes first: D=128 causal 16k, 4k, non-causal 16k, D=64 causal 16k, D=128 causal 1k;
           per shape the baselines first (SDPA cuDNN / flash / default, the LXT-style approach over each), then ours
           (forward; forward+backward for grad and attnlrp in each dQ mode; each forward kernel; the SDPA path)
  decode   one query against a KV cache of 8k, 32k, 128k (GQA 32/8, D = 128, batch 1 and 8): SDPA and its backends,
           then af.attention (auto; the Triton kernels, which take the split-KV decode kernel; each forward forced)
  dispatch bf16 GQA 32/8, B*N = 16k tokens, N = 1k / 4k / 16k, plain / causal / padding / causal+padding, D = 128
           then 64: forward+backward (attnlrp) on the SDPA path and the Triton path, each passing forward alone;
           rewrites <out>/dispatch.json with the cases and the fastest forward
  profile  one torch.profiler pass over one forward+backward of ours (attnlrp: each dQ mode, the SDPA path)
  memory   peak memory above the inputs at 128k (GQA 32/8, D = 128, causal): SDPA cuDNN / flash / default, then ours
  e2e      bench/e2e.py: a Llama-3-8B-shaped explanation at 8k, the LXT-style baseline, ours (auto) and ours with
           the Triton kernels forced, 3 hops through a reasoning span; at 128k ours plain and with offload="cpu"
  sweep    the rest of the sweep grid (sweep_shapes), every baseline (eager included), until the time is up

    python bench/gpu_check.py --out $OUT                  # all steps (on a CUDA machine)
    python bench/gpu_check.py --steps spot,memory         # some of them; results merge into the same JSON
    python bench/gpu_check.py --plan                      # each step's kernel compiles and budget; runs nothing
    TRITON_INTERPRET=1 python bench/gpu_check.py --smoke  # CPU, tiny sizes, Triton's interpreter
    python bench/report.py $OUT/<date>-<device>.json --readme README.md   # plots + README tables from the JSON

Results: `<out>/<date>-<device>.json` (rewritten after every measurement; steps not completed are listed under
"unfinished"), `<out>/<date>-<device>.jsonl` (one JSON line per event, measurement and gate case),
`<out>/dispatch.json`, `<out>/pytest-gpu.log`, `<out>/warm.log`. Every row that raises records its error and the
step goes on. FLOPs: forward 4 * B * H * N * M * D (halved when causal), a backward 2.5x the forward's. Times are
medians (triton.testing.do_bench); the backward time is forward+backward minus forward. Peak memory is
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

from attnlrp_fast.baselines.lxt_style import ScaleGrad as _ScaleGrad

ROOT = Path(__file__).resolve().parent.parent
if __package__:   # imported as bench.<module> (the tests)
    from . import e2e, gate, preflight, runner, table
else:             # run as a script (python bench/<module>.py): its folder is sys.path[0]
    import e2e
    import gate
    import preflight
    import runner
    import table

RULES = ("grad", "attnlrp", "cp")
PROFILE_METHODS = ("attnlrp_fast[attnlrp]", "attnlrp_fast[attnlrp,dq=atomic]", "attnlrp_fast[attnlrp,path=sdpa]")
MEMORY_METHODS = ("sdpa[cudnn_attention]", "sdpa[flash_attention]", "sdpa[default]", "attnlrp_fast[attnlrp]",
                  "attnlrp_fast[attnlrp,dq=atomic]", "attnlrp_fast[attnlrp,path=sdpa]")     # baselines first
E2E_ARGS = {False: "--sizes 8192 --repeats 1 --warmup first --hops 3 --offload --offload-tokens 131072",  # by smoke
            True: "--sizes 32 64 --repeats 1 --warmup none --hops 2 --offload --offload-tokens 96"}
# the GPU tests run: the bf16 cases of every parametrised test, and the tests of head dims, decode and prefill,
# determinism, fully masked rows and the SDPA path (by name; "decode" and "sdpa" also take whole test files)
TEST_WORDS = "bfloat16 or head_dims or decode or deterministic or masked or sdpa"
# the word in a GPU test's id that names each variant the gate can rule out (its tests are then left out)
GATED_TEST_WORDS = {"hopper": "hopper", "tma": "tma", "portable": "portable", "decode": "decode",
                    "dq=atomic": "atomic", "sdpa": "sdpa"}


# --- what is measured ---------------------------------------------------------------------------------------
@dataclass
class Method:
    fn: Callable                      # (q, k, v, causal, **kw) -> o; ours also take key_padding_mask=
    rule: str                         # the rule its backward implements
    env: dict = field(default_factory=dict)    # environment variables it runs under
    fwd_only: bool = False            # time the forward only
    core: bool = True                 # in the timing step's set (False: only in the sweep)
    ours: Optional[tuple] = None      # (rule, dq mode, forward kernel, path) for attnlrp_fast, None for baselines
    variants: tuple = ()              # forward kernels to take, the first these inputs allow (call_env); () = as set
    padding: bool = False             # called with a key padding mask (the dispatch step's cases)


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


def _ours(q, k, v, causal, rule, backend, key_padding_mask=None):
    import attnlrp_fast as af

    return af.attention(q, k, v, causal=causal, rule=rule, backend=backend, key_padding_mask=key_padding_mask)


def ours(rule, dq="separate", fwd="auto", backend="triton", fwd_only=False, path="triton", variants=(), padding=False,
         env=None):
    """attnlrp_fast's attention under `rule`. path "triton": the Triton kernels (backend="triton"), the backward's dQ
    mode (ATTNLRP_FAST_DQ: separate | atomic) and the forward kernel (ATTNLRP_FAST_FWD: portable | tma | hopper, or
    "auto": the first of `variants` the inputs allow, the library's own choice without them). path "sdpa": the torch
    path on torch's fused SDPA kernels (backend="torch"). backend overrides the path's backend (the pytest-benchmark
    suite runs everything on the torch path on CPU)."""
    if path == "sdpa":
        return Method(partial(_ours, rule=rule, backend=backend if backend != "triton" else "torch"), rule,
                      dict(env or {}), fwd_only=fwd_only, ours=(rule, None, None, "sdpa"), padding=padding)
    return Method(partial(_ours, rule=rule, backend=backend), rule,
                  {"ATTNLRP_FAST_DQ": dq, "ATTNLRP_FAST_FWD": fwd, **(env or {})}, fwd_only=fwd_only,
                  ours=(rule, dq, fwd, "triton"), variants=tuple(variants) if fwd == "auto" else (), padding=padding)


def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    return [(name.lower(), getattr(SDPBackend, name)) for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION",
                                                                    "EFFICIENT_ATTENTION") if hasattr(SDPBackend, name)]


def methods(smoke, backend=None, check=None):
    """name -> Method, the baselines first (what a cut step loses is ours, never the baseline). Baselines: SDPA with
    each backend it offers and its default, the LXT-style approach over each, eager attention (sweep only). Ours:
    forward+backward in both dQ modes of the backward (kernels/attention_bwd.py: "separate", deterministic, and
    "atomic", FlashAttention-2's fp32 atomics), each forward kernel alone (portable; on the GPU also the TMA and
    the warp-specialised Hopper kernels, which take bf16/fp16 only), and the SDPA path (backend="torch"). With a
    `check` after the gate: only what passed it, the forward the run prefers, the dQ mode's own table."""
    out = {"sdpa[default]": Method(lambda q, k, v, c: sdpa(q, k, v, c), "grad")}
    backends = [] if smoke else _sdpa_backends()
    for name, be in backends:
        out[f"sdpa[{name}]"] = Method(lambda q, k, v, c, be=be: sdpa(q, k, v, c, be), "grad",
                                      core=name != "efficient_attention")
    out["lxt_style[sdpa]"] = Method(lambda q, k, v, c: sdpa(q, k, v, c, lrp=True), "attnlrp")
    for name, be in backends:
        out[f"lxt_style[sdpa_{name}]"] = Method(lambda q, k, v, c, be=be: sdpa(q, k, v, c, be, lrp=True), "attnlrp",
                                                core=name != "efficient_attention")
    triton_backend = backend or "triton"
    passes = check.passes if check is not None else (lambda name: True)
    variants = check.order if check is not None else ()
    if check is None or check.triton_ok:
        for dq, tag in (("separate", ""), ("atomic", ",dq=atomic")):
            if not passes(f"dq={dq}"):
                continue
            env = check.dq_env(dq) if check is not None else None
            for rule in ("grad", "attnlrp"):
                out[f"attnlrp_fast[{rule}{tag}]"] = ours(rule, dq, backend=triton_backend, variants=variants, env=env)
        for fwd in ("portable",) if smoke else ("portable", "tma", "hopper"):
            if passes(fwd):   # forward only (the smoke run's fp32 takes the portable kernel only)
                out[f"attnlrp_fast[grad,fwd={fwd}]"] = ours("grad", fwd=fwd, backend=triton_backend, fwd_only=True)
    if passes("sdpa") and backend != "torch":     # (with backend="torch" everything of ours is on that path)
        for rule in ("grad", "attnlrp"):
            out[f"attnlrp_fast[{rule},path=sdpa]"] = ours(rule, path="sdpa", backend=backend or "torch")
    out["eager"] = Method(lambda q, k, v, c: eager(q, k, v, c), "grad", core=False)
    out["lxt_style[eager]"] = Method(lambda q, k, v, c: eager(q, k, v, c, lrp=True), "attnlrp", core=False)
    return out


def takes_dtype(variant, dtype):
    """Whether forward kernel `variant` takes inputs of `dtype` at all (the descriptor kernels: fp16 and bf16 only)."""
    return variant not in ("tma", "hopper") or dtype in (torch.float16, torch.bfloat16)


def pick_forward(variants, q, k, v, kpm=None):
    """The first forward kernel of `variants` these inputs allow here; ValueError saying why none does."""
    from attnlrp_fast.kernels.attention_fwd import forward_variant

    reasons = []
    for variant in variants:
        try:
            return forward_variant(q, k, v, kpm, variant=variant)
        except ValueError as e:
            reasons.append(str(e))
    raise ValueError("no forward kernel that passed the gate takes these inputs: " + "; ".join(reasons))


def call_env(method, q, k, v, kpm=None):
    """The environment `method` runs under for these inputs: its own, with ATTNLRP_FAST_FWD resolved from its
    variants (hopper takes no key padding mask: those calls take the next variant)."""
    env = dict(method.env)
    if method.variants:
        env["ATTNLRP_FAST_FWD"] = pick_forward(method.variants, q, k, v, kpm)
    return env


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
    return (1, 2, 1, 40, 32, True) if smoke else (1, 8, 2, 2000, 128, True)


def decode_shapes(smoke):
    """(B, H, Hkv, N, M, D) of the decode step: one query against a KV cache, the 128k target first."""
    if smoke:
        return [(1, 4, 2, 1, 520, 16)]       # past 4 key blocks of 128: auto takes the decode kernel
    return [(b, 32, 8, 1, m, 128) for m in (131072, 32768, 8192) for b in (1, 8)]


def dispatch_cases(smoke):
    """((B, H, Hkv, N, D, causal), features) of the dispatch step: GQA 32/8, B * N = 16k tokens, the features of the
    dispatch table; D = 128 before 64."""
    if smoke:
        return [((1, 2, 1, 32, 16, "causal" in f), f) for f in ("plain", "causal+padding")]
    return [((max(1, 16384 // n), 32, 8, n, d, "causal" in f), f) for d in (128, 64) for n in (1024, 4096, 16384)
            for f in table.PREFILL_FEATURES]


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
    """Median ms of fn: triton.testing.do_bench on CUDA; on CPU (the smoke run: its times only show the code path
    runs) one warm-up and one timed run."""
    if cuda:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
    fn()
    t = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t) * 1e3
    for x in grad_to_none or ():
        x.grad = None
    return ms


def runners(method, q, k, v, causal, kpm=None):
    """(forward without grad, forward+backward on fresh leaves, those leaves) of `method` at these inputs."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    do = torch.randn_like(q)
    kw = {"key_padding_mask": kpm} if kpm is not None else {}

    def fwd():
        with torch.no_grad():
            method.fn(q, k, v, causal, **kw)

    def fwd_bwd():
        method.fn(*leaves, causal, **kw).backward(do)
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


def measure(method, q, k, v, causal, cuda, kpm=None):
    """Forward ms (no grad); unless fwd_only, forward+backward ms and peak MiB of forward+backward."""
    fwd, fwd_bwd, leaves = runners(method, q, k, v, causal, kpm)
    with environment(call_env(method, q, k, v, kpm)):
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
    """What a failed row records: "out of memory", or the exception's type and first line (any exception: compile
    errors, out of resources, assertion errors alike)."""
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
        return "out of memory"
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _forward_of(method, inputs, kpm=None):
    """The forward kernel one of our Triton-path rows runs (None for the others)."""
    if not method.ours or method.ours[3] != "triton":
        return None
    with contextlib.suppress(Exception):
        fwd = call_env(method, *inputs, kpm).get("ATTNLRP_FAST_FWD")
        if fwd != "auto":
            return fwd
        from attnlrp_fast.kernels.attention_fwd import forward_variant

        return forward_variant(*inputs, kpm)
    return None


def timing_row(name, method, shape, inputs, cuda):
    """One measured row: ms, TFLOP/s and peak MiB, or the error (any exception: out of memory, inputs a backend
    refuses, a kernel that fails to compile)."""
    B, H, Hkv, N, D, causal = shape
    row = {"method": name, "rule": method.rule, "B": B, "H": H, "Hkv": Hkv, "N": N, "D": D, "causal": causal,
           "dtype": str(inputs[0].dtype).split(".")[-1]}
    forward = _forward_of(method, inputs)
    if forward:
        row["forward"] = forward
    try:
        row.update(measure(method, *inputs, causal, cuda))
    except Exception as e:  # noqa: BLE001 - recorded in the row; runner.StepTimeout (a BaseException) goes through
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
    """q, k, v (B, H or Hkv, N, D), drawn where they are used (a 128k input is not built on the CPU first)."""
    B, H, Hkv, N, D, _ = shape
    g = torch.Generator(device=device).manual_seed(N + D)
    return [torch.randn(B, h, N, D, generator=g, device=device, dtype=dtype) for h in (H, Hkv, Hkv)]


def padding_mask(B, M, device):
    """A right-padded key padding mask (True = real token): row b loses (b % 4 + 1) / 16 of its keys."""
    lengths = M - (torch.arange(B) % 4 + 1) * max(M // 16, 1)
    return (torch.arange(M)[None] < lengths[:, None]).to(device)


def spot_check(check, shape=None):
    """bf16 (fp32 on CPU) output and gradients against float64 (selfcheck's relative errors): each rule on the
    Triton path (the run's forward and dQ mode), grad and attnlrp on the SDPA path; a row that raises holds
    {"error"}."""
    from attnlrp_fast.selfcheck import attention_errors

    B, H, Hkv, N, D, causal = shape or spot_shape(check.smoke)
    dtype = torch.bfloat16 if check.cuda else torch.float32
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(B, h, N, D, generator=g).to(check.device, dtype) for h in (H, Hkv, Hkv, H))
    calls = [(rule, "triton", rule) for rule in RULES if check.triton_ok]
    calls += [(f"{rule},path=sdpa", "torch", rule) for rule in ("grad", "attnlrp") if check.passes("sdpa")]
    out = {}
    for name, backend, rule in calls:
        try:
            env = call_env(ours(rule, check.dq, variants=check.order, env=check.dq_env(check.dq)), q, k, v) \
                if backend == "triton" else {}
            with environment(env):
                out[name] = attention_errors(q, k, v, do, causal=causal, rule=rule, backend=backend)
        except Exception as e:  # noqa: BLE001 - recorded; the other rows still run
            out[name] = {"error": _error(e)}
    return out


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
    with environment(call_env(method, q, k, v)):
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
    q = k = v = leaves = fwd_bwd = None
    try:
        q, k, v = make_inputs(shape, device, dtype)
        _, fwd_bwd, leaves = runners(method, q, k, v, shape[5])
        t = time.perf_counter()
        with environment(call_env(method, q, k, v)):
            row["peak_mib"] = peak_mib(fwd_bwd, leaves, cuda)
        row["seconds_one_run"] = time.perf_counter() - t
    except Exception as e:  # noqa: BLE001 - recorded in the row
        row["error"] = _error(e)
    finally:
        q = k = v = leaves = fwd_bwd = None
        if cuda:
            torch.cuda.empty_cache()
    return row


def decode_methods(check):
    """name -> fn(q, k, v) of the decode step, no gradients: SDPA and each backend it offers (GQA without copies:
    enable_gqa), then af.attention under auto, with the Triton kernels (the library's choice: the split-KV decode
    kernel where it pays) and with each forward kernel that passed the gate forced."""
    import attnlrp_fast as af

    def sdpa_decode(q, k, v, be=None):
        if be is None:
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(be):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    out = {"sdpa[default]": (sdpa_decode, {})}
    for name, be in [] if check.smoke else _sdpa_backends():
        out[f"sdpa[{name}]"] = (partial(sdpa_decode, be=be), {})
    if check.passes("sdpa"):   # the library's SDPA path (backend="torch"): what the dispatch table weighs
        out["attnlrp_fast[torch]"] = (lambda q, k, v: af.attention(q, k, v, backend="torch"), {})
    # a decode kernel the gate ruled out is never taken: the Triton rows then force the run's flash forward
    safe = {} if check.passes("decode") or not check.order else {"ATTNLRP_FAST_FWD": check.order[0]}
    if check.triton_ok or check.passes("sdpa"):
        out["attnlrp_fast[auto]"] = (lambda q, k, v: af.attention(q, k, v), safe)
    if check.triton_ok:
        triton = partial(af.attention, backend="triton")
        out["attnlrp_fast[triton]"] = (lambda q, k, v: triton(q, k, v), safe)
        for variant in (("decode",) if check.passes("decode") and check.has_decode else ()) + check.order:
            if not takes_dtype(variant, check.dtype):
                continue
            out[f"attnlrp_fast[triton,fwd={variant}]"] = (lambda q, k, v: triton(q, k, v),
                                                          {"ATTNLRP_FAST_FWD": variant})
    return out


def _decode_choice(name, q, k, v):
    """What one of our decode rows runs: the path auto takes ({"path", "engine"}) and the Triton forward kernel."""
    out, prefer = {}, None
    if not name.startswith("attnlrp_fast"):
        return out
    with contextlib.suppress(Exception):
        from attnlrp_fast.bindings.dispatch import attention_choice

        choice = attention_choice(q, k, backend=None if name == "attnlrp_fast[auto]" else "triton")
        out.update(path=choice.path, engine=choice.engine)
        prefer = choice.forward
    if out.get("path", "triton") == "triton":
        with contextlib.suppress(Exception):
            from attnlrp_fast.kernels.attention_fwd import forward_variant

            out["forward"] = forward_variant(q, k, v, prefer=prefer)
    return out


def decode_row(name, fn, env, shape, check, timed=True):
    """One decode measurement: ms of fn(q, k, v) without gradients, the path and forward kernel our rows took, or
    the error (timed=False: a single untimed run, the warm-up)."""
    B, H, Hkv, N, M, D = shape
    row = {"method": name, "B": B, "H": H, "Hkv": Hkv, "N": N, "M": M, "D": D,
           "dtype": str(check.dtype).split(".")[-1]}
    q = k = v = None
    try:
        g = torch.Generator(device=check.device).manual_seed(M + B)
        q = torch.randn(B, H, N, D, generator=g, device=check.device, dtype=check.dtype)
        k, v = (torch.randn(B, Hkv, M, D, generator=g, device=check.device, dtype=check.dtype) for _ in range(2))
        with environment(env):
            row.update(_decode_choice(name, q, k, v))
            with torch.no_grad():
                if timed:
                    row["ms"] = bench_ms(lambda: fn(q, k, v), check.cuda)
                else:
                    fn(q, k, v)
    except Exception as e:  # noqa: BLE001 - recorded in the row
        row["error"] = _error(e)
    finally:
        q = k = v = None
        if check.cuda:
            torch.cuda.empty_cache()
    return row


# --- the kernels each step compiles (an estimate for --plan and the warm-up) ---------------------------------
def kernel_keys(method, shape, dtype):
    """The Triton kernel specialisations one forward+backward of `method` at `shape` compiles, from the launchers
    in kernels/attention_fwd.py and attention_bwd.py: a forward kernel; then the delta kernel, the dK/dV kernel
    and, unless dQ is atomic or the rule is cp, the dQ kernel. H, Hkv and H / Hkv (== 1 or not) enter Triton's
    specialisation, and a key padding mask; B does not, and N only through N % 16 (every timed N is a multiple of
    16). SDPA, LXT-style, eager and our SDPA path compile none."""
    if method.ours is None or method.ours[3] != "triton":
        return set()
    rule, dq, fwd, _ = method.ours
    _, H, Hkv, _, D, causal = shape
    dtype = str(dtype).split(".")[-1]
    kpm = method.padding
    keys = {("attention_fwd", method.variants[0] if method.variants else fwd, D, causal, kpm, H, Hkv, dtype)}
    if method.fwd_only:
        return keys
    atomic = dq == "atomic" and rule != "cp"
    keys |= {("attention_bwd_delta", D, H, dtype),
             ("attention_bwd_dkdv", rule, atomic, D, causal, kpm, H, Hkv, dtype)}
    if not atomic and rule != "cp":
        keys.add(("attention_bwd_dq", rule, D, causal, kpm, H, Hkv, dtype))
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


def decode_keys(smoke, dtype):
    """Kernels of the decode step: the split-KV kernel and its merge per (H, Hkv, D), the flash forwards at N = 1."""
    dt = str(dtype).split(".")[-1]
    return {("attention_decode", H, Hkv, D, dt) for _, H, Hkv, _, _, D in decode_shapes(smoke)}


# --- the steps ----------------------------------------------------------------------------------------------
@dataclass
class Check:
    """What every step needs: sizes (smoke or device), where it runs, the methods, where results go, and the gate's
    verdicts (None: no gate ran, nothing is excluded)."""
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
    verdicts: Optional[dict] = None             # {variant: {"status": pass | fail | unsupported, "why"}}
    forward: Optional[str] = None               # the measured fastest forward (the dispatch step)
    dq_tables: dict = field(default_factory=dict)   # dQ mode -> a dispatch table naming it (ATTNLRP_FAST_DISPATCH)
    decode_cases: list = field(default_factory=list)  # the dispatch table's decode cases (the decode step)

    def __post_init__(self):
        self.methods = self.methods or methods(self.smoke, check=self)

    def rebuild(self):
        """The methods again, after the verdicts, the forward or the tables changed."""
        self.methods = methods(self.smoke, check=self)

    def passes(self, name):
        return table.passing(self.verdicts, name)

    @property
    def order(self):
        """The forward kernels that passed the gate, the run's preferred one first (() without a gate)."""
        return table.forward_order(self.verdicts, self.forward) if self.verdicts is not None else ()

    @property
    def dq(self):
        return table.dq_mode(self.verdicts) or "separate"

    @property
    def triton_ok(self):
        """Whether a Triton forward and a dQ mode passed the gate (or no gate ran)."""
        return self.verdicts is None or bool(self.order and table.dq_mode(self.verdicts))

    @property
    def has_decode(self):
        from attnlrp_fast.kernels.attention_fwd import FWD_VARIANTS

        return "decode" in FWD_VARIANTS

    def dq_env(self, dq):
        """The environment that makes the backward take `dq` where a dispatch table is in force (a table's dQ mode
        is what the library takes when the caller names none)."""
        path = self.dq_tables.get(dq)
        return {table.ENV: str(path)} if path else {}

    @property
    def device(self):
        return "cuda" if self.cuda else "cpu"

    @property
    def dtype(self):
        return torch.float32 if self.smoke else torch.bfloat16


EAGER = ("eager", "lxt_style[eager]")
OUTCOME = re.compile(r"(\S+\.py::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b|"
                     r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+\.py::\S+)")


def shape_dict(shape):
    return dict(zip(("B", "H", "Hkv", "N", "D", "causal"), shape))


def shape_of(row):
    return tuple(row[k] for k in ("B", "H", "Hkv", "N", "D", "causal"))


def core_names(ms):
    return [n for n, m in ms.items() if m.core]


def child_env(check):
    """What the later steps' child processes (tests, warm-up, e2e) inherit besides ATTNLRP_FAST_DISPATCH: the run's
    dQ mode, and ATTNLRP_FAST_FWD where the library's own choice could reach a kernel the gate ruled out (it falls
    back on tma, and takes the decode kernel for a few queries)."""
    if check.verdicts is None:
        return {}
    env = {"ATTNLRP_FAST_DQ": check.dq}
    risky = (check.has_decode and not check.passes("decode")) or not check.passes("tma")
    if check.order and check.order[0] != "portable" and risky:
        env["ATTNLRP_FAST_FWD"] = "portable" if check.passes("portable") else check.order[0]
    elif check.order and check.has_decode and not check.passes("decode"):
        env["ATTNLRP_FAST_FWD"] = check.order[0]
    return env


def publish_table(run, check, cases=()):
    """Write <out>/dispatch.json for the gate's verdicts (and the measured cases), point ATTNLRP_FAST_DISPATCH at it
    for the rest of the run (children inherit it), and rebuild the methods. A table the library would refuse is not
    written (result["table"] says why); the previous one, if any, stays in force."""
    tbl, why = table.build(check.verdicts, run.json_path.name, check.forward, list(check.decode_cases) + list(cases))
    path = check.out / "dispatch.json"
    if tbl is not None:
        why = table.write(tbl, path)
    info = run.result.setdefault("table", {})
    if why:
        info.update(written=False, why=why)
        print(f"dispatch table: {why}", flush=True)
    else:
        info.update(written=True, path=path.name, forward=tbl["forward"], dq=tbl["dq"], gated_out=tbl["gated_out"],
                    cases=len(tbl["cases"]), why=None)
        os.environ[table.ENV] = str(path)
        check.dq_tables = table.write_siblings(tbl, path, check.verdicts)
    os.environ.update(child_env(check))
    check.rebuild()
    run.log("gate" if not cases else "dispatch", "table", **info)
    run.save()


def step_gate(run, check):
    """Every kernel variant and path against float64 (bench/gate.py), one process per unit; the verdicts decide what
    every later step runs, and the provisional dispatch table goes out."""
    units = gate.available_units(check.smoke)
    record = run.result["gate"] = {"units": {}, "verdicts": {}, "planned_units": len(units)}

    def on_unit(name, res):
        status = res["status"] or {}
        record["units"][name] = {"variant": res["variant"], **res["verdict"], "seconds": status.get("seconds"),
                                 "returncode": status.get("returncode"), "timed_out": status.get("timed_out"),
                                 "cases": len(res["lines"])}
        run.log("gate", "unit", unit=name, **record["units"][name])
        run.save()
        why = res["verdict"]["why"]
        print(f"[gate] {name}: {res['verdict']['status']}{' - ' + why if why else ''}", flush=True)
    results = gate.run_gate(units, check.smoke, run.log_path, run.step_left(), cuda=check.cuda, on_unit=on_unit)
    record["verdicts"] = gate.verdicts(results)
    check.verdicts = {v: {"status": r["status"], "why": r["why"]} for v, r in record["verdicts"].items()}
    check.forward = None
    print(f"[gate] {gate.summary(record['verdicts'])}", flush=True)
    publish_table(run, check)
    return all(r["status"] is not None for r in results.values())


def gpu_test_files():
    """The test files (paths under tests/, e.g. kernels/test_attention_gpu.py) that hold GPU tests (a `mark.gpu` in
    their text): collecting only those is quicker. pytest runs in tests/ with the checkout as its rootdir (ids stay
    tests/...), so that the checkout's own attnlrp_fast/ folder (no kernels/ or bindings/ in it) never shadows an
    installed attnlrp_fast."""
    tests = ROOT / "tests"
    return [p.relative_to(tests).as_posix() for p in sorted(tests.rglob("test_*.py"))
            if "mark.gpu" in p.read_text(encoding="utf-8")]


def pytest_command(*args):
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--rootdir={ROOT}", *args]


def test_selection(verdicts=None):
    """pytest's -m/-k arguments of the tests step: TEST_WORDS, less the tests of variants the gate ruled out."""
    words = [w for v, w in GATED_TEST_WORDS.items() if verdicts is not None and v in verdicts
             and not table.passing(verdicts, v)]
    return ["-m", "gpu", "-k", f"({TEST_WORDS}) and not " + " and not ".join(words) if words else TEST_WORDS]


def test_outcomes(text):
    """{"counts": {outcome: n}, "failed": [ids]} from `pytest -v` output (with or without xdist), and the summary."""
    last = {}
    for m in OUTCOME.finditer(text):
        node, outcome = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
        last[node if node.startswith("tests/") else "tests/" + node] = outcome    # pytest runs in tests/
    counts = {o: sum(1 for v in last.values() if v == o) for o in sorted(set(last.values()))}
    lines = [ln.strip("= ") for ln in text.splitlines() if re.match(r"^=+ .* in [\d.]+s", ln)]
    return {"counts": counts, "failed": sorted(n for n, o in last.items() if o in ("FAILED", "ERROR"))[:50],
            "summary": lines[-1] if lines else None}


def run_gpu_tests(run, check):
    """The GPU tests over pytest-xdist workers (one process without xdist), capped by the step."""
    workers = check.test_workers if importlib.util.find_spec("xdist") else 1
    selection = test_selection(check.verdicts)
    cmd = pytest_command("-v", "--tb=short", *selection, *gpu_test_files())
    cmd += ["-n", str(workers)] if workers > 1 else []
    env = dict(os.environ, TRITON_INTERPRET="0") if check.cuda else None
    log = check.out / "pytest-gpu.log"
    with open(log, "w") as f:
        status = runner.Capped(cmd, run.step_left(), f, env=env, cwd=ROOT / "tests").wait()
    text = log.read_text()
    out = {"selection": shlex.join(selection), "workers": workers, **status, **test_outcomes(text),
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
    """GPU tests while bench/warm_cache.py compiles the later steps' kernels; both end by the step's end."""
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
    errs = spot_check(check)
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


# decode rows that weigh the two paths in the dispatch table: the SDPA path and the Triton kernels under auto
DECODE_TABLE_ROWS = {"sdpa": "attnlrp_fast[torch]", "triton": "attnlrp_fast[triton]"}


def step_decode(run, check):
    """Generation-shaped attention: SDPA (and its backends) first, then ours, at each cache length. Batch-1 shapes
    give the dispatch table its decode cases (the SDPA path's forward against the Triton kernels')."""
    from attnlrp_fast.bindings.dispatch_table import features_of
    from attnlrp_fast.kernels.attention_common import length_bucket

    run.result["decode"] = []
    check.decode_cases = []
    calls = decode_methods(check)
    for shape in decode_shapes(check.smoke):
        ms = {}
        for name, (fn, env) in calls.items():
            if run.step_left() <= 0:
                return False
            row = decode_row(name, fn, env, shape, check)
            run.row("decode", "decode", row)
            ms.update({path: row.get("ms") for path, method in DECODE_TABLE_ROWS.items() if method == name})
        B, _, _, N, M, D = shape
        entry = table.case_entry(features_of(True, False, N), str(check.dtype).split(".")[-1], D, length_bucket(M),
                                 ms) if B == 1 else None
        if entry:
            check.decode_cases.append(entry)
            if check.verdicts is not None:
                publish_table(run, check, ())
    return True


def dispatch_row(case, path, method, inputs, kpm, check):
    """One measurement of the dispatch step: forward (and unless forward-only, forward+backward) ms, or the error."""
    shape, features = case
    row = {"case": f"{features} D={shape[4]} N={shape[3]}", "features": features, "path": path,
           **shape_dict(shape), "dtype": str(check.dtype).split(".")[-1]}
    forward = _forward_of(method, inputs, kpm)
    if forward:
        row["forward"] = forward
    try:
        row.update(measure(method, *inputs, shape[5], check.cuda, kpm))
    except Exception as e:  # noqa: BLE001 - recorded in the row
        row["error"] = _error(e)
    finally:
        if check.cuda:
            torch.cuda.empty_cache()
    return row


def step_dispatch(run, check):
    """Per case: the SDPA path, each passing forward kernel alone, then the Triton path with the fastest forward so
    far (forward+backward, attnlrp); after each case <out>/dispatch.json is rewritten with what was measured."""
    from attnlrp_fast.kernels.attention_common import length_bucket

    run.result["dispatch_rows"] = []
    forwards = table.forward_order(check.verdicts) if check.verdicts is not None else ()
    cases, fwd_rows = [], []
    for case in dispatch_cases(check.smoke):
        if run.step_left() <= 0:
            return False
        shape, features = case
        B, H, Hkv, N, D, causal = shape
        inputs = make_inputs(shape, check.device, check.dtype)
        kpm = padding_mask(B, N, check.device) if "padding" in features else None
        ms = {}
        if check.passes("sdpa"):
            row = dispatch_row(case, "sdpa", ours("attnlrp", path="sdpa", padding=kpm is not None), inputs, kpm, check)
            run.row("dispatch", "dispatch_rows", row)
            ms["sdpa"] = row.get("fwd_bwd_ms")
        for variant in forwards:
            if gate._unsupported(variant, *inputs, kpm):       # hopper takes no key padding mask
                continue
            row = dispatch_row(case, f"forward={variant}", ours("grad", fwd=variant, fwd_only=True,
                                                               padding=kpm is not None), inputs, kpm, check)
            run.row("dispatch", "dispatch_rows", row)
            fwd_rows.append({"variant": variant, "case": row["case"], "fwd_ms": row.get("fwd_ms")})
        check.forward = table.fastest_forward(fwd_rows, forwards) or check.forward
        if check.triton_ok:
            method = ours("attnlrp", check.dq, variants=check.order, env=check.dq_env(check.dq),
                          padding=kpm is not None)
            row = dispatch_row(case, "triton", method, inputs, kpm, check)
            run.row("dispatch", "dispatch_rows", row)
            ms["triton"] = row.get("fwd_bwd_ms")
        entry = table.case_entry(features, str(check.dtype).split(".")[-1], D, length_bucket(N), ms)
        if entry:
            cases.append(entry)
        del inputs
        run.result["dispatch"] = {"cases": cases, "forward": check.order[0] if check.order else None}
        if check.verdicts is not None:
            publish_table(run, check, cases)
    return True


def step_profile(run, check):
    shape = timing_shapes(check.smoke)[0]
    prof = {"shape": shape_dict(shape), "activity": "cuda" if check.cuda else "cpu", "methods": {}}
    run.result["profile"] = prof
    for name in PROFILE_METHODS:
        if name not in check.methods:
            continue
        if run.step_left() <= 0:
            return False
        try:
            prof["methods"][name] = profile_method(check.methods[name], shape, check.device, check.dtype, check.cuda)
        except Exception as e:  # noqa: BLE001 - recorded; the next method still runs
            prof["methods"][name] = {"error": _error(e)}
        run.log("profile", "row", method=name, **prof["methods"][name])
        print(json.dumps({"profile": name, "total_ms": prof["methods"][name].get("total_ms"),
                          "error": prof["methods"][name].get("error")}), flush=True)
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


def e2e_methods(check):
    """bench/e2e.py's methods this run may take: the baselines, ours on auto (the SDPA path or the Triton kernels,
    whichever passed), ours with the Triton kernels forced (when a forward and a dQ mode passed)."""
    names = ["forward", "lxt_style"]
    if check.triton_ok or check.passes("sdpa"):
        names.append("attnlrp_fast")
    if check.triton_ok:
        names.append("attnlrp_fast_triton")
    return names


def step_e2e(run, check):
    """bench/e2e.py in a child process killed at the step's end; its rows are logged as they come."""
    state = Path(tempfile.mkdtemp()) / "e2e.json"
    cmd = [sys.executable, str(ROOT / "bench" / "e2e.py"), *shlex.split(check.e2e_args), "--out", str(state),
           "--methods", *e2e_methods(check)]
    child = runner.Capped(cmd + (["--smoke"] if check.smoke else []), run.step_left(), subprocess.PIPE)
    try:
        for line in child.proc.stdout:
            print(line, end="", flush=True)
            row = gate.json_object(line)
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
    "gate": (70, step_gate, "every kernel variant and path against float64, units in parallel processes"),
    "tests": (60, step_tests, "the GPU tests on pytest-xdist workers; meanwhile the warm-up"),
    "spot": (10, step_spot, "float64 spot check of bf16 output and gradients, each rule and path"),
    "timings": (75, step_timings, "5 shapes, most important first; SDPA, LXT-style, then ours"),
    "decode": (20, step_decode, "1 query against an 8k / 32k / 128k cache: SDPA, then ours"),
    "dispatch": (40, step_dispatch, "the dispatch table's cases: SDPA path vs Triton, the fastest forward"),
    "profile": (10, step_profile, "one profiled forward+backward of ours (attnlrp): dQ modes, SDPA path"),
    "memory": (25, step_memory, "peak memory above inputs at 128k, GQA 32/8: SDPA, then ours"),
    "e2e": (165, step_e2e, "Llama-3-8B-shaped explanation at 8k: LXT-style, ours, on Triton, 3 hops; at 128k ours "
                           "plain and offloaded"),
    "sweep": (None, step_sweep, "the rest of the sweep grid, every baseline, while time remains"),
}
ALIASES = {"kernels": ("timings", "profile", "memory", "sweep")}
WARMED_STEPS = ("spot", "timings", "decode", "dispatch", "profile", "memory", "e2e", "sweep")   # bench/warm_cache.py


# --- the plan: kernel compiles per step -----------------------------------------------------------------------
def step_calls(step, check, measured=None):
    """(method name, Method, shape) of each measurement `step` makes (the sweep: skipping `measured` shapes,
    by default the timing step's). The gate, tests, decode and e2e steps have none here."""
    ms, smoke = check.methods, check.smoke
    if step == "spot":
        return [(f"attnlrp_fast[{r}]", ours(r, check.dq, variants=check.order), spot_shape(smoke)) for r in RULES
                if check.triton_ok]
    if step == "timings":
        return [(n, ms[n], s) for s in timing_shapes(smoke) for n in core_names(ms)]
    if step == "dispatch":
        calls = []
        for shape, features in dispatch_cases(smoke):
            padded = "padding" in features
            if check.triton_ok:
                calls.append(("attnlrp_fast[attnlrp]", ours("attnlrp", check.dq, variants=check.order,
                                                            padding=padded), shape))
            for variant in check.order if check.verdicts is not None else ("auto",):
                if takes_dtype(variant, check.dtype) and not (variant == "hopper" and padded):
                    calls.append((f"attnlrp_fast[grad,fwd={variant}]",
                                  ours("grad", fwd=variant, fwd_only=True, padding=padded), shape))
        return calls
    if step == "profile":
        return [(n, ms[n], timing_shapes(smoke)[0]) for n in PROFILE_METHODS if n in ms]
    if step == "memory":
        return [(n, ms[n], memory_shape(smoke)) for n in MEMORY_METHODS if n in ms]
    if step == "sweep":
        measured = set(timing_shapes(smoke)) if measured is None else measured
        return [(n, m, s) for s in sweep_rest(smoke, measured, check.quick) for n, m in ms.items()]
    return []


SPECIAL_WARM = {"decode": decode_keys, "e2e": e2e_keys}     # warmed by one run of their own (warm_cache.py)


def step_kernels(step, check):
    if step in SPECIAL_WARM:
        return SPECIAL_WARM[step](check.smoke, check.dtype)
    return set().union(*(kernel_keys(m, s, check.dtype) for _, m, s in step_calls(step, check)))


def warm_items(check):
    """What bench/warm_cache.py runs, in step order: each call that brings a kernel no earlier call compiled
    ((name, Method, shape), or (step, None, None) for the decode step and the end-to-end model). Returns (items,
    kernel keys)."""
    covered, items = set(), []
    for step in WARMED_STEPS:
        if step in SPECIAL_WARM and not (step == "decode" and not check.triton_ok):
            calls = [(step, None, None)]
        else:
            calls = step_calls(step, check)
        for name, method, shape in calls:
            keys = SPECIAL_WARM[name](check.smoke, check.dtype) if method is None else \
                kernel_keys(method, shape, check.dtype)
            if keys - covered:
                items.append((name, method, shape))
                covered |= keys
    return items, covered


def gate_units(check):
    """The gate's units ([] where they cannot be listed: the gate step then says why)."""
    try:
        return gate.available_units(check.smoke)
    except Exception:  # noqa: BLE001 - the plan is a report; the gate step records the error
        return []


def plan(check, budgets):
    """One row per step: its budget, the kernels it runs and how many of them it compiles itself (the warm-up
    in the tests step compiles the rest's: 0 after a complete warm-up; the gate compiles its own, in parallel
    processes). An estimate: see kernel_keys."""
    items, warmed = warm_items(check)
    rows, seen = [], set()
    for step, (_, _, what) in STEPS.items():
        if step == "gate":
            n = sum(u.compiles() for u in gate_units(check))
            rows.append({"step": step, "budget_s": budgets[step], "kernels": n, "compiled_here": n, "what": what})
            continue
        keys = warmed if step == "tests" else step_kernels(step, check)
        rows.append({"step": step, "budget_s": budgets[step], "kernels": len(keys),
                     "compiled_here": len(keys if step == "tests" else keys - warmed - seen), "what": what})
        seen |= keys
    next(r for r in rows if r["step"] == "tests")["warm_runs"] = len(items)
    return rows


def count_tests():
    """How many tests the tests step selects (pytest --collect-only: nothing runs), or None."""
    cmd = pytest_command("--collect-only", "-q", *test_selection(), *gpu_test_files())
    try:
        out = subprocess.run(cmd, cwd=ROOT / "tests", capture_output=True, text=True, timeout=180).stdout
    except subprocess.TimeoutExpired:
        return None
    return sum("::" in ln for ln in out.splitlines()) or None


def print_plan(check, budgets, limit_s):
    rows = plan(check, budgets)
    fixed = sum(r["budget_s"] for r in rows if r["budget_s"] is not None)
    units = gate_units(check)
    print(f"Plan ({'smoke' if check.smoke else 'device'} sizes, {str(check.dtype).split('.')[-1]}): the steps run in "
          f"order, each capped by its budget, all within --limit-s {limit_s:.0f} s. Kernel compiles are estimates.")
    print(f"{'step':<8} {'budget':>7} {'kernels':>8} {'compiled here':>14}  what")
    for r in rows:
        budget = f"{r['budget_s']:.0f} s" if r["budget_s"] is not None else "rest"
        print(f"{r['step']:<8} {budget:>7} {r['kernels']:>8} {r['compiled_here']:>14}  {r['what']}")
    print(f"gate: {len(units)} units, {sum(len(u.cases()) for u in units)} cases, each unit a process killed after "
          f"{gate.UNIT_LIMIT_S:.0f} s, as many at once as there are CPU cores.")
    tests = count_tests()
    warm = next(r for r in rows if r["step"] == "tests")["warm_runs"]
    print(f"tests: {tests if tests is not None else '?'} GPU test cases (`pytest {shlex.join(test_selection())}` on "
          f"tests/{', tests/'.join(gpu_test_files())}) on {check.test_workers} pytest-xdist workers, plus the kernels "
          f"they compile themselves; the warm-up: {warm} runs at N = {check.warm_n} in {check.warm_jobs} processes.")
    print(f"Budgets: {fixed:.0f} s, then the sweep until the limit (at least {limit_s - fixed:.0f} s).")
    return rows


# --- main ---------------------------------------------------------------------------------------------------
def versions():
    import triton

    out = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda}
    for name in ("transformers", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
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
                   "preflight": preflight.record(),
                   "plan": {r["step"]: {k: r[k] for k in ("budget_s", "kernels", "compiled_here")}
                            for r in plan(check, budgets)}})
    return runner.Run(result, path, check.out / f"{stem}.jsonl", deadline=time.monotonic() + args.limit_s)


def earlier_verdicts(result):
    """The gate's verdicts when this run has no gate step: an earlier run's into the same JSON, else what the table
    ATTNLRP_FAST_DISPATCH names states (None: nothing is excluded)."""
    verdicts = (result.get("gate") or {}).get("verdicts")
    if verdicts:
        return {v: {"status": r["status"], "why": r.get("why")} for v, r in verdicts.items()}, None
    if os.environ.get(table.ENV):
        return table.verdicts_of(table.load(os.environ[table.ENV]))
    return None, None


def exit_status(result):
    """1 when a step failed, a GPU test failed or a variant failed the gate (steps cut off by their budget are not
    failures; a variant that cannot run here is not either), else 0."""
    failed = [n for n, r in result.get("steps", {}).items() if str(r.get("status", "")).startswith("error")]
    tests = result.get("gpu_tests", {})
    gated = [v for v, r in (result.get("gate") or {}).get("verdicts", {}).items() if r.get("status") == "fail"]
    return 1 if failed or gated or tests.get("returncode") not in (0, None) or tests.get("failed") else 0


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
    if "gate" not in steps:
        check.verdicts, check.forward = earlier_verdicts(run.result)
        check.rebuild()
    try:
        for name in steps:
            budget = budgets[name] if budgets[name] is not None else run.left() - runner.GRACE_S
            runner.run_step(run, name, budget, partial(STEPS[name][1], check=check))
            if name == "gate" and check.verdicts is None:     # the gate itself failed: nothing of ours is trusted
                check.verdicts = {}
                check.rebuild()
                run.result["gate"] = {**run.result.get("gate", {}), "verdicts": {}}
                print("[gate] no verdicts: every kernel variant and path of ours is left out of the later steps",
                      flush=True)
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
