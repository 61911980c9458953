"""Compile every Triton kernel ahead of time for a GPU target, on a machine without a GPU.

Triton's interpreter (how CI runs the kernels) accepts code the real compiler rejects (non-constexpr globals,
tl.dot shapes under 16, unsupported casts) and says nothing about shared memory. This script runs the real
launchers with CPU tensors, records each launch instead of running it, and compiles the recorded launch with
Triton's compiler and ptxas for the target (default sm_90, Hopper), checking the shared memory each variant
needs against the target's limit.

    TRITON_INTERPRET=0 python bench/compile_check.py              # the fixed configs launchers use
    TRITON_INTERPRET=0 python bench/compile_check.py --autotune   # every autotune candidate (bf16)
    TRITON_INTERPRET=0 python bench/compile_check.py --quick      # the largest variants (tests/test_gpu_compile.py)
"""

import argparse
import itertools
import os
import re
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"
os.environ["ATTNLRP_FAST_AUTOTUNE"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes per block (opt-in maximum)
REPORTED = ("HEAD_DIM", "BLOCK_M", "BLOCK_N", "IS_CAUSAL", "HAS_WINDOW", "HAS_SOFTCAP", "HAS_KPM", "RULE", "DQ_ATOMIC",
            "center", "LRP", "ACT")
TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
         torch.uint8: "u8", torch.int8: "i8", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}


class Recorder:
    """Stands in for JITFunction.run: keeps (kernel, bound arguments, launch options) instead of launching."""

    def __init__(self):
        self.launches = []

    def __call__(self, fn, *args, grid=None, warmup=False, **kwargs):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        bound = dict(zip(fn.arg_names, args))
        bound.update(kwargs)
        self.launches.append((fn, bound, options))


def signature(fn, bound):
    sig, constexprs = {}, {}
    for i, name in enumerate(fn.arg_names):
        value = bound[name]
        if i in fn.constexprs:
            sig[name] = "constexpr"
            constexprs[(i,)] = value
        elif isinstance(value, torch.Tensor):
            sig[name] = "*" + TYPES[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={value!r}")
    return sig, constexprs


def compile_launch(fn, bound, options, arch):
    sig, constexprs = signature(fn, bound)
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                          target=GPUTarget("cuda", arch, 32), options=options)


def _tool(name):
    """A binary shipped with Triton's NVIDIA backend (ptxas, cuobjdump)."""
    import triton.backends.nvidia as nv

    return os.path.join(os.path.dirname(nv.__file__), "bin", name)


def resources(kernel):
    """What ptxas made of a compiled kernel, read off its cubin: registers per thread, stack frame bytes (local
    memory: in these kernels, spilled registers), shared memory, and which matrix instruction the SASS uses (HGMMA
    = Hopper's warpgroup MMA, HMMA = the older warp MMA, '-' none)."""
    import re
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    mma = "HGMMA" if "HGMMA" in sass else "HMMA" if "HMMA" in sass else "-"
    return {"registers": int(regs.group(1)) if regs else None, "stack": int(stack.group(1)) if stack else None,
            "shared": kernel.metadata.shared, "mma": mma}


