"""The dispatch table a GPU run writes (schema 1, read by attnlrp_fast.bindings.dispatch_table): after the gate a
provisional one (the forward preferred among the variants that passed, the dQ mode, what was gated out and why),
then the same with the measured cases and the measured fastest forward (bench/gpu_check.py's dispatch step).

  {"schema": 1, "device": "NVIDIA H200", "capability": "9.0", "versions": {"torch", "triton", "cuda"},
   "date": "YYYY-MM-DD", "source": "<results JSON>", "forward": "tma", "dq": "separate",
   "gated_out": {"hopper": "why"}, "cases": [{"features", "dtype", "head_dim", "bucket", "path", "ms"}]}

A table is checked by the library's validate_table before it is written (a table the library would refuse is never
written: the run then goes on without one); the file is replaced atomically, so a run cut short leaves the last
complete table.
"""

import datetime
import json
import math
import os
import tempfile
import zlib
from pathlib import Path

SCHEMA = 1
FORWARDS = ("hopper", "tma", "portable")           # the preference before timings say otherwise
DQ_MODES = ("separate", "atomic")
PREFILL_FEATURES = ("plain", "causal", "padding", "causal+padding")    # the dispatch step's (decode: the decode step)
ENV = "ATTNLRP_FAST_DISPATCH"


def passing(verdicts, name):
    """Whether `name` passed the gate (True when there was no gate: nothing is excluded then)."""
    return verdicts is None or verdicts.get(name, {}).get("status") == "pass"


def forward_order(verdicts, first=None):
    """The flash forwards that passed the gate, `first` (the measured fastest) before the preference order."""
    order = [v for v in FORWARDS if passing(verdicts, v)]
    if first in order:
        order.remove(first)
        order.insert(0, first)
    return tuple(order)


def dq_mode(verdicts):
    """The dQ mode the backward takes when the caller names none: separate (deterministic) unless only atomic passed."""
    for mode in DQ_MODES:
        if verdicts is None or passing(verdicts, f"dq={mode}"):
            return mode
    return None


def gated_out(verdicts):
    """{variant: why} of everything that did not pass (unsupported ones included: auto must not pick them either)."""
    return {v: (f"{r['status']}: {r['why']}" if r["status"] == "unsupported" else r["why"] or r["status"])
            for v, r in (verdicts or {}).items() if r["status"] != "pass"}


def device_fields():
    """device, capability and versions as the library compares them (on CPU: the smoke run's stand-ins)."""
    import torch
    import triton

    versions = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda or "none"}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        return {"device": torch.cuda.get_device_name(0), "capability": f"{major}.{minor}", "versions": versions}
    return {"device": "cpu", "capability": "cpu", "versions": versions}


def build(verdicts, source, forward=None, cases=(), fields=None):
    """The table for these gate verdicts; None (and why) when no valid one exists (no flash forward or no dQ mode
    passed: the schema has no way to say "no Triton kernel", so nothing is written and the library keeps its
    defaults)."""
    order = forward_order(verdicts, forward)
    dq = dq_mode(verdicts)
    if not order:
        return None, "no Triton flash forward passed the gate"
    if dq is None:
        return None, "neither dQ mode of the backward passed the gate"
    table = {"schema": SCHEMA, **(fields or device_fields()), "date": datetime.date.today().isoformat(),
             "source": source, "forward": order[0], "dq": dq, "gated_out": gated_out(verdicts), "cases": list(cases)}
    return table, None


def case_entry(features, dtype, head_dim, bucket, ms):
    """One "cases" entry from the measured forward+backward milliseconds {"sdpa": ..., "triton": ...} (failed or
    gated-out paths absent); None when neither path was measured."""
    ms = {p: round(t, 4) for p, t in ms.items() if t is not None and math.isfinite(t)}
    if not ms:
        return None
    return {"features": features, "dtype": dtype, "head_dim": head_dim, "bucket": bucket,
            "path": min(ms, key=ms.get), "ms": ms}


def fastest_forward(rows, candidates):
    """The forward variant with the lowest geometric-mean time over the cases every candidate measured (rows:
    {"variant", "case", "fwd_ms"}), or None when no case was measured by all of them."""
    times = {}
    for r in rows:
        if r.get("fwd_ms") and r["variant"] in candidates:
            times.setdefault(r["variant"], {})[r["case"]] = r["fwd_ms"]
    measured = [v for v in candidates if v in times]
    if not measured:
        return None
    common = set.intersection(*(set(times[v]) for v in measured))
    if not common:
        return None
    score = {v: sum(math.log(times[v][c]) for c in common) for v in measured}
    return min(measured, key=score.get)


def validator():
    """The library's validate_table, or None where this checkout has none."""
    try:
        from attnlrp_fast.bindings.dispatch_table import validate_table
    except ImportError:
        return None
    return validate_table


def write(table, path):
    """Validate `table` (the library's validate_table where it exists) and write it atomically to `path`. Returns
    None, or why it was not written."""
    check = validator()
    if check is not None:
        try:
            check(table)
        except ValueError as e:
            return f"not written: {e}"
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    os.replace(tmp, path)
    return None


def sibling(path, dq):
    """Where the copy of the table at `path` that names dQ mode `dq` lives (outside the run's folder: the library
    takes a table's dQ mode over ATTNLRP_FAST_DQ, so rows timing the other mode point ATTNLRP_FAST_DISPATCH at it)."""
    key = zlib.crc32(str(Path(path).resolve()).encode())
    return Path(tempfile.gettempdir()) / f"attnlrp-dispatch-{key:08x}-{dq}.json"


def write_siblings(tbl, path, verdicts):
    """Write the copies of `tbl` for each other dQ mode that passed the gate; returns {dq mode: table path}."""
    out = {tbl["dq"]: Path(path)}
    for mode in DQ_MODES:
        if mode != tbl["dq"] and passing(verdicts, f"dq={mode}"):
            if write({**tbl, "dq": mode}, sibling(path, mode)) is None:
                out[mode] = sibling(path, mode)
    return out


def dq_tables(path):
    """{dQ mode: table path} of the table at `path` and its copies (what write_siblings wrote)."""
    tbl = load(path)
    if not tbl:
        return {}
    return {mode: p for mode, p in ((m, Path(path) if m == tbl.get("dq") else sibling(path, m)) for m in DQ_MODES)
            if p.exists()}


def load(path):
    """The table at `path`, or None when it is absent or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def verdicts_of(table):
    """(gate verdicts, forward) as a table states them (what bench/warm_cache.py and a run without the gate go by):
    every variant the table does not gate out passed; (None, None) without a table."""
    if not table:
        return None, None
    from attnlrp_fast.kernels.attention_fwd import FWD_VARIANTS

    names = [v for v in FORWARDS + ("decode",) if v in FWD_VARIANTS] + [f"dq={m}" for m in DQ_MODES] + ["sdpa"]
    gated = table.get("gated_out", {})
    verdicts = {n: {"status": "fail", "why": gated[n]} if n in gated else {"status": "pass", "why": None}
                for n in names}
    return verdicts, table.get("forward")
