"""The correctness gate of a GPU run: every attention kernel variant and path against float64 before anything is
timed. Each unit of cases runs in its own process with a time limit (a hang is killed and fails as "timed out"),
units run in parallel (compiling dominates), and each case's result is appended to the run's JSON-lines log as it
finishes, so a run cut short keeps every case that finished. A variant with a failing case (over its tolerance, an
exception, a crash, a hang) is gated out: the later steps never run it and the dispatch table names it under
"gated_out".

  forward   attention_fwd(variant=hopper | tma | portable): O and LSE; D = 64 and 128; plain, causal, key padding,
            both; GQA 8/2 at N = 1000, M = 1037 (off the block sizes); bf16 and fp16
  decode    attention_fwd(variant="decode"), where FWD_VARIANTS has it: N = 1, 5 and 16 queries, M = 5000 keys
  backward  attention_bwd(dq_mode=separate | atomic) from the float64 forward's O and LSE (so a forward variant's
            fault cannot show here): dQ, dK, dV of each rule (grad, attnlrp, cp), plain and causal; with key padding
            (grad, attnlrp) in bf16, the timed dtype
  sdpa      af.attention(backend="torch") on CUDA tensors (torch's fused SDPA kernels): output and gradients under
            grad and attnlrp, with and without key padding, GQA, causal with N < M

Tolerances (as in the test suite, tests/helpers.py): ||out - ref|| / ||ref|| below 2e-2 (bf16), 1e-2 (fp16), 1e-4 (fp32); the LSE below 1e-3.
A case a variant cannot take here (the warp-specialised loop with key padding, the descriptor kernels off Hopper or
in fp32) is "unsupported" with its reason, not a failure; a variant that can take none of its cases is gated out as
unsupported. Smoke mode (CPU, Triton's interpreter): tiny sizes, fp16 and fp32 (the interpreter's bf16 dot is wrong).

    python bench/gate.py                          # every unit in parallel (CUDA); prints the verdicts
    python bench/gate.py --unit forward:tma:bfloat16:d64+128 --log gate.jsonl   # one unit, as the gate runs it
    TRITON_INTERPRET=1 python bench/gate.py --smoke

BENCH_GATE_FORCE="tma:fail,dq=atomic:hang" makes the units of those variants fail, hang or crash (to check the
harness: fail | hang | crash).
"""

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import time
import traceback
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

if __package__:   # imported as bench.<module> (the tests)
    from . import runner
else:             # run as a script (python bench/<module>.py): its folder is sys.path[0]
    import runner

GATE_PY = Path(__file__).resolve()
FORWARDS = ("hopper", "tma", "portable")         # the flash forwards, in the order of preference before timings
DQ_MODES = ("separate", "atomic")
FEATURES = ("plain", "causal", "padding", "causal+padding")
RULES = ("grad", "attnlrp", "cp")
TOL = {"bfloat16": 2e-2, "float16": 1e-2, "float32": 1e-4}
LSE_TOL = 1e-3
UNIT_LIMIT_S = 60.0
FORCE_ENV = "BENCH_GATE_FORCE"


@dataclass(frozen=True)
class Unit:
    """Cases of one variant that run in one process: every dtype x head dim x feature (x rule) combination."""
    kind: str                   # forward | decode | backward | sdpa
    variant: str                # what the verdict is about: hopper | tma | portable | decode | dq=... | sdpa
    dtypes: tuple
    dims: tuple
    features: tuple
    rules: tuple = ("grad",)
    queries: tuple = ()         # decode: N of each case

    @property
    def name(self):
        mode = self.variant.removeprefix("dq=")
        parts = [self.kind] + ([mode] if mode != self.kind else []) + ["+".join(self.dtypes),
                                                                     "d" + "+".join(map(str, self.dims))]
        if self.kind == "backward" and "padding" in self.features[0]:
            parts.append("padding")
        return ":".join(parts)

    def cases(self):
        out = []
        for dtype in self.dtypes:
            for D in self.dims:
                for i, feature in enumerate(self.features):
                    if self.kind == "decode":
                        out.append(Case(dtype, D, feature, "grad", self.queries[i % len(self.queries)]))
                        continue
                    out += [Case(dtype, D, feature, rule) for rule in self.rules]
        return out

    def compiles(self):
        """About how many Triton kernels the unit compiles (its place in the queue: the longest start first)."""
        n = len(self.dtypes) * len(self.dims)
        if self.kind == "sdpa":
            return 1
        if self.kind in ("forward", "decode"):
            return n * len(self.features) * (2 if self.kind == "decode" else 1)
        scored = len([r for r in self.rules if r != "cp"])
        return n * (1 + len(self.features) * (len(self.rules) + (scored if self.variant == "dq=separate" else 0)))


