#!/usr/bin/env bash
# The GPU check, run once on a lent GPU machine (its own torch and triton; nothing installed
# but the carried wheels in .whl/, e.g. open_clip for the model shapes):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"])
# Runs the test suite with the Triton kernels on CUDA, then the GPU benchmark, and writes the
# logs and the JSON record under $OUT (default benchmarks/results).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"; } 2>&1 | tee "$OUT/gpu-env.txt"
status=0
timeout 200 python3 -m pytest -q -p no:cacheprovider tests 2>&1 | tail -40 | tee "$OUT/gpu-tests.log" || status=1
timeout 300 python3 benchmarks/gpu_merge.py --out "$OUT" 2>&1 | tee "$OUT/gpu-bench.log" || status=1
exit $status
