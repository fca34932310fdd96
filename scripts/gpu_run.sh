#!/usr/bin/env bash
# The one prepared command for a lent GPU machine, run in the repository root there with .whl and .data carried
# (scripts/device_wheels.sh makes them): installs the wheels, then benchmarks/gpu.py and scripts/gpu_check.sh,
# each log also under $OUT (when set). Budget: under 9 minutes on one H100.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD MPLBACKEND=Agg PYTHONUNBUFFERED=1 AEVAE_DATA_ROOT=$PWD/.data
out=${OUT:-/tmp}
nvidia-smi -L
timeout 390 python3 benchmarks/gpu.py 2>&1 | tee "$out/gpu_bench.log"
PYTHON=python3 timeout 150 bash scripts/gpu_check.sh 2 2>&1 | tail -8 | tee "$out/gpu_check.log"
