"""Predicted peak memory of one explanation for the shapes of well-known models (attnlrp_fast/data/model_shapes.json:
configs as numbers, no download), per mode and length, in bf16, and the longest document each mode fits on an
H100 (79.6 GiB) and an H200 (140.4 GiB), also with low_memory's checkpoints in host memory (offload="cpu"):
bench/results/<date>-estimates.json, the README table via bench/report.py.
Bytes in the JSON; the table is in GiB (2^30 bytes), as `attnlrp-fast estimate` prints.

    python bench/estimate_table.py
    python bench/report.py bench/results/<date>-estimates.json --readme README.md
"""

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

from attnlrp_fast import estimate as est

ROOT = Path(__file__).resolve().parent.parent
TOKENS = (8192, 32768, 131072, 524288, 1048576)
# The GPUs' total memory as they report it (nvidia-smi --query-gpu=memory.total, in MiB): 81559 MiB on an H100 80GB
# SXM, 143771 MiB on an H200 (the "80 GB" and "141 GB" of the datasheets are round decimal figures above what torch
# can have). The budget is all of it: the CUDA context and the allocator's rounding are not taken off.
GPU_MIB = {"H100": 81559, "H200": 143771}
GPUS = {f"{name} ({mib / 1024:.1f} GiB)": mib * 2**20 for name, mib in GPU_MIB.items()}   # label: bytes


def _entry(e):
    return {"weights": e.weights, "peak": e.peak, "total": e.total, "where": e.where, "host": e.host}


OFFLOAD_MODELS = ("llama-3.1-8b", "qwen2.5-7b")
SEQ_CHUNK = 16384


def model_rows(name, tokens, modes, gpus, on_row=print, offload_models=OFFLOAD_MODELS):
    """A row per mode; for the offload models two more low_memory rows: its checkpoints in host memory, and that
    with each layer in sequence chunks of SEQ_CHUNK tokens."""
    config = est.load_config(name)
    rows = []
    variants = [(m, None, None) for m in modes]
    if "low_memory" in modes and name in offload_models:
        variants += [("low_memory", "cpu", None), ("low_memory", "cpu", SEQ_CHUNK)]
    for mode, offload, seq_chunk in variants:
        row = {"model": name, "mode": mode, "offload": offload, "seq_chunk": seq_chunk, "by_tokens": {},
               "longest": {}}
        try:
            for n in tokens:
                row["by_tokens"][str(n)] = _entry(est.estimate_memory(config, n, mode=mode, offload=offload,
                                                                      seq_chunk=seq_chunk))
            for gpu, budget in gpus.items():
                chunks = (256, 1024) if mode == "low_memory" and offload is None else (1024,)
                # (the chunked rows reach millions of tokens, where each meta run is long: a coarser search)
                found = max((est.longest_fitting(config, budget, mode=mode, mlp_chunk=c, start=4096,
                                                 precision=1 / 8 if seq_chunk else 1 / 32, offload=offload,
                                                 seq_chunk=seq_chunk, limit=1 << 22) + (c,)
                             for c in chunks), key=lambda f: f[0])
                row["longest"][gpu] = {"tokens": found[0], "mlp_chunk": found[2] if mode == "low_memory" else None}
        except ValueError as e:      # a contrast mode that does not cover this family
            row["error"] = str(e).splitlines()[0][:400]
        rows.append(row)
        on_row({k: v for k, v in row.items() if k != "by_tokens"})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(est.model_shapes()))
    p.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    p.add_argument("--modes", nargs="+", default=list(est.MODES), choices=est.MODES)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = [r for name in args.models for r in model_rows(name, args.tokens, args.modes, GPUS)]
    result = {"kind": "estimates", "date": datetime.date.today().isoformat(), "dtype": "bfloat16",
              "torch": torch.__version__, "tokens": args.tokens, "gpus": {k: v for k, v in GPUS.items()},
              "rows": rows}
    out = Path(args.out or ROOT / "bench" / "results" / f"{result['date']}-estimates.json")
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
