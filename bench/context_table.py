"""The longest document one explanation fits, by the estimator (meta tensors, the real code path), for Llama-3.1-8B
and Qwen2.5-7B in bf16, on 1 and 8 GPUs of the H100's and the H200's memory (context parallelism over 8), without
and with the layers' checkpoints in host memory (offload="cpu"): low_memory mode, --mlp-chunk 1024. Per case the
most tokens (a multiple of 4k, searched to 1/16 of the length) whose per-GPU total fits, that total, the host memory
per GPU and the ring traffic per layer and GPU: bench/results/<date>-context-parallel.json, the README table via
bench/report.py. Predictions, not measurements.

    python bench/context_table.py
    python bench/report.py bench/results/<date>-context-parallel.json --readme README.md
"""

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

from attnlrp_fast import estimate as est

sys.path.insert(0, str(Path(__file__).resolve().parent))
from estimate_table import GPU_MIB  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("llama-3.1-8b", "qwen2.5-7b")
GPU_COUNTS = (1, 8)


def case(config, budget, gpus, offload):
    found, e = est.longest_fitting(config, budget, mode="low_memory", mlp_chunk=1024, start=4096, precision=1 / 16,
                                   offload=offload, gpus=gpus, limit=1 << 25)
    if e is None:
        return {"tokens": 0}
    return {"tokens": found, "total": e.total, "weights": e.weights, "peak": e.peak, "host": e.host,
            "ring_bytes": e.ring_bytes, "where": e.where}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--gpus", type=int, nargs="+", default=list(GPU_COUNTS))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    for name in args.models:
        config = est.load_config(name)
        for offload in (None, "cpu"):
            for gpu, mib in GPU_MIB.items():
                for k in args.gpus:
                    t = time.perf_counter()
                    row = {"model": name, "offload": offload, "gpu": gpu, "gpu_bytes": mib * 2**20, "gpus": k,
                           **case(config, mib * 2**20, k, offload)}
                    rows.append(row)
                    print(f"{name} offload={offload} {k} x {gpu}: {row['tokens']:,} tokens "
                          f"({time.perf_counter() - t:.0f} s)", flush=True)
    result = {"kind": "context-parallel", "date": datetime.date.today().isoformat(), "dtype": "bfloat16",
              "torch": torch.__version__, "mode": "low_memory", "mlp_chunk": 1024, "rows": rows}
    out = Path(args.out or ROOT / "bench" / "results" / f"{result['date']}-context-parallel.json")
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