def record_cases(autotune, quick=False):
    """(label, call) pairs: each call runs one launcher on small CPU tensors (under the recorder)."""
    from functools import partial

    from attnlrp_fast.kernels import attention_bwd, attention_fwd
    from attnlrp_fast.kernels.attention_common import CONFIGS, head_dim_block, prune_configs
    from attnlrp_fast.kernels.glu import activation_bwd, activation_fwd, glu_bwd, glu_fwd
    from attnlrp_fast.kernels.norm import norm_bwd, norm_fwd

    cases = []

    def as_dict(c):
        return {"BLOCK_M": c.kwargs["BLOCK_M"], "BLOCK_N": c.kwargs["BLOCK_N"], "num_warps": c.num_warps,
                "num_stages": c.num_stages}

    def candidates(configs, D):  # what the autotuner would try for this head dim (after its pruning)
        return [as_dict(c) for c in prune_configs(configs, {}, BLOCK_D=head_dim_block(D))] if autotune else [None]

    # masks: "plain" (none), "causal" (the benchmark's), "all" (causal, window, softcap, key padding)
    variants = itertools.product((torch.bfloat16, torch.float16, torch.float32), (64, 80, 128, 256),
                                 ("plain", "causal", "all"))
    if quick:  # the largest tiles in each dtype class, every flag on
        variants = [(torch.bfloat16, 128, "all"), (torch.bfloat16, 256, "all"), (torch.float32, 64, "all")]
    elif autotune:  # every candidate, at the shapes a GPU model runs
        variants = itertools.product((torch.bfloat16,), (64, 128, 256), ("causal", "all"))
    for dtype, D, masks in variants:
        kw = ({"causal": True, "window": 64, "softcap": 30.0} if masks == "all" else
              {"causal": True} if masks == "causal" else {})
        kpm = torch.ones(1, 40, dtype=torch.bool) if masks == "all" else None
        q, k, v = (torch.randn(1, h, 40, D, dtype=dtype) for h in (4, 2, 2))
        o, lse = torch.empty_like(q), torch.empty(1, 4, 40)
        label = f"{str(dtype)[6:]} D={D} {masks}"
        for config in candidates(CONFIGS["fwd"], D):
            cases.append((f"attention_fwd {label} {config or ''}",
                          partial(attention_fwd, q, k, v, kpm, scale=0.1, config=config, **kw)))
        for config, rule in itertools.product(candidates(CONFIGS["dkdv"], D), ("grad", "attnlrp", "cp")):
            cases.append((f"attention_bwd[{rule}] {label} {config or ''}",
                          partial(attention_bwd, q, q, k, v, o, lse, kpm, scale=0.1, rule=rule, config=config,
                                  dq_mode="separate", **kw)))
            if rule != "cp":  # dQ by atomics in the dK/dV launch (cp has no dQ)
                cases.append((f"attention_bwd[{rule},dq=atomic] {label} {config or ''}",
                              partial(attention_bwd, q, q, k, v, o, lse, kpm, scale=0.1, rule=rule, config=config,
                                      dq_mode="atomic", **kw)))
    for dtype, D in [(torch.bfloat16, 4096)] if quick else itertools.product((torch.bfloat16, torch.float32), (96, 4096)):
        x, w, stats = torch.randn(3, D, dtype=dtype), torch.randn(D, dtype=dtype), torch.empty(3)
        tag = f"{str(dtype)[6:]} D={D}"
        for center in (False, True):
            name = "layer_norm" if center else "rms_norm"
            cases.append((f"{name}_fwd {tag}", partial(norm_fwd, x, w, w if center else None, 1e-5, center=center)))
            for lrp in (False, True):
                cases.append((f"{name}_bwd[{'lrp' if lrp else 'grad'}] {tag}",
                              partial(norm_bwd, x, x, w, stats if center else None, stats, lrp=lrp, need_dw=True,
                                      need_db=center)))
        for act in ("silu", "gelu", "gelu_tanh"):
            cases.append((f"glu_fwd[{act}] {tag}", partial(glu_fwd, x, x, act=act)))
            for lrp in (False, True):
                cases.append((f"glu_bwd[{act},{'lrp' if lrp else 'grad'}] {tag}", partial(glu_bwd, x, x, x, act=act,
                                                                                           lrp=lrp)))
        for act in ("silu", "gelu", "gelu_tanh", "tanh", "relu"):
            cases.append((f"activation_fwd[{act}] {tag}", partial(activation_fwd, x, act=act)))
            for lrp in (False, True):
                cases.append((f"activation_bwd[{act},{'lrp' if lrp else 'grad'}] {tag}",
                              partial(activation_bwd, x, x, act=act, lrp=lrp)))
    return cases


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = Hopper)")
    p.add_argument("--autotune", action="store_true", help="every autotune candidate instead (bf16, slow)")
    p.add_argument("--quick", action="store_true", help="the largest variants only (about a minute; the test suite)")
    p.add_argument("--resources", action="store_true",
                   help="also print registers, stack (spill) bytes, shared memory and the MMA instruction of each variant")
    p.add_argument("--only", default=None, metavar="REGEX", help="only the variants whose label matches, e.g. "
                                                                   "'attention.*bf16 D=128 causal'")
    args = p.parse_args(argv)

    report = []
    recorder = Recorder()
    JITFunction.run = lambda self, *a, **kw: recorder(self, *a, **kw)
    failures, seen, compiled = [], set(), 0
    t0 = time.time()
    cases = record_cases(args.autotune, args.quick)
    if args.only:
        cases = [(label, call) for label, call in cases if re.search(args.only, label)]
        if not cases:
            p.error(f"--only {args.only!r} matches no variant")
    for label, call in cases:
        start = len(recorder.launches)
        call()
        for fn, bound, options in recorder.launches[start:]:
            key = (fn.__name__, tuple(sorted((k, str(v) if not isinstance(v, torch.Tensor) else str(v.dtype))
                                             for k, v in bound.items())), tuple(sorted(options.items())))
            if key in seen:
                continue
            seen.add(key)
            try:
                kernel = compile_launch(fn, bound, options, args.arch)
                compiled += 1
                shared = kernel.metadata.shared
                if shared > SHARED_LIMIT.get(args.arch, 232448):
                    failures.append(f"{label}: {fn.__name__} needs {shared} bytes of shared memory")
                if args.resources:
                    r = resources(kernel)
                    flags = " ".join(f"{k}={bound[k]}" for k in REPORTED if k in bound)
                    conf = " ".join(f"{k}={v}" for k, v in options.items())
                    report.append((fn.__name__, flags, conf, r))
                    print(f"{fn.__name__:<28} {flags:<70} {conf:<26} regs {r['registers']:>3}  stack "
                          f"{r['stack']:>4} B  shared {r['shared']:>6} B  {r['mma']}", flush=True)
            except Exception as e:  # report every failing variant, not only the first
                failures.append(f"{label}: {fn.__name__}: {type(e).__name__}: {str(e).splitlines()[-1][:300]}")
    print(f"compiled {compiled} kernel variants for sm_{args.arch} in {time.time() - t0:.0f} s")
    for f in failures:
        print("FAIL", f)
    print(f"{compiled - len(failures)} passed, {len(failures)} failed")
    if args.resources:
        spilling = [r for r in report if r[3]["stack"]]
        print(f"{len(spilling)} of {len(report)} variants use a stack frame (spilled registers)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