@dataclass(frozen=True)
class Case:
    dtype: str
    D: int
    feature: str
    rule: str
    N: int = 0                  # 0: the unit's default

    @property
    def name(self):
        n = f" N={self.N}" if self.N else ""
        return f"{self.dtype} D={self.D} {self.feature} {self.rule}{n}"


def units(smoke=False, forwards=FORWARDS, decode=False):
    """The gate's units, longest first. On a GPU one unit per variant x dtype (x head dim, and with and without key
    padding, for the backward); in the smoke run one per variant (the interpreter's cases are small, a process
    costs more than they do)."""
    half = ("float16", "float32") if smoke else ("bfloat16", "float16")
    dims = (16,) if smoke else (64, 128)
    groups = [half] if smoke else [(d,) for d in half]
    dim_groups = [dims] if smoke else [(d,) for d in dims]
    out = []
    for mode in DQ_MODES:
        if smoke:
            out.append(Unit("backward", f"dq={mode}", half, dims, ("causal", "causal+padding"), RULES))
            continue
        for dt in groups:
            for ds in dim_groups:
                out.append(Unit("backward", f"dq={mode}", dt, ds, ("plain", "causal"), RULES))
        for ds in dim_groups:   # key padding in the dtype the later steps time
            out.append(Unit("backward", f"dq={mode}", ("bfloat16",), ds, ("padding", "causal+padding"),
                            ("grad", "attnlrp")))
    for variant in forwards:
        for dt in groups:
            out.append(Unit("forward", variant, dt, dims, FEATURES))
    if decode:
        for dt in groups:
            out.append(Unit("decode", "decode", dt, dims, ("plain", "causal", "causal+padding"),
                            queries=(1, 16, 5)))
    for dt in groups:
        out.append(Unit("sdpa", "sdpa", dt, dims, FEATURES, ("grad", "attnlrp")))
    return sorted(out, key=lambda u: -u.compiles())


def available_units(smoke=False):
    """units() for the forward variants this checkout's attention_fwd has ("decode" only where it has it)."""
    from attnlrp_fast.kernels.attention_fwd import FWD_VARIANTS

    return units(smoke, tuple(v for v in FORWARDS if v in FWD_VARIANTS), "decode" in FWD_VARIANTS)


# --- one unit, in its own process -------------------------------------------------------------------------------
def sizes(kind, smoke):
    """(B, H, Hkv, N, M) of a unit's cases (decode: N comes from the case)."""
    if smoke:
        return (1, 2, 1, 20, 37) if kind != "decode" else (1, 4, 2, 0, 150)
    return (2, 8, 2, 1000, 1037) if kind != "decode" else (2, 8, 2, 0, 5000)


def inputs(unit, case, smoke, device):
    """q, k, v as HF passes them ((B, N, H, D) transposed views), dO, and the key padding mask (or None)."""
    import torch

    B, H, Hkv, N, M = sizes(unit.kind, smoke)
    N = case.N or N
    dtype = getattr(torch, case.dtype)
    g = torch.Generator().manual_seed(zlib.crc32(f"{unit.name} {case.name}".encode()))

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)
    q, k, v = rand(B, N, H, case.D).transpose(1, 2), rand(B, M, Hkv, case.D).transpose(1, 2), \
        rand(B, M, Hkv, case.D).transpose(1, 2)
    do = rand(B, H, N, case.D)
    kpm = (torch.rand(B, M, generator=g) > 0.2).to(device) if "padding" in case.feature else None
    return q, k, v, do, kpm


