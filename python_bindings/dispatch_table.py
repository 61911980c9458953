"""The measured dispatch table: which attention path is faster on a GPU, per feature set and length bucket.

A GPU run (bench/device_run.sh) times the torch path (torch's fused SDPA kernels, sdpa.py) against the Triton
kernels for the cases below, checks every kernel variant against float64 first, and writes this table. backend=None
("auto") on CUDA then follows it: the path it names for the call's case, the Triton forward it names, never what
failed the check. The library ships the table of the last GPU run as attnlrp_fast/data/dispatch.json (absent until
one ran); the environment variable ATTNLRP_FAST_DISPATCH names another file (the GPU run points it at the table it
is writing). A table measured on another kind of GPU (compute capability) is not applied.

Schema (version 1):
  {"schema": 1, "device": "NVIDIA H200", "capability": "9.0",
   "versions": {"torch": ..., "triton": ..., "cuda": ...}, "date": "YYYY-MM-DD", "source": "<results JSON>",
   "forward": "tma",            the Triton forward auto prefers: hopper | tma | portable
   "dq": "separate",            the backward's dQ mode when the caller names none: separate | atomic
   "gated_out": {"hopper": "why it failed the check", ...},   variants / paths auto never picks
   "cases": [{"features": "causal", "dtype": "bfloat16", "head_dim": 128, "bucket": 16384,
              "path": "sdpa" | "triton", "ms": {"sdpa": 1.2, "triton": 1.5}}, ...]}
  features: plain | causal | padding | causal+padding | decode | decode+padding (decode: at most 16 query rows,
  generation with a cache); bucket: kernels.attention_common.length_bucket(max(N, M)); ms: forward + backward under
  rule attnlrp (decode cases: the forward alone, as generation runs it).
"""

import json
import os
from importlib import resources
from pathlib import Path

ENV = "ATTNLRP_FAST_DISPATCH"
SCHEMA = 1
FEATURES = ("plain", "causal", "padding", "causal+padding", "decode", "decode+padding")
DECODE_ROWS = 16        # calls with at most this many query rows are "decode" cases (timed forward only)
PATHS = ("sdpa", "triton")
FORWARDS = ("hopper", "tma", "portable")
DQ_MODES = ("separate", "atomic")
GATEABLE = FORWARDS + ("decode", "sdpa", "dq=separate", "dq=atomic")
DTYPES = ("float16", "bfloat16", "float32")
_PACKAGE = __package__.rpartition(".")[0] or "attnlrp_fast"   # attnlrp_fast.bindings -> attnlrp_fast


def packaged_path() -> Path:
    """Where the shipped table lives (attnlrp_fast/data/dispatch.json; it may not exist)."""
    return Path(str(resources.files(_PACKAGE) / "data" / "dispatch.json"))


def table_path() -> Path:
    """The table in use: ATTNLRP_FAST_DISPATCH when set, else the shipped one."""
    named = os.environ.get(ENV, "").strip()
    return Path(named) if named else packaged_path()


def features_of(causal, padding, n_rows=None) -> str:
    """The case's features: decode (at most DECODE_ROWS query rows, causal or not), else plain / causal, with
    +padding (or padding alone) when a key padding mask is given."""
    if n_rows is not None and n_rows <= DECODE_ROWS:
        return "decode+padding" if padding else "decode"
    return ("causal" if causal else "") + ("+padding" if causal and padding else "padding" if padding else "") \
        or "plain"


def _fail(where, what):
    raise ValueError(f"dispatch table {where}: {what}")


def validate_table(table, where="(in memory)"):
    """The table itself when it follows the schema; ValueError naming the first problem otherwise."""
    if not isinstance(table, dict):
        _fail(where, f"must be a JSON object, got {type(table).__name__}")
    if table.get("schema") != SCHEMA:
        _fail(where, f"schema must be {SCHEMA}, got {table.get('schema')!r}")
    for key in ("device", "capability"):
        if not isinstance(table.get(key), str) or not table[key]:
            _fail(where, f"{key!r} must be a non-empty string, got {table.get(key)!r}")
    if table.get("forward") not in FORWARDS:
        _fail(where, f"'forward' must be one of {', '.join(FORWARDS)}, got {table.get('forward')!r}")
    if table.get("dq", "separate") not in DQ_MODES:
        _fail(where, f"'dq' must be one of {', '.join(DQ_MODES)}, got {table.get('dq')!r}")
    gated = table.get("gated_out", {})
    if not isinstance(gated, dict) or any(k not in GATEABLE or not isinstance(v, str) for k, v in gated.items()):
        _fail(where, f"'gated_out' must map some of {', '.join(GATEABLE)} to reasons, got {gated!r}")
    if table["forward"] in gated:
        _fail(where, f"its forward {table['forward']!r} is among the gated-out variants")
    if table.get("dq", "separate") in (m.split("=")[1] for m in gated if m.startswith("dq=")):
        _fail(where, f"its dQ mode {table.get('dq', 'separate')!r} is gated out")
    cases = table.get("cases", [])
    if not isinstance(cases, list):
        _fail(where, f"'cases' must be a list, got {type(cases).__name__}")
    for i, case in enumerate(cases):
        problems = [
            f"features {case.get('features')!r} (one of {', '.join(FEATURES)})" if case.get("features") not in FEATURES
            else None,
            f"dtype {case.get('dtype')!r} (one of {', '.join(DTYPES)})" if case.get("dtype") not in DTYPES else None,
            f"head_dim {case.get('head_dim')!r}" if not isinstance(case.get("head_dim"), int) or
            case["head_dim"] <= 0 else None,
            f"bucket {case.get('bucket')!r}" if not isinstance(case.get("bucket"), int) or case["bucket"] <= 0 else None,
            f"path {case.get('path')!r} (one of {', '.join(PATHS)})" if case.get("path") not in PATHS else None,
        ] if isinstance(case, dict) else [f"a JSON object, got {type(case).__name__}"]
        bad = [p for p in problems if p]
        if bad:
            _fail(where, f"case {i}: {'; '.join(bad)}")
    return table


_cache = {}


def load_table(path=None):
    """The dispatch table at `path` (default: table_path()), validated; None when no such file exists. Read once per
    path and modification time. A file that exists but is not a valid table is an error naming it."""
    path = Path(path) if path is not None else table_path()
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        if os.environ.get(ENV, "").strip() and path == table_path():
            raise FileNotFoundError(f"{ENV}={path}: no such dispatch table") from None
        return None
    key = (str(path), stamp)
    if key not in _cache:
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"dispatch table {path}: not readable JSON ({e})") from None
        _cache.clear()
        _cache[key] = validate_table(table, str(path))
    return _cache[key]


def capability_of(device) -> str:
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


def applicable_table(device):
    """(table, None) when a table exists and was measured on this kind of GPU, else (None, why not)."""
    table = load_table()
    if table is None:
        return None, f"no dispatch table ({table_path()} does not exist: no GPU run has measured one)"
    here = capability_of(device)
    if table["capability"] != here:
        return None, (f"the dispatch table was measured on {table['device']} (compute capability "
                      f"{table['capability']}), this GPU is {here}")
    return table, None


def lookup(table, features, dtype_name, head_dim, bucket):
    """The case of `table` for this call: same features, dtype and head dim, the nearest measured length bucket (None
    when nothing of that kind was measured)."""
    same = [c for c in table.get("cases", []) if c["features"] == features and c["dtype"] == dtype_name
            and c["head_dim"] == head_dim]
    if not same:
        return None
    return min(same, key=lambda c: (abs(c["bucket"].bit_length() - bucket.bit_length()), c["bucket"]))
