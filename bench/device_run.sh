#!/usr/bin/env bash
# The whole GPU check of a GPU machine: `bash bench/device_run.sh` (no argument), within a time limit (one run of
# at most 540 s). Every step has its own budget, the whole ends by LIMIT_S (default 500 s, a margin to the limit),
# and results are written to $OUT as they come (a run cut short loses nothing measured). bench/README.md has the
# steps, their budgets and what comes back:
#   0. preflight (~20 s): versions, nvidia-smi, the install of this checkout, which forward kernels can run here
#      -> $OUT/env.txt
#   1. gate (70 s): every kernel variant and path against float64, one process per unit, in parallel; what fails is
#      left out of every later step; the provisional dispatch table -> $OUT/dispatch.json
#   2. tests (60 s): the GPU tests on pytest-xdist workers while bench/warm_cache.py compiles the later kernels
#   3. spot (10 s), timings (75 s), decode (20 s), dispatch (40 s; rewrites dispatch.json), profile (10 s),
#      memory (25 s), e2e (165 s), then the sweep until LIMIT_S
# $OUT then holds seven files: env.txt, run.log, <date>-<device>.json (what bench/report.py reads; steps not completed
# are listed under "unfinished"), <date>-<device>.jsonl (one JSON line per event, measurement and gate case),
# dispatch.json, pytest-gpu.log, warm.log.
#
#   bash bench/device_run.sh                     # the whole check
#   bash bench/device_run.sh --plan              # each step's kernel compiles and budget; runs nothing
#   bash bench/device_run.sh preflight           # step 0 only
#   bash bench/device_run.sh gate,spot,memory    # step 0, then only these steps (gate tests spot timings decode
#                                                # dispatch profile memory e2e sweep)
#   SMOKE=1 OUT=/tmp/o bash bench/device_run.sh  # CPU: this script end to end, Triton's interpreter, tiny sizes
# Environment: OUT (default: a new temporary folder), LIMIT_S, PYTHON (default python3, else python: every Python
# step runs under it), PIP (default "$PYTHON -m pip"), SKIP_INSTALL, SMOKE, E2E_ARGS, GPU_CHECK_ARGS.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
started=$SECONDS
limit=${LIMIT_S:-500}
margin=10                       # seconds kept after the Python run: the summary and the file list
if [ -z "${PYTHON:-}" ]; then
    if command -v python3 > /dev/null 2>&1; then PYTHON=python3; else PYTHON=python; fi
fi
read -r -a pip <<< "${PIP:-$PYTHON -m pip}"
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
    exec "$PYTHON" bench/gpu_check.py --plan --limit-s "$((limit - margin - 30))" ${smoke[@]+"${smoke[@]}"}
fi
steps=${1:-all}

OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/device_run.XXXXXX")}
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
echo "results: $OUT"

# step 0: the machine, the versions, the install
{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    echo "python: $PYTHON ($(command -v "$PYTHON" || echo 'not found'))"
    timeout 20 nvidia-smi || echo "nvidia-smi: not available"
    "$PYTHON" -c 'import sys
from importlib.metadata import version
def v(name):
    try:
        return version(name)
    except Exception:
        return "not installed"
print("python", sys.version.split()[0], *(f"{n} {v(n)}" for n in ("torch", "triton", "transformers", "numpy",
                                                                   "pytest", "pytest-xdist")))'
} > "$OUT/env.txt" 2>&1
grep -E "^python |NVIDIA-SMI|MiB \|" "$OUT/env.txt"

# does `import attnlrp_fast` (with .kernels and .bindings) load this checkout's code (from under $1)? Asked from
# outside the checkout, as the bench scripts see it (its own attnlrp_fast/ folder holds neither subpackage)
imports_from() {
    (cd "${TMPDIR:-/tmp}" && "$PYTHON" - "$1" >> "$OUT/env.txt" 2>&1) <<'EOF'
import os, sys
import attnlrp_fast.bindings, attnlrp_fast.kernels.attention_fwd as fwd
where = os.path.realpath(fwd.__file__)
print("attnlrp_fast.kernels from", where)
sys.exit(0 if where.startswith(os.path.realpath(sys.argv[1]) + os.sep) else 1)
EOF
}