def _unsupported(variant, q, k, v, kpm):
    """Why attention_fwd's `variant` cannot take these tensors here (None when it can)."""
    from attnlrp_fast.kernels.attention_fwd import forward_variant

    try:
        forward_variant(q, k, v, kpm, variant=variant)
    except ValueError as e:
        return str(e)
    return None


def check_forward(unit, case, q, k, v, kpm):
    import torch

    from attnlrp_fast.kernels.attention_fwd import attention_fwd
    from attnlrp_fast.reference import attention_dense
    from attnlrp_fast.selfcheck import rel_err

    why = _unsupported(unit.variant, q, k, v, kpm)
    if why:
        return {"status": "unsupported", "why": why}
    causal = "causal" in case.feature
    o, lse = attention_fwd(q, k, v, kpm, causal=causal, scale=case.D ** -0.5, variant=unit.variant)
    ref, ref_lse = attention_dense(q.double(), k.double(), v.double(), causal=causal, key_padding_mask=kpm,
                                   return_lse=True)
    finite = torch.isfinite(ref_lse)          # rows that see no key: +inf in both
    same_rows = torch.equal(finite, torch.isfinite(lse))
    errors = {"o": rel_err(o, ref), "lse": rel_err(lse[finite], ref_lse[finite]) if same_rows else float("inf")}
    return _verdict(errors, {"o": TOL[case.dtype], "lse": LSE_TOL})


def check_backward(unit, case, q, k, v, do, kpm):
    import torch

    from attnlrp_fast.kernels.attention_bwd import attention_bwd
    from attnlrp_fast.reference import attention_dense
    from attnlrp_fast.selfcheck import dense_reference, rel_err

    causal = "causal" in case.feature
    kw = dict(causal=causal, key_padding_mask=kpm)
    with torch.no_grad():
        o, lse = attention_dense(q.double(), k.double(), v.double(), return_lse=True, **kw)
    grads = attention_bwd(do, q, k, v, o.to(q.dtype), lse.float(), kpm, causal=causal, scale=case.D ** -0.5,
                          rule=case.rule, dq_mode=unit.variant.removeprefix("dq="))
    refs = dense_reference(q, k, v, do, rule=case.rule, **kw)[1:]
    errors = {name: rel_err(a, b) for name, a, b in zip(("dq", "dk", "dv"), grads, refs)}
    return _verdict(errors, dict.fromkeys(errors, TOL[case.dtype]))


def check_sdpa(unit, case, q, k, v, do, kpm):
    from attnlrp_fast.selfcheck import attention_errors

    errors = attention_errors(q, k, v, do, backend="torch", rule=case.rule, causal="causal" in case.feature,
                              key_padding_mask=kpm)
    return _verdict(errors, dict.fromkeys(errors, TOL[case.dtype]))


def _verdict(errors, tols):
    bad = {n: e for n, e in errors.items() if not e < tols[n]}      # inf and nan are never below
    out = {"status": "fail" if bad else "pass",
           "errors": {n: float(f"{e:.3g}") if math.isfinite(e) else str(e) for n, e in errors.items()}}
    if bad:
        out["why"] = ", ".join(f"{n} {e:.3g} > {tols[n]:g}" for n, e in bad.items())
    return out


def forced(variant):
    """The mode BENCH_GATE_FORCE names for `variant` (fail | hang | crash), or None."""
    for item in os.environ.get(FORCE_ENV, "").split(","):
        name, _, mode = item.strip().rpartition(":")
        if name == variant:
            return mode
    return None


