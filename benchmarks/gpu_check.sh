#!/usr/bin/env bash
# The GPU check, run once on a lent GPU machine (its own torch and triton; nothing installed
# but the carried wheels in .whl/, e.g. open_clip for the model shapes):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
# Steps (STEPS="tests merge dynopool files" by default; each has its own time limit, together
# under the 600 s a call may take):
#   tests     the test suite, the Triton kernels and the file pipeline on CUDA      (150 s)
#   merge     in-memory merge: Triton vs loop vs foreach, with a per-pass breakdown (150 s)
#   dynopool  DynOPool fwd+bwd: Triton vs reference vs max_pool2d                    (150 s)
#   files     file-to-file merge --device cuda vs CPU vs a plain read of the files   (120 s)
# SWEEP=1 adds sweeps of the kernels' elements/warps per program before merge / dynopool (on
# ViT-bigG-14 for the merge) and runs those with the best setting; give it a call of its own.
# Logs and JSON records go under $OUT (default benchmarks/results).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
STEPS=${STEPS:-tests merge dynopool files}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"
  df -h /tmp | tail -1; nproc; } 2>&1 | tee "$OUT/gpu-env.txt"
status=0

# sweep SCRIPT ENV_PREFIX "ELEMS WARPS"...: time the Triton path alone at each setting, export the best
sweep() {
    local script=$1 prefix=$2; shift 2
    local best="" best_ms="" cfg ms
    for cfg in "$@"; do
        set -- $cfg
        env "${prefix}_ELEMS=$1" "${prefix}_WARPS=$2" timeout 60 python3 "benchmarks/$script" --only triton \
            --out "$OUT" --tag="-sweep-$1-$2" $SWEEP_ARGS > "$OUT/sweep-$script-$1-$2.log" 2>&1 || continue
        ms=$(python3 -c "import json,glob; d=json.load(open(sorted(glob.glob('$OUT/*sweep-$1-$2-*.json'))[-1])); print(sum(c['ms']['triton'] for c in d['cases']))")
        echo "$script elems=$1 warps=$2: $ms ms" | tee -a "$OUT/gpu-sweep.txt"
        if [ -z "$best_ms" ] || python3 -c "import sys; sys.exit(0 if $ms < $best_ms else 1)"; then best="$1 $2"; best_ms=$ms; fi
    done
    if [ -n "$best" ]; then
        set -- $best
        export "${prefix}_ELEMS=$1" "${prefix}_WARPS=$2"
        echo "$script best: $best" | tee -a "$OUT/gpu-sweep.txt"
    fi
}

for step in $STEPS; do
    case $step in
    tests)
        timeout 150 python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tail -30 | tee "$OUT/gpu-tests.log" || status=1 ;;
    merge)
        if [ "${SWEEP:-0}" = 1 ]; then
            SWEEP_ARGS="--models ViT-bigG-14" sweep gpu_merge.py MODELSTOCK_MERGE "2048 2" "4096 4" "8192 4" "16384 8"
        fi
        timeout 150 python3 benchmarks/gpu_merge.py --out "$OUT" 2>&1 | tee "$OUT/gpu-bench-merge.log" || status=1 ;;
    dynopool)
        if [ "${SWEEP:-0}" = 1 ]; then
            SWEEP_ARGS="" sweep gpu_dynopool.py MODELSTOCK_DYNOPOOL "256 2" "512 4" "1024 4" "2048 8"
        fi
        timeout 150 python3 benchmarks/gpu_dynopool.py --out "$OUT" 2>&1 | tee "$OUT/gpu-bench-dynopool.log" || status=1 ;;
    files)
        timeout 120 python3 benchmarks/gpu_files.py --out "$OUT" 2>&1 | tee "$OUT/gpu-bench-files.log" || status=1 ;;
    *)
        echo "unknown step $step" >&2; status=1 ;;
    esac
done
exit $status