# a folder whose attnlrp_fast/ links this checkout's files, kernels/ as attnlrp_fast/kernels and python_bindings/
# as attnlrp_fast/bindings (setup.py's package_dir): on PYTHONPATH it imports as the installed package does
link_package() {
    local shim
    shim=$(mktemp -d "${TMPDIR:-/tmp}/attnlrp_fast_path.XXXXXX") || return 1
    mkdir "$shim/attnlrp_fast" || return 1
    for f in "$root"/attnlrp_fast/*; do ln -s "$f" "$shim/attnlrp_fast/" || return 1; done
    ln -s "$root/kernels" "$shim/attnlrp_fast/kernels" && ln -s "$root/python_bindings" "$shim/attnlrp_fast/bindings" \
        && echo "$shim"
}

# the offline install: editable; else a plain install into a folder of its own on PYTHONPATH (a read-only
# site-packages); else the checkout itself through link_package. SKIP_INSTALL: the interpreter's own, if it
# imports this checkout
install=skipped
echo "install (pip: ${pip[*]}):" >> "$OUT/env.txt"
if [ -z "${SKIP_INSTALL:-}" ]; then
    install=failed
    if timeout 90 "${pip[@]}" install -q --no-deps --no-build-isolation --no-index -e . >> "$OUT/env.txt" 2>&1 \
            && imports_from "$root"; then
        install=editable
    else
        site=$(mktemp -d "${TMPDIR:-/tmp}/attnlrp_fast_site.XXXXXX")
        if timeout 90 "${pip[@]}" install -q --no-deps --no-build-isolation --no-index --target "$site" . \
                >> "$OUT/env.txt" 2>&1 && PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" imports_from "$site"; then
            export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
            install=target
        fi
    fi
fi
if [ "$install" = failed ] || { [ "$install" = skipped ] && ! imports_from "$root"; }; then
    if shim=$(link_package) && PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}" imports_from "$root"; then
        export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
        install=path
    else
        install=failed
    fi
fi
export BENCH_INSTALL=$install
echo "install: $install${PYTHONPATH:+ (PYTHONPATH=$PYTHONPATH)}" | tee -a "$OUT/env.txt"
timeout 60 "$PYTHON" bench/preflight.py --out "$OUT/env.txt" > /dev/null 2>> "$OUT/env.txt" \
    || echo "preflight record: failed (env.txt has the error)"
"$PYTHON" - "$OUT/env.txt" <<'EOF' || true
import json, sys
lines = [l for l in open(sys.argv[1]) if l.startswith("preflight: ")]
if lines:
    r = json.loads(lines[-1][len("preflight: "):])
    v = r.get("versions", {})
    runs = [k for k, x in (r.get("forward_variants") or {}).items() if isinstance(x, dict) and x.get("runs")]
    print("preflight:", (r.get("gpu") or {}).get("name", "no GPU"), "| torch", v.get("torch"), "| triton",
          v.get("triton"), "| forward kernels here:", ", ".join(runs) or "none")
EOF
if [ "$install" = failed ]; then
    echo "this checkout cannot be imported (env.txt has the install log): nothing more to run"; exit 1
fi
[ "$steps" = preflight ] && { ls -l "$OUT"; exit 0; }

# the steps after step 0, in one Python process that ends by LIMIT_S
left=$((limit - (SECONDS - started)))
if [ "$left" -le $((margin + 30)) ]; then
    echo "only ${left} s of LIMIT_S=${limit} s left after step 0: nothing more to run"; exit 1
fi
timeout --signal=INT --kill-after=15 "$left" \
    "$PYTHON" bench/gpu_check.py --out "$OUT" --limit-s "$((left - margin))" --steps "$steps" \
        ${E2E_ARGS:+--e2e-args "$E2E_ARGS"} ${smoke[@]+"${smoke[@]}"} ${GPU_CHECK_ARGS:-} 2>&1 | tee -a "$OUT/run.log"
status=${PIPESTATUS[0]}
[ "$status" -eq 124 ] && echo "stopped at LIMIT_S=${limit} s: the JSON keeps every finished measurement"

rm -f "$OUT"/*.tmp
json=$(ls -t "$OUT"/*-*.json 2>/dev/null | head -1)
[ -n "$json" ] && "$PYTHON" bench/report.py "$json" --summary
ls -l "$OUT"
exit "$status"