def run_unit(unit, smoke, log=None):
    """Every case of `unit`, one JSON line each on stdout (and appended to `log`); returns the lines."""
    import torch

    device = "cpu" if smoke else "cuda"
    started, lines = time.monotonic(), []
    mode = forced(unit.variant)
    if mode == "hang":
        time.sleep(3600)
    if mode == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    for i, case in enumerate(unit.cases()):
        t = time.perf_counter()
        try:
            if mode == "fail":
                raise AssertionError(f"forced by {FORCE_ENV}")
            q, k, v, do, kpm = inputs(unit, case, smoke, device)
            if unit.kind in ("forward", "decode"):
                out = check_forward(unit, case, q, k, v, kpm)
            elif unit.kind == "backward":
                out = check_backward(unit, case, q, k, v, do, kpm)
            else:
                out = check_sdpa(unit, case, q, k, v, do, kpm)
        except Exception as e:  # noqa: BLE001 - compile errors, out of resources, launch errors: the case fails
            out = {"status": "fail", "why": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}",
                   "traceback": traceback.format_exc().splitlines()[-4:]}
        if device == "cuda":
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()
        line = {"t": round(time.monotonic() - started, 1), "step": "gate", "event": "case", "unit": unit.name,
                "variant": unit.variant, "case": case.name, "index": i, **out,
                "seconds": round(time.perf_counter() - t, 2)}
        lines.append(line)
        print(json.dumps(line), flush=True)
        if log:
            runner.append_line(log, line)
    return lines


# --- the gate: units in parallel, verdicts --------------------------------------------------------------------
def unit_verdict(unit, lines, status):
    """{"status": pass | fail | unsupported, "why"} of one unit from its case lines and its process's end."""
    total = len(unit.cases())
    failed = [ln for ln in lines if ln.get("status") == "fail"]
    if failed:
        first = failed[0]
        return {"status": "fail", "why": f"{unit.name}: {first['case']}: {first.get('why')}"}
    if status is None:
        return {"status": "fail", "why": f"{unit.name}: not run (the gate's time ran out)"}
    if status.get("timed_out"):
        what = "not finished when the gate's time ran out" if status.get("cut_by_gate") else "timed out"
        return {"status": "fail", "why": f"{unit.name}: {what} after {status['seconds']:.0f} s "
                                         f"({len(lines)} of {total} cases done)"}
    if status.get("returncode") != 0 or len(lines) < total:
        return {"status": "fail", "why": f"{unit.name}: the process exited with status {status.get('returncode')} "
                                         f"after {len(lines)} of {total} cases"}
    if all(ln.get("status") == "unsupported" for ln in lines):
        return {"status": "unsupported", "why": f"cannot run here: {lines[0].get('why')}" if lines else "no cases"}
    return {"status": "pass", "why": None}


def verdicts(unit_results):
    """{variant: {"status", "why", "units", "cases": {status: count}}} over the units of each variant: fail when a
    unit failed, unsupported when none could run a case here, else pass."""
    by_variant = {}
    for res in unit_results.values():
        by_variant.setdefault(res["variant"], []).append(res)
    out = {}
    for variant, results in by_variant.items():
        unit_verdicts = [r["verdict"] for r in results]
        failed = next((v for v in unit_verdicts if v["status"] == "fail"), None)
        if failed:
            status, why = "fail", failed["why"]
        elif all(v["status"] == "unsupported" for v in unit_verdicts):
            status, why = "unsupported", unit_verdicts[0]["why"]
        else:
            status, why = "pass", None
        cases = Counter(ln["status"] for r in results for ln in r["lines"])
        out[variant] = {"status": status, "why": why, "units": len(results), "cases": dict(sorted(cases.items()))}
    return out


