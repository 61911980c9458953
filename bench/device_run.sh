#!/usr/bin/env bash
# One call of the device tool (an H100 / H200 with torch, Triton and transformers but no network): install this
# checkout without dependencies, run some parts of bench/gpu_check.py under a time limit, and copy the result
# JSON to $OUT (what the device tool brings back).
#
#   bash bench/device_run.sh tests,spot             # GPU test suite (bf16 included) + float64 spot check, ~5 min
#   bash bench/device_run.sh kernels                # attention sweep against SDPA / LXT-style / eager
#   bash bench/device_run.sh e2e "--sizes 8192 32768"   # Llama-3-8B-shaped explanation, timed sizes
#   bash bench/device_run.sh e2e "--sizes 32768 --repeats 1 --longest"   # then the longest N per method
#
# Parts of one day and device merge into bench/results/<date>-<device>.json: copy the returned JSON into
# bench/results/ before the next call (the device receives the working tree anew each call), then
#   python bench/report.py bench/results/<date>-<device>.json --readme README.md
# A part cut off by the time limit keeps what it measured and is listed under "unfinished" in the JSON.
# Without a GPU (the test of this script): SKIP_INSTALL=1 GPU_CHECK_ARGS=--smoke RESULTS=/tmp/r OUT=/tmp/o
set -uo pipefail
parts=${1:?which parts: tests, spot, kernels, e2e (comma-separated)}
e2e_args=${2:-"--sizes 8192 32768"}
limit=${LIMIT_S:-560}
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
cd "$(dirname "$0")/.."

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv,noheader || true
python3 - <<'EOF'
import torch, triton, transformers
print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
EOF
# offline install: no dependencies fetched, the image's setuptools builds it (SKIP_INSTALL=1: already installed)
if [ -z "${SKIP_INSTALL:-}" ]; then
    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || { echo "install failed"; exit 1; }
fi

marker=$(mktemp)
timeout --signal=INT --kill-after=20 "$limit" \
    python3 bench/gpu_check.py --parts "$parts" --e2e-args "$e2e_args" --out "${RESULTS:-bench/results}" \
    ${GPU_CHECK_ARGS:-}
status=$?
[ "$status" -eq 124 ] && echo "stopped after ${limit} s: partial results kept"
if [ -n "${OUT:-}" ]; then
    find "${RESULTS:-bench/results}" -name '*.json' -newer "$marker" -exec cp {} "$OUT"/ \;
    ls -l "$OUT"
fi
exit "$status"
