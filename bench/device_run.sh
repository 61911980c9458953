#!/usr/bin/env bash
# The whole GPU check in ONE call of the device tool: `bash bench/device_run.sh` (no argument) with timeout_s=540.
# About 6.5 minutes of work; every step has its own time budget, the whole ends by LIMIT_S (default 500 s, so the
# call returns with a margin), and results are written to $OUT as they come (a kill loses nothing measured):
#   0. versions and nvidia-smi -> $OUT/env.txt; offline install of this checkout (SKIP_INSTALL=1 skips it);
#      ATTNLRP_FAST_AUTOTUNE=0
#   1. tests (90 s): the GPU tests' bf16 subset on pytest-xdist workers while bench/warm_cache.py compiles the
#      kernels of the steps below; spot (15 s): float64 spot check of bf16
#   2. timings (150 s): D=128 causal 16k, 4k, non-causal 16k, D=64 causal 16k, D=128 causal 1k; ours, SDPA
#      cuDNN/flash/default, LXT-style; profile (15 s): GPU time per kernel of one forward+backward of ours
#   3. memory (30 s): peak memory above inputs at 128k (GQA 32/8, D=128, causal), ours vs SDPA cuDNN and flash
#   4. e2e (120 s): the Llama-3-8B-shaped explanation at 8k and 32k vs the LXT-style baseline (and at 8k
#      through a 2k-token reasoning span with 3 hops)
#   5. sweep: the rest of the sweep grid until LIMIT_S
# $OUT then holds six files: env.txt, run.log, <date>-<device>.json (what bench/report.py reads; steps not
# completed are listed under "unfinished"), <date>-<device>.jsonl (one JSON line per event and measurement),
# pytest-bf16.log, warm.log. Commit the JSON to bench/results/, then
#   python bench/report.py bench/results/<date>-<device>.json --readme README.md
#
#   bash bench/device_run.sh                     # the whole check
#   bash bench/device_run.sh --plan              # each step's kernel compiles and budget; runs nothing
#   bash bench/device_run.sh spot,memory         # only some steps (tests spot timings profile memory e2e sweep)
#   SMOKE=1 OUT=/tmp/o bash bench/device_run.sh  # CPU: this script end to end, Triton's interpreter, tiny sizes
# Environment: OUT (default: a new temporary folder), LIMIT_S, SKIP_INSTALL, SMOKE, E2E_ARGS, GPU_CHECK_ARGS.
set -uo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
limit=${LIMIT_S:-500}
margin=10                       # seconds kept after the Python run: the summary and the file list
smoke=()
if [ -n "${SMOKE:-}" ]; then
    smoke=(--smoke)
    export TRITON_INTERPRET=1
    SKIP_INSTALL=${SKIP_INSTALL:-1}
else
    export TRITON_INTERPRET=0
fi
export PYTHONUNBUFFERED=1 ATTNLRP_FAST_AUTOTUNE=0

if [ "${1:-}" = "--plan" ]; then    # step 0 takes some 30 s of LIMIT_S
    exec python3 bench/gpu_check.py --plan --limit-s "$((limit - margin - 30))" ${smoke[@]+"${smoke[@]}"}
fi
steps=${1:-all}

OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/device_run.XXXXXX")}
mkdir -p "$OUT" || exit 1
echo "results: $OUT"

# step 0
{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi || echo "nvidia-smi: not available"
    python3 -c 'import sys, torch, triton, transformers
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton",
      triton.__version__, "transformers", transformers.__version__,
      "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
    python3 -m pip list 2>/dev/null | grep -iE "^(torch|triton|transformers|pytest|pytest-xdist|numpy) "
} > "$OUT/env.txt" 2>&1
grep -E "^python |NVIDIA-SMI|MiB \|" "$OUT/env.txt"
if [ -z "${SKIP_INSTALL:-}" ]; then
    # offline: no dependencies fetched, the image's setuptools builds it
    if ! timeout 120 python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >> "$OUT/env.txt" 2>&1; then
        echo "install failed:"; tail -5 "$OUT/env.txt"; exit 1
    fi
fi

# steps 1-5
left=$((limit - (SECONDS - started)))
if [ "$left" -le $((margin + 30)) ]; then
    echo "only ${left} s of LIMIT_S=${limit} s left after step 0: nothing more to run"; exit 1
fi
timeout --signal=INT --kill-after=15 "$left" \
    python3 bench/gpu_check.py --out "$OUT" --limit-s "$((left - margin))" --steps "$steps" \
        ${E2E_ARGS:+--e2e-args "$E2E_ARGS"} ${smoke[@]+"${smoke[@]}"} ${GPU_CHECK_ARGS:-} 2>&1 | tee -a "$OUT/run.log"
status=${PIPESTATUS[0]}
[ "$status" -eq 124 ] && echo "stopped at LIMIT_S=${limit} s: the JSON keeps every finished measurement"

json=$(ls -t "$OUT"/*.json 2>/dev/null | head -1)
[ -n "$json" ] && python3 bench/report.py "$json" --summary
ls -l "$OUT"
exit "$status"
