#!/usr/bin/env bash
# The one prepared command for a lent GPU machine, run in the repository root there with .whl and .data carried
# (scripts/device_wheels.sh makes them): installs the wheels, checks the imports, then benchmarks/gpu.py (parity,
# the throughput table, sweeps; its own time budget) and scripts/gpu_check.sh, each log also under $OUT (when
# set). Under 9 minutes on one H200; the device call's timeout_s: 560.
set -uo pipefail
start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD MPLBACKEND=Agg PYTHONUNBUFFERED=1 AEVAE_DATA_ROOT=$PWD/.data
out=${OUT:-/tmp}
nvidia-smi -L
python3 - <<'PY' 2>&1 | tee "$out/imports.log" || exit 1
import torch, lightning, mlflow, optuna, jsonargparse, umap, sklearn, numpy
import aevae.training, aevae.sweep, aevae.analysis
print("torch", torch.__version__, "lightning", lightning.__version__, "mlflow", mlflow.__version__, "optuna",
      optuna.__version__, "numpy", numpy.__version__, "sklearn", sklearn.__version__, "|", torch.cuda.get_device_name(0))
PY
echo "set-up: $(( $(date +%s) - start )) s"
timeout 400 python3 benchmarks/gpu.py --budget-s ${GPU_BENCH_BUDGET_S:-300} 2>&1 | tee "$out/gpu_bench.log"
echo "benchmark done at $(( $(date +%s) - start )) s"
PYTHON=python3 timeout 100 bash scripts/gpu_check.sh 1 2>&1 | tail -8 | tee "$out/gpu_check.log"
echo "all done at $(( $(date +%s) - start )) s"