def run_gate(unit_list, smoke, log, seconds, jobs=None, unit_timeout=UNIT_LIMIT_S, cuda=False, on_unit=None):
    """Run the units in parallel processes (at most `jobs`, default one per CPU core), each killed after
    `unit_timeout` seconds, all of them by `seconds`. on_unit(name, result) as each one ends. Returns
    {unit name: {"variant", "status" (the process's end, None if never started), "lines", "verdict"}}."""
    deadline = time.monotonic() + seconds
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(unit_list)))
    env = dict(os.environ, TRITON_INTERPRET="1" if smoke else "0" if cuda else os.environ.get("TRITON_INTERPRET", "0"))
    env.setdefault("OMP_NUM_THREADS", "1")      # many processes at once: one CPU thread each
    for name in ("ATTNLRP_FAST_DISPATCH", "ATTNLRP_FAST_FWD", "ATTNLRP_FAST_DQ"):
        env.pop(name, None)                     # each unit names its variant itself; no table applies yet
    tmp = Path(tempfile.mkdtemp(prefix="gate."))
    pending, running, results = list(unit_list), {}, {}

    def finish(unit, status, path=None, limit=None):
        if status is not None and limit is not None and limit < unit_timeout:
            status = {**status, "cut_by_gate": True}    # its time was what was left of the gate's, not its own
        lines = []
        with contextlib.suppress(OSError, TypeError):
            lines = [ln for ln in map(json_object, Path(path).read_text().splitlines())
                     if ln is not None and ln.get("event") == "case"]
        results[unit.name] = {"variant": unit.variant, "status": status, "lines": lines,
                              "verdict": unit_verdict(unit, lines, status)}
        if on_unit:
            on_unit(unit.name, results[unit.name])

    try:
        while pending or running:
            while pending and len(running) < jobs and deadline - time.monotonic() > 1:
                unit = pending.pop(0)
                path = tmp / (unit.name.replace(":", "_").replace("+", "_") + ".out")
                cmd = [sys.executable, str(GATE_PY), "--unit", unit.name, "--log", str(log)] + \
                    (["--smoke"] if smoke else [])
                limit = min(unit_timeout, deadline - time.monotonic())
                with open(path, "w") as f:
                    child = runner.Capped(cmd, limit, f, env=env)
                running[unit.name] = (child, path, unit, limit)
            if not running:
                break
            for name, (child, path, unit, limit) in list(running.items()):
                if child.proc.poll() is not None:
                    del running[name]
                    finish(unit, child.wait(), path, limit)
            time.sleep(0.05)
    finally:
        for name, (child, path, unit, limit) in list(running.items()):
            child.kill()
            del running[name]
            finish(unit, child.wait(), path, limit)
    for unit in pending:                    # never started: the gate's time ran out
        finish(unit, None)
    return results


def json_object(text):
    """The JSON object a line of output holds, or None (not JSON, or not an object)."""
    with contextlib.suppress(ValueError):
        value = json.loads(text)
        return value if isinstance(value, dict) else None
    return None


def summary(verdict_map):
    """One line: what passed, what was gated out and why."""
    passed = [v for v, r in verdict_map.items() if r["status"] == "pass"]
    out = [f"passed: {', '.join(passed) or 'nothing'}"]
    for v, r in verdict_map.items():
        if r["status"] != "pass":
            out.append(f"gated out: {v} ({r['status']}: {r['why']})")
    return "; ".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, Triton's interpreter")
    p.add_argument("--unit", help="run this one unit (by name) in this process")
    p.add_argument("--log", help="append each case's JSON line to this file")
    p.add_argument("--seconds", type=float, default=90.0, help="the whole gate ends by then (default 90)")
    p.add_argument("--jobs", type=int, default=None, help="units in parallel (default: one per CPU core)")
    p.add_argument("--list", action="store_true", help="print the units and their cases; run nothing")
    args = p.parse_args(argv)
    unit_list = available_units(args.smoke)
    if args.list:
        for u in unit_list:
            print(f"{u.name}  ({len(u.cases())} cases, ~{u.compiles()} compiles)")
        return 0
    if args.unit:
        unit = next((u for u in unit_list if u.name == args.unit), None)
        if unit is None:
            p.error(f"no unit {args.unit!r}; --list shows them")
        lines = run_unit(unit, args.smoke, args.log)
        return 1 if any(ln["status"] == "fail" for ln in lines) else 0
    import torch

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        p.error("no CUDA device: run with --smoke on CPU")
    log = args.log or os.devnull
    results = run_gate(unit_list, args.smoke, log, args.seconds, args.jobs, cuda=cuda,
                       on_unit=lambda name, r: print(f"{name}: {r['verdict']['status']}"
                                                     f"{' - ' + r['verdict']['why'] if r['verdict']['why'] else ''}",
                                                     flush=True))
    result = verdicts(results)
    print(summary(result))
    return 1 if any(r["status"] == "fail" for r in result.values()) else 0


if __name__ == "__main__":
    if "--smoke" in sys.argv:
        os.environ.setdefault("TRITON_INTERPRET", "1")    # before Triton's jit is imported
    sys.exit(main())
