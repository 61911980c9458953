"""Compile every Triton kernel for a GPU target on a machine without one, as Triton's JIT compiles it on the GPU.

Triton's interpreter (how CI runs the kernels) accepts code the real compiler rejects and says nothing about what
the GPU will run. Here the real launchers run on CPU tensors laid out as a HuggingFace model passes them
((B, N, H, D) views, GQA 32/8, N a multiple of 16 like the benchmark's), and every launch goes through Triton's own
JITFunction.run in warm-up mode under a stand-in driver that only names the target (default sm_90, Hopper). So the
JIT's own specialisation decides what is compiled, exactly as on the device: integers equal to 1 become constants,
pointers and integers divisible by 16 are marked so, which is what lets the compiler vectorise and pipeline.
Each compiled variant is checked against the target's shared-memory limit and, with --resources, read: registers,
stack (spills), shared memory, warps, the matrix instruction (HGMMA = Hopper's warpgroup MMA), the software
pipelining depth, and the warpgroup MMA work per loop iteration against the FLOP minimum of the tile.

    TRITON_INTERPRET=0 python bench/compile_check.py              # the fixed configs launchers use
    TRITON_INTERPRET=0 python bench/compile_check.py --autotune   # every autotune candidate (bf16)
    TRITON_INTERPRET=0 python bench/compile_check.py --quick      # the largest variants (tests/bench/test_compile_check.py)
    TRITON_INTERPRET=0 python bench/compile_check.py --resources --only "attention.*bfloat16 D=128 causal"
"""

import argparse
import contextlib
import itertools
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from functools import partial

