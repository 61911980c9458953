"""`attnlrp-fast check`: the attention engine for every rule and mask feature on fresh random inputs, output and
gradients against the float64 reference; a table, and a non-zero exit on any mismatch."""

import torch

from attnlrp_fast.app.common import UsageError, choose_backend, choose_device, choose_dtype
from attnlrp_fast.bindings import dispatch
from attnlrp_fast.kernels import interpreting
from attnlrp_fast.kernels.rules import RULES
from attnlrp_fast.selfcheck import OUTPUTS, attention_errors

TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 2e-2}
CASES = {
    "plain": {},
    "causal": {"causal": True},
    "window+softcap": {"causal": True, "window": 37, "softcap": 5.0},
    "padding": {"padding": True},
}


def _checkable_dtype(name, device):
    """--dtype for `check`: as for the other commands, but no bfloat16 in Triton's interpreter, which computes bf16
    dot products wrongly (the CPU path itself would be fine, but a check that cannot check the kernels is not
    offered)."""
    dtype = choose_dtype(name, device)
    if device.type == "cpu" and dtype == torch.bfloat16 and interpreting():
        raise UsageError("--dtype bfloat16 cannot be checked in Triton's interpreter; use float16 or float32")
    return dtype


def _relative_errors(device, dtype, rule, case, generator, backend):
    """[o, dq, dk, dv]: relative errors of the engine against the float64 oracle for `rule` and one of CASES, on
    fresh random GQA inputs."""
    B, H, Hkv, N, M, D = (2, 8, 2, 300, 333, 64) if device.type == "cuda" else (2, 8, 2, 70, 77, 32)
    kw = dict(case)
    if kw.pop("padding", False):
        kw["key_padding_mask"] = (torch.rand(B, M, generator=generator) > 0.25).to(device)
    q, k, v, do = (torch.randn(B, h, n, D, generator=generator).to(device, dtype)
                   for h, n in ((H, N), (Hkv, M), (Hkv, M), (H, N)))
    errors = attention_errors(q, k, v, do, backend=backend, rule=rule, **kw)
    return [errors[name] for name in OUTPUTS]


def _engine_checked(device, dtype, backend):
    """What `check` runs, in words, and (when it is not the kernels) how to check the kernels here."""
    if dispatch.uses_triton(device, dtype, backend):
        if device.type == "cuda":
            return f"the Triton kernels on {torch.cuda.get_device_name(device)}", None
        return "the Triton kernels in Triton's interpreter on the CPU (TRITON_INTERPRET=1; slow, exact)", None
    engine = f"the torch path on {device} (PyTorch operations, not the Triton kernels)"
    if device.type == "cpu" and not interpreting():
        return engine, ("to check the Triton kernels on this CPU: TRITON_INTERPRET=1 attnlrp-fast check "
                        "(about a minute)")
    return engine, None


def run(args):
    device = choose_device(args.device)
    dtype = _checkable_dtype(args.dtype, device)
    backend = choose_backend(args.backend, device, dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    engine, hint = _engine_checked(device, dtype, backend)
    print(f"checked: {engine}, {dtype_name}")
    if hint:
        print(hint)
    print(f"attention forward and backward, GQA 4 query heads per K/V head; relative error vs float64, "
          f"tolerance {TOLERANCE[dtype_name]:g}")
    print(f"{'case':<16}{'rule':<9}" + "".join(f"{name:>10}" for name in OUTPUTS))
    g = torch.Generator().manual_seed(args.seed)
    failures = 0
    for case, kw in CASES.items():
        for rule in RULES:
            errs = _relative_errors(device, dtype, rule, kw, g, backend)
            ok = all(e < TOLERANCE[dtype_name] for e in errs)
            failures += not ok
            print(f"{case:<16}{rule:<9}" + "".join(f"{e:>10.1e}" for e in errs) + ("" if ok else "   FAIL"))
    print("all checks passed" if not failures else f"{failures} checks FAILED")
    return 1 if failures else 0
