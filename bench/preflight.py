"""The pre-flight record of a GPU run: the machine (GPU name, SM count, compute capability, memory, driver), the
versions (Python, torch, CUDA, Triton, transformers, numpy), how this checkout was made importable, and which
forward kernel variants `attnlrp_fast.kernels.attention_fwd` can take here and why not. Every field is read on
its own: what cannot be read says why instead of stopping the record.

    python bench/preflight.py                 # the record as JSON on stdout (bench/device_run.sh: into env.txt)
    python bench/preflight.py --out env.txt   # appended to a file

BENCH_INSTALL names how the checkout was installed (bench/device_run.sh sets it: editable, target, path or
skipped).
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORWARDS = ("hopper", "tma", "portable", "decode")


def _error(e):
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def _version(module):
    try:
        return __import__(module).__version__
    except Exception as e:  # noqa: BLE001 - a missing or broken package is part of the record
        return f"not importable ({_error(e)})"


def versions():
    import torch

    return {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": _version("triton"), "transformers": _version("transformers"),
            "numpy": _version("numpy")}


def driver():
    """The NVIDIA driver version from nvidia-smi, or why there is none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi: {_error(e)}"
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else f"nvidia-smi: exit status {out.returncode}"


def gpu():
    """Name, SM count, capability and memory of CUDA device 0 (None without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "sms": props.multi_processor_count, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count()}


def probe_tensors(n, dtype, device):
    """Small contiguous q, k, v (GQA 4/2, D = 128, M = 4096) for asking which forward variants take them."""
    import torch

    q = torch.randn(1, 4, n, 128, dtype=dtype, device=device)
    k, v = (torch.randn(1, 2, 4096, 128, dtype=dtype, device=device) for _ in range(2))
    return q, k, v


def forward_variants(device=None, dtype=None):
    """{variant: {"runs": bool, "why_not": reason or None}} of attention_fwd's variants (FWD_VARIANTS less "auto") for
    half-precision inputs on `device` (CUDA when there is one, else CPU): prefill-shaped inputs (N = 1024) without and
    with a key padding mask ("with_padding"), decode-shaped ones (N = 1) for "decode"."""
    import torch

    from attnlrp_fast.kernels import attention_fwd as fwd

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float16)
    known = [v for v in getattr(fwd, "FWD_VARIANTS", ()) if v != "auto"]
    out = {}
    for variant in known + [v for v in FORWARDS if v not in known]:
        if variant not in known:
            out[variant] = {"runs": False, "why_not": "not among attention_fwd.FWD_VARIANTS in this checkout"}
            continue
        row = {}
        for label, kpm in (("runs", None), ("with_padding", True)):
            try:
                q, k, v = probe_tensors(1 if variant == "decode" else 1024, dtype, device)
                mask = torch.ones(1, k.shape[2], dtype=torch.bool, device=device) if kpm else None
                fwd.forward_variant(q, k, v, mask, variant=variant)
                row[label], why = True, None
            except Exception as e:  # noqa: BLE001 - ValueError says why; anything else is recorded as well
                row[label], why = False, _error(e)
            row.setdefault("why_not" if label == "runs" else "why_not_with_padding", why)
        out[variant] = row
    return out


def dispatch_reader():
    """Whether this checkout has the dispatch-table reader (attnlrp_fast.bindings.dispatch_table.validate_table)."""
    try:
        from attnlrp_fast.bindings import dispatch_table

        return {"validate_table": callable(getattr(dispatch_table, "validate_table", None)),
                "env": getattr(dispatch_table, "ENV", None)}
    except Exception as e:  # noqa: BLE001
        return {"validate_table": False, "error": _error(e)}


def record(install=None):
    """The pre-flight record (a dict); each part that fails to read holds its error instead."""
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "install": install or os.environ.get("BENCH_INSTALL") or "not recorded",
           "triton_interpret": os.environ.get("TRITON_INTERPRET", "")}
    for key, fn in (("versions", versions), ("gpu", gpu), ("driver", driver), ("forward_variants", forward_variants),
                    ("dispatch_reader", dispatch_reader)):
        try:
            out[key] = fn()
        except Exception as e:  # noqa: BLE001 - a broken part is recorded; the rest still is
            out[key] = {"error": _error(e)}
    try:
        import attnlrp_fast
        import attnlrp_fast.kernels as kernels

        out["imported_from"] = {"attnlrp_fast": str(Path(attnlrp_fast.__file__).parent),
                                "kernels": str(Path(kernels.__file__).resolve().parent)}
    except Exception as e:  # noqa: BLE001
        out["imported_from"] = {"error": _error(e)}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="append the record to this file (default: stdout)")
    args = p.parse_args(argv)
    text = "preflight: " + json.dumps(record(), sort_keys=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
