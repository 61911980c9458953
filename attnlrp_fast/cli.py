"""The `attnlrp-fast` command.

  attnlrp-fast check [--device auto|cpu|cuda] [--dtype auto|bfloat16|float16|float32] [--backend auto|triton|torch]
      runs the attention engine for every rule and mask feature on fresh random inputs, compares output
      and gradients with the float64 reference, prints a table and exits non-zero on any mismatch.
  attnlrp-fast info
      versions, devices and which backend `auto` picks here.
"""

import argparse
import sys

TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 2e-2}
CASES = {
    "plain": {},
    "causal": {"causal": True},
    "window+softcap": {"causal": True, "window": 37, "softcap": 5.0},
    "padding": {"padding": True},
}


class UsageError(Exception):
    """A problem with what the user asked for: reported as one line, no traceback."""


def _device(name):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here (try --device cpu)")
    return torch.device(name)


def _dtype(name, device):
    import torch

    if name == "auto":
        name = "bfloat16" if device.type == "cuda" else "float32"
    if device.type == "cpu" and name == "bfloat16":
        # Triton's interpreter computes bf16 dot products wrongly; the CPU path itself would be fine,
        # but a check that cannot check the kernels is not offered.
        from attnlrp_fast.kernels import interpreting

        if interpreting():
            raise UsageError("--dtype bfloat16 cannot be checked in Triton's interpreter; use float16 or float32")
    return name, getattr(torch, name)


def _relative_errors(device, dtype, rule, kw, generator, backend):
    import torch

    import attnlrp_fast as af
    from attnlrp_fast.reference import attention_dense

    B, H, Hkv, N, M, D = (2, 8, 2, 300, 333, 64) if device.type == "cuda" else (2, 8, 2, 70, 77, 32)
    kw = dict(kw)
    if kw.pop("padding", False):
        kw["key_padding_mask"] = (torch.rand(B, M, generator=generator) > 0.25).to(device)
    q, k, v, do = (torch.randn(B, h, n, D, generator=generator).to(device, dtype)
                   for h, n in ((H, N), (Hkv, M), (Hkv, M), (H, N)))
    got, want = [], []
    engine = lambda *a, **kw: af.attention(*a, backend=backend, **kw)  # noqa: E731
    for fn, cast in ((engine, lambda x: x), (attention_dense, lambda x: x.double())):
        leaves = [cast(x).detach().requires_grad_() for x in (q, k, v)]
        o = fn(*leaves, rule=rule, **kw)
        o.backward(cast(do))
        grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]
        (got if fn is engine else want).extend([o.detach(), *grads])
    errors = []
    for a, b in zip(got, want):
        a = a.double()
        if not torch.isfinite(a).all():
            errors.append(float("inf"))
        else:
            denom = b.norm()
            errors.append(((a - b).norm() / denom).item() if denom > 0 else a.norm().item())
    return errors


def cmd_check(args):
    import torch

    from attnlrp_fast.bindings import uses_triton

    device = _device(args.device)
    dtype_name, dtype = _dtype(args.dtype, device)
    backend = None if args.backend == "auto" else args.backend
    try:
        path = "triton" if uses_triton(device, dtype, args.backend) else "torch"
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"--backend {args.backend}: {e}") from None
    print(f"attention engine check on {device} ({dtype_name}, {path} path, GQA 4 query heads per K/V head); "
          f"relative error vs float64, tolerance {TOLERANCE[dtype_name]:g}")
    print(f"{'case':<16}{'rule':<9}{'o':>10}{'dq':>10}{'dk':>10}{'dv':>10}")
    g = torch.Generator().manual_seed(args.seed)
    failures = 0
    for case, kw in CASES.items():
        for rule in ("grad", "attnlrp", "cp"):
            errs = _relative_errors(device, dtype, rule, kw, g, backend)
            ok = all(e < TOLERANCE[dtype_name] for e in errs)
            failures += not ok
            print(f"{case:<16}{rule:<9}" + "".join(f"{e:>10.1e}" for e in errs) + ("" if ok else "   FAIL"))
    print("all checks passed" if not failures else f"{failures} checks FAILED")
    return 1 if failures else 0


def cmd_info(args):
    import torch
    import triton

    import attnlrp_fast as af
    from attnlrp_fast.bindings import uses_triton
    from attnlrp_fast.kernels import interpreting

    print(f"attnlrp-fast {af.__version__}; torch {torch.__version__}; triton {triton.__version__}")
    print(f"CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}")
    print(f"Triton interpreter (TRITON_INTERPRET): {'on' if interpreting() else 'off'}")
    for dev in ("cpu",) + (("cuda",) if torch.cuda.is_available() else ()):
        path = "triton" if uses_triton(torch.device(dev), torch.float32, "auto") else "torch"
        print(f"backend=None on {dev} tensors -> {path}")
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="attnlrp-fast", description="AttnLRP explanations with fused Triton kernels")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="check the attention engine against the float64 reference on this machine")
    c.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    c.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto")
    c.add_argument("--backend", choices=("auto", "triton", "torch"), default="auto",
                   help="auto: Triton on CUDA (and in the interpreter), the torch path on CPU")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_check)
    i = sub.add_parser("info", help="versions, devices and backend choice")
    i.set_defaults(func=cmd_info)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"attnlrp-fast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