os.environ["TRITON_INTERPRET"] = "0"
os.environ["ATTNLRP_FAST_AUTOTUNE"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes per block (opt-in maximum)
REPORTED = ("HEAD_DIM", "BLOCK_M", "BLOCK_N", "IS_CAUSAL", "HAS_WINDOW", "HAS_SOFTCAP", "HAS_KPM", "RULE", "DQ_ATOMIC",
            "WARP_SPECIALIZE", "CENTER", "LRP", "ACT")
RULES = ("grad", "attnlrp", "cp")
FWD_VARIANTS = ("portable", "tma", "hopper")


class TargetDriver:
    """Stands in for Triton's CUDA driver where there is no GPU: it names the target and a device 0 and stream 0,
    which is all JITFunction.run needs to specialise and compile (with warmup=True it launches nothing)."""

    def __init__(self, arch):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


@dataclass
class Compiled:
    """One kernel variant as the JIT compiled it."""
    kernel: str
    constexprs: dict
    options: dict
    binary: object = field(repr=False)


@contextlib.contextmanager
def jit_compiling(arch):
    """Within: every launch compiles through JITFunction.run (warm-up mode, the JIT's own specialisation and cache)
    for sm_{arch} and is recorded instead of run; the descriptor forward believes it runs on a Hopper GPU."""
    from attnlrp_fast.kernels import attention_fwd as fwd
    records, real_run, real_device_check = [], JITFunction.run, fwd.descriptor_device_unsupported
    previous = getattr(driver, "_active", None)   # None until a driver was first asked for

    def run(self, *args, grid, warmup=False, **kwargs):
        binary = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        flags = {k: v for k, v in kwargs.items() if k not in options and not isinstance(v, torch.Tensor)}
        records.append(Compiled(self.__name__, flags, options, binary))
        return binary

    driver.set_active(TargetDriver(arch))
    JITFunction.run = run
    fwd.descriptor_device_unsupported = lambda device: None
    try:
        yield records
    finally:
        JITFunction.run = real_run
        fwd.descriptor_device_unsupported = real_device_check
        driver.set_active(previous)


# ---- what runs: HF-layout inputs, per kernel family ---------------------------------------------------------------
def hf_layout(B, heads, N, D, dtype):
    """(B, N, heads, D) memory seen as (B, heads, N, D), as HF attention modules pass q, k, v."""
    return torch.randn(B, N, heads, D).to(dtype).transpose(1, 2)


def attention_cases(dtype, D, masks, autotune, variants, override=None):
    """(label, call) pairs for one dtype, head dim and mask set ("plain", "causal", "all": causal + window + softcap
    + key padding; "rel_bias": causal + key padding + a relative bias, T5's or ALiBi's, which the portable forward
    takes): the forward in each variant, the backward in each rule and dQ mode."""
    from attnlrp_fast.kernels.attention_bwd import attention_bwd
    from attnlrp_fast.kernels.attention_common import CONFIGS, head_dim_block, prune_configs
    from attnlrp_fast.kernels.attention_fwd import attention_fwd

    B, H, Hkv, N = 2, 32, 8, 1024
    kw = ({"causal": True, "window": 256, "softcap": 30.0} if masks == "all" else
          {"causal": True} if masks in ("causal", "rel_bias") else {})
    if masks == "rel_bias":
        kw["rel_bias"] = torch.randn(H, 2 * N - 1)
    kpm = torch.ones(B, N, dtype=torch.bool) if masks in ("all", "rel_bias") else None
    q, k, v = hf_layout(B, H, N, D, dtype), hf_layout(B, Hkv, N, D, dtype), hf_layout(B, Hkv, N, D, dtype)
    o, lse = torch.empty(B, H, N, D, dtype=dtype), torch.empty(B, H, N)
    label = f"{str(dtype)[6:]} D={D} {masks}"

    def candidates(kind):  # what the autotuner would try (after its pruning), or the launcher's own choice
        if override is not None:
            return [override.get(kind, override.get({"dkdv_atomic": "dkdv"}.get(kind)))]
        if not autotune:
            return [None]
        kept = prune_configs(CONFIGS[kind], {}, BLOCK_D=head_dim_block(D))
        return [{"BLOCK_M": c.kwargs["BLOCK_M"], "BLOCK_N": c.kwargs["BLOCK_N"], "num_warps": c.num_warps,
                 "num_stages": c.num_stages} for c in kept]

    cases = []
    for variant in variants:
        kind = {"portable": "fwd", "tma": "fwd_tma", "hopper": "fwd_ws"}[variant]
        for config in candidates(kind):
            cases.append((f"attention_fwd[{variant}] {label} {config or ''}",
                          partial(attention_fwd, q, k, v, kpm, scale=0.1, config=config, variant=variant, **kw)))
    for rule, mode in itertools.product(RULES, ("separate", "atomic")):
        if rule == "cp" and mode == "atomic":   # cp has no dQ
            continue
        dkdv_kind = "dkdv_atomic" if mode == "atomic" else "dkdv"
        dqs = candidates("dq")[:1] if autotune or override else [None]
        for dkdv, dq in itertools.product(candidates(dkdv_kind), dqs):
            config = None if dkdv is None and dq is None else {"dkdv": dkdv, "dq": dq}
            cases.append((f"attention_bwd[{rule},dq={mode}] {label} {config or ''}",
                          partial(attention_bwd, q, q, k, v, o, lse, kpm, scale=0.1, rule=rule, config=config,
                                  dq_mode=mode, **kw)))
        if autotune and mode == "separate" and rule != "cp":
            for dq in candidates("dq")[1:]:
                cases.append((f"attention_bwd[{rule},dq={mode}] {label} dq {dq}",
                              partial(attention_bwd, q, q, k, v, o, lse, kpm, scale=0.1, rule=rule,
                                      config={"dkdv": candidates(dkdv_kind)[0], "dq": dq}, dq_mode=mode, **kw)))
    return cases


def norm_glu_cases(dtype, D):
    from attnlrp_fast.kernels.glu import activation_bwd, activation_fwd, glu_bwd, glu_fwd
    from attnlrp_fast.kernels.norm import norm_bwd, norm_fwd

    rows = 4096
    x, w, stats = torch.randn(rows, D).to(dtype), torch.randn(D).to(dtype), torch.empty(rows)
    tag = f"{str(dtype)[6:]} D={D}"
    cases = []
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


def decode_cases(dtype, D, masks):
    """(label, call) pairs of the split-KV decode forward (kernels/attention_decode.py, its merge included) on a
    4096-key cache, GQA 32/8 in the HF layout: one query row (4 rows per group, padded to 16) and 16 (64 rows)."""
    from attnlrp_fast.kernels.attention_decode import attention_decode

    B, H, Hkv, M = 2, 32, 8, 4096
    kw = ({"causal": True, "window": 256, "softcap": 30.0} if masks == "all" else
          {"causal": True} if masks == "causal" else {})
    kpm = torch.ones(B, M, dtype=torch.bool) if masks == "all" else None
    k, v = hf_layout(B, Hkv, M, D, dtype), hf_layout(B, Hkv, M, D, dtype)
    return [(f"attention_decode {str(dtype)[6:]} D={D} {masks} N={N}",
             partial(attention_decode, hf_layout(B, H, N, D, dtype), k, v, kpm, scale=0.1, **kw)) for N in (1, 16)]


def forward_variants():
    """The forward variants this Triton compiles: "hopper" (warp-specialised) only with the version it is made for."""
    from attnlrp_fast.kernels.attention_fwd import WARP_SPECIALIZED_TRITON, _triton_version

    return FWD_VARIANTS if _triton_version() == WARP_SPECIALIZED_TRITON else FWD_VARIANTS[:2]


def record_cases(autotune, quick=False, override=None):
    """(label, call) pairs: each call runs one launcher on CPU tensors (compiled, not run, under jit_compiling)."""
    variants = forward_variants()
    if quick:  # the largest tiles in each dtype class, the benchmark's masks and every flag on
        grid = [(torch.bfloat16, 128, "causal"), (torch.bfloat16, 128, "all"), (torch.bfloat16, 256, "all"),
                (torch.float32, 64, "all"), (torch.bfloat16, 64, "rel_bias")]
    elif autotune:  # every candidate, at the shapes a GPU model runs
        grid = list(itertools.product((torch.bfloat16,), (64, 128, 256), ("causal", "all")))
    else:
        grid = list(itertools.product((torch.bfloat16, torch.float16, torch.float32), (64, 80, 128, 256),
                                      ("plain", "causal", "all", "rel_bias")))
    cases = []
    for dtype, D, masks in grid:
        usable = [v for v in variants if v == "portable" or (dtype != torch.float32 and masks != "rel_bias" and
                                                             not (v == "hopper" and masks == "all"))]
        cases += attention_cases(dtype, D, masks, autotune, usable, override)
        if masks != "rel_bias" and not autotune and (not quick or (dtype, D) == (torch.bfloat16, 128)):
            cases += decode_cases(dtype, D, masks)
    norms = [(torch.bfloat16, 4096)] if quick else list(itertools.product((torch.bfloat16, torch.float32), (96, 4096)))
    for dtype, D in norms:
        cases += norm_glu_cases(dtype, D)
    return cases


# ---- reading a compiled kernel ------------------------------------------------------------------------------------
def _tool(name):
    """A binary shipped with Triton's NVIDIA backend (ptxas, cuobjdump)."""
    import triton.backends.nvidia as nv

    return os.path.join(os.path.dirname(nv.__file__), "bin", name)


def cubin_resources(binary):
    """What ptxas made of a kernel, read off its cubin: registers per thread, stack frame bytes (local memory: in
    these kernels, spilled registers) and the matrix instruction in the SASS (HGMMA = Hopper's warpgroup MMA, HMMA =
    the older warp MMA, '-' none)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(binary.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    mma = "HGMMA" if "HGMMA" in sass else "HMMA" if "HMMA" in sass else "-"
    return {"registers": int(regs.group(1)) if regs else None, "stack": int(stack.group(1)) if stack else None,
            "mma": mma}


def pipeline_depth(binary):
    """Loads in flight across loop iterations, read off the TTGIR: the largest `num` of an async_wait (cp.async
    pipelining: 0 = each wait drains every copy) or, with tensor descriptors, the number of shared-memory buffers
    the TMA copies cycle through (the leading dim of the multi-buffered allocations)."""
    ttgir = binary.asm["ttgir"]
    waits = [int(n) for n in re.findall(r"async_wait[^\n]*\{num = (\d+)", ttgir)]
    buffers = [int(n) for n in re.findall(r"local_alloc[^\n]*!ttg\.memdesc<(\d+)x\d+x\d+x", ttgir)]
    return max(waits + [b - 1 for b in buffers] + [0])


WGMMA = re.compile(r"wgmma\.mma_async\S*\.m(\d+)n(\d+)k(\d+)")


def mma_groups(ptx):
    """The warpgroup MMA groups of a kernel's PTX: each tl.dot becomes one run of wgmma instructions (its k-steps)
    closed by wgmma.commit_group. Returns each group's work, the sum of m * n * k, for one warpgroup."""
    groups, work = [], 0
    for line in ptx.splitlines():
        m = WGMMA.search(line)
        if m:
            work += int(m.group(1)) * int(m.group(2)) * int(m.group(3))
        elif "wgmma.commit_group" in line and work:
            groups.append(work)
            work = 0
    return groups


def products(rec):
    """How many matrix products one loop iteration of an attention kernel does: Q K^T and P V in the forward (and the
    decode forward); S^T, dV, dP^T, dK (and dS^T K with atomic dQ; only S^T and dV for cp) in dK/dV; S, dP, dQ in
    dQ."""
    if rec.kernel.startswith(("attention_fwd", "attention_decode_kernel")):
        return 2
    if rec.kernel == "attention_bwd_dq_kernel":
        return 3
    return 2 if rec.constexprs["RULE"] == 2 else 4 + bool(rec.constexprs["DQ_ATOMIC"])


def mma_check(rec):
    """What the warpgroup MMA does per loop iteration, read off the PTX: the number of products it computes (each
    tl.dot on the warpgroup MMA is one group of wgmma closed by a commit; fewer than products() means some product
    fell back to the older MMA; a multiple where the kernel has two loops, unmasked and masked blocks) and what each
    group computes over the warpgroups that run it, as a multiple of one
    tile product BLOCK_M * BLOCK_N * BLOCK_D (every product in these kernels has that size). All 1.0 and every
    product there: no product is computed twice, one iteration does exactly its FLOP minimum. Above 1: warpgroups
    repeat each other's work (a 64-row tile on 8 warps). Without warp specialisation all num_warps / 4 warpgroups
    run each group; warp-specialised, each consumer partition runs its own copy of the loop on its share of the
    rows, so a group times the number of consumer warpgroups is one product."""
    c = rec.constexprs
    tile = c["BLOCK_M"] * c["BLOCK_N"] * c["BLOCK_D"]
    ttgir = rec.binary.asm["ttgir"]
    copies = 1
    if "ttg.warp_specialize" in ttgir:
        parts = [p for p in re.split(r"\n\s*partition\d+\(", ttgir)[1:] if "warp_group_dot" in p]
        warps = [int(re.search(r"\) num_warps\((\d+)\) \{", p).group(1)) for p in parts]
        copies, warpgroups = len(parts), len(parts) * max(warps) // 4
    else:
        warpgroups = rec.binary.metadata.num_warps // 4
    groups = mma_groups(rec.binary.asm["ptx"])
    return {"mma_per_tile": sorted({round(g * warpgroups / tile, 3) for g in groups}),
            "mma_products": f"{len(groups) // copies}/{products(rec)}"}


# ---- the check ----------------------------------------------------------------------------------------------------
def compile_cases(cases, arch):
    """Run each case under jit_compiling: (records as (label, Compiled)), failures as strings."""
    failures, seen = [], set()
    out = []
    with jit_compiling(arch) as records:
        for label, call in cases:
            start = len(records)
            try:
                call()
            except Exception as e:  # report every failing variant, not only the first
                failures.append(f"{label}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}")
                continue
            for rec in records[start:]:
                if id(rec.binary) in seen:      # the JIT's cache: the same specialisation compiled once
                    continue
                seen.add(id(rec.binary))
                out.append((label, rec))
                if rec.binary.metadata.shared > SHARED_LIMIT.get(arch, 232448):
                    failures.append(f"{label}: {rec.kernel} needs {rec.binary.metadata.shared} bytes of shared memory")
    return out, failures


def specialisation(binary):
    """What the JIT's specialisation did to the kernel's integer and pointer arguments, read off the TTGIR
    signature: the arguments marked divisible by 16, and the arguments left in it (those equal to 1 became
    constants and are gone from it)."""
    ttgir = binary.asm["ttgir"]
    head = ttgir[ttgir.index("tt.func public"):]
    head = head[:head.index("{\n")]
    present = re.findall(r"%(\w+): ", head)
    divisible = re.findall(r"%(\w+): [^{,]*\{tt\.divisibility = 16", head)
    return {"divisible_by_16": divisible, "in_signature": present}


def describe(rec):
    """The resources line of one variant (and its numbers)."""
    info = dict(cubin_resources(rec.binary), shared=rec.binary.metadata.shared, warps=rec.binary.metadata.num_warps,
                pipeline=pipeline_depth(rec.binary), **specialisation(rec.binary))
    attention = ("attention_fwd", "attention_decode_kernel", "attention_bwd_dkdv", "attention_bwd_dq")
    if rec.kernel.startswith(attention) and info["mma"] == "HGMMA":
        info.update(mma_check(rec))
    flags = " ".join(f"{k}={rec.constexprs[k]}" for k in REPORTED if k in rec.constexprs)
    conf = " ".join(f"{k}={v}" for k, v in rec.options.items())
    ratio = ""
    if "mma_per_tile" in info:
        ratio = (f"  products {info['mma_products']}  per tile " + ",".join(f"{w:g}" for w in info["mma_per_tile"]))
    line = (f"{rec.kernel:<28} {flags:<84} {conf:<24} regs {info['registers']:>3}  stack {info['stack']:>4} B  "
            f"shared {info['shared']:>6} B  warps {info['warps']:>2}  pipeline {info['pipeline']}  {info['mma']}{ratio}")
    return line, info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = Hopper)")
    p.add_argument("--autotune", action="store_true", help="every autotune candidate instead (bf16, slow)")
    p.add_argument("--quick", action="store_true", help="the largest variants only (the test suite)")
    p.add_argument("--resources", action="store_true",
                   help="also print registers, spills, shared memory, warps, pipelining, MMA kind and MMA work per "
                        "loop iteration against its minimum, per variant")
    p.add_argument("--config", type=json.loads, default=None, metavar="JSON",
                   help='launch configurations per kernel kind instead of the launchers\' own, e.g. \'{"dkdv": '
                        '{"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 1}}\' (kinds: fwd, fwd_tma, '
                        'fwd_ws, dkdv, dq; a kind left out keeps its own)')
    p.add_argument("--json", default=None, metavar="PATH", help="with --resources: also write every variant's "
                                                                "numbers (and its specialisation) to this file")
    p.add_argument("--only", default=None, metavar="REGEX", help="only the variants whose label matches, e.g. "
                                                                   "'attention.*bfloat16 D=128 causal'")
    args = p.parse_args(argv)

    t0 = time.time()
    cases = record_cases(args.autotune, args.quick, args.config)
    if args.only:
        cases = [(label, call) for label, call in cases if re.search(args.only, label)]
        if not cases:
            p.error(f"--only {args.only!r} matches no variant")
    compiled, failures = compile_cases(cases, args.arch)
    print(f"compiled {len(compiled)} kernel variants for sm_{args.arch} with Triton {triton.__version__} "
          f"(the JIT's own specialisation) in {time.time() - t0:.0f} s")
    if args.resources:
        rows = []
        for label, rec in compiled:
            line, info = describe(rec)
            rows.append({"label": label, "kernel": rec.kernel, "constexprs": rec.constexprs, "options": rec.options,
                         **info})
            print(line, flush=True)
        print(f"{sum(bool(r['stack']) for r in rows)} of {len(rows)} variants use a stack frame (spilled registers)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"triton": triton.__version__, "arch": args.arch, "variants": rows,
                           "failures": failures}, f, indent=1, default=str)
    for f in failures:
        print("FAIL", f)
    print(f"{len(compiled)} compiled, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
