#!/usr/bin/env bash
# The GPU check, run once on a lent GPU machine (its own torch and triton; nothing installed
# but the carried wheels in .whl/, e.g. open_clip for the model shapes; `make gpu-wheels`):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
# Steps (STEPS="tests dynopool net" by default; each has its own time limit, together under
# the 600 s a call may take; "merge" and "files" are for a call of their own):
#   tests     the whole suite on CUDA; the log, ending in pytest's summary, is
#             gpu-tests-<device>-<date>.log; any failure fails the step          (180 s)
#   dynopool  DynOPool fwd+bwd: Triton vs reference vs max_pool2d                     (90 s)
#   net       ResNet-50 training step: DynOPool vs max pool vs reference, eager and
#             compiled (benchmarks/gpu_net.py)                                       (290 s)
#   merge     in-memory merge: Triton vs loop vs foreach, with a per-pass breakdown (150 s)
#   files     file-to-file merge --device cuda vs CPU vs a plain read of the files   (120 s)
# With 15 minutes of device time in all, two calls cover everything but merge:
#   STEPS="dynopool files tests"  (timeout_s 430), then  STEPS="net"  (timeout_s 320).
# SWEEP=1 adds sweeps of the kernels' settings before merge (chunks x pipeline stages per
# dtype size, on ViT-bigG-14) and dynopool (elements/warps per program), then runs those steps
# with the fastest setting; give it a call of its own (STEPS="merge dynopool").
# Logs and JSON records go under $OUT (default benchmarks/results).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
STEPS=${STEPS:-tests dynopool net}
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

# sweep SCRIPT "VAR=value [VAR=value...]"...: time the Triton path alone under each setting
# (SWEEP_ARGS are extra arguments for the script), then export the fastest setting
sweep() {
    local script=$1 best="" best_ms="" cfg ms tag; shift
    for cfg in "$@"; do
        tag="-sweep-$(echo "$cfg" | sed 's/MODELSTOCK_//g; s/[^A-Za-z0-9]\+/-/g')"
        env $cfg timeout 60 python3 "benchmarks/$script" --only triton --out "$OUT" --tag="$tag" $SWEEP_ARGS \
            > "$OUT/sweep-$script$tag.log" 2>&1 || continue
        record=$(grep '^wrote ' "$OUT/sweep-$script$tag.log" | tail -1 | cut -d' ' -f2-)
        ms=$(python3 -c "import json; d=json.load(open('$record')); print(sum(c['ms']['triton'] for c in d['cases']))")
        echo "$script [$cfg]: $ms ms" | tee -a "$OUT/gpu-sweep.txt"
        if [ -z "$best_ms" ] || python3 -c "import sys; sys.exit(0 if $ms < $best_ms else 1)"; then best=$cfg; best_ms=$ms; fi
    done
    if [ -n "$best" ]; then
        export $best
        echo "$script best: [$best]" | tee -a "$OUT/gpu-sweep.txt"
    fi
}

for step in $STEPS; do
    case $step in
    tests)
        log="$OUT/gpu-tests-$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")-$(date +%F).log"
        xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 4")  # the GPU machine has pytest-xdist
        timeout 180 python3 -m pytest -q -p no:cacheprovider -rfEs $xdist tests > "$log" 2>&1
        rc=$?
        [ $rc -eq 124 ] && echo "tests: cut off at 180 s" >> "$log"
        tail -40 "$log"
        [ $rc -eq 0 ] || status=1 ;;
    merge)
        if [ "${SWEEP:-0}" = 1 ]; then
            # chunks x stages per itemsize; 2:1x1 is the kernel as first measured (one chunk per program)
            SWEEP_ARGS="--models ViT-bigG-14" sweep gpu_merge.py \
                "MODELSTOCK_MERGE_PIPELINE=2:1x1,4:1x1" "MODELSTOCK_MERGE_PIPELINE=2:4x3,4:1x1" \
                "MODELSTOCK_MERGE_PIPELINE=2:8x3,4:4x3" "MODELSTOCK_MERGE_PIPELINE=2:4x4,4:4x3" \
                "MODELSTOCK_MERGE_PIPELINE=2:4x3,4:1x1 MODELSTOCK_MERGE_WARPS=8"
        fi
        timeout 150 python3 benchmarks/gpu_merge.py --out "$OUT" ${MERGE_ARGS:-} 2>&1 | tee "$OUT/gpu-bench-merge.log" || status=1 ;;
    dynopool)
        if [ "${SWEEP:-0}" = 1 ]; then
            SWEEP_ARGS="" sweep gpu_dynopool.py \
                "MODELSTOCK_DYNOPOOL_ELEMS=256 MODELSTOCK_DYNOPOOL_WARPS=2" \
                "MODELSTOCK_DYNOPOOL_ELEMS=512 MODELSTOCK_DYNOPOOL_WARPS=4" \
                "MODELSTOCK_DYNOPOOL_ELEMS=1024 MODELSTOCK_DYNOPOOL_WARPS=4" \
                "MODELSTOCK_DYNOPOOL_ELEMS=2048 MODELSTOCK_DYNOPOOL_WARPS=8"
        fi
        timeout 90 python3 benchmarks/gpu_dynopool.py --out "$OUT" 2>&1 | tee "$OUT/gpu-bench-dynopool.log" || status=1 ;;
    net)
        timeout 290 python3 benchmarks/gpu_net.py --out "$OUT" --steps 10 2>&1 | tee "$OUT/gpu-bench-net.log" || status=1 ;;
    files)
        timeout 120 python3 benchmarks/gpu_files.py --out "$OUT" 2>&1 | tee "$OUT/gpu-bench-files.log" || status=1 ;;
    *)
        echo "unknown step $step" >&2; status=1 ;;
    esac
done
exit $status
