#!/usr/bin/env bash
# The GPU path of `aevae train`, end to end on one CUDA device: fp32, bf16-mixed, and bf16-mixed under the ddp
# strategy with devices=1 (the code path of a multi-GPU run: process group, distributed sampler, sync_dist,
# rank-0 logging), each a full MNIST run with its analysis, then one table read back from MLflow.
#   AEVAE_DATA_ROOT=/folder/holding/MNIST bash scripts/gpu_check.sh [EPOCHS]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EPOCHS=${1:-5}
export MPLBACKEND=Agg
store=$(mktemp -d)
nvidia-smi -L
"$PYTHON" -c "import torch, lightning; print('torch', torch.__version__, '| lightning', lightning.__version__,
'|', torch.cuda.get_device_name(0), '| bf16', torch.cuda.is_bf16_supported())"
for variant in "32-true auto" "bf16-mixed auto" "bf16-mixed ddp"; do
  read -r precision strategy <<<"$variant"
  "$PYTHON" -m aevae train --config experiments/vae_mnist.yaml --trainer.accelerator gpu --trainer.devices 1 \
    --trainer.precision "$precision" --trainer.strategy "$strategy" --trainer.max_epochs "$EPOCHS" \
    --trainer.enable_progress_bar false --tracking.uri "sqlite:///$store/mlflow.db" \
    --tracking.run_name "gpu-$precision-$strategy" --fit.checkpoint_dir "$store/checkpoints"
done
"$PYTHON" - "$store" <<'PY'
import sys
from statistics import median
from mlflow import MlflowClient

client = MlflowClient(f"sqlite:///{sys.argv[1]}/mlflow.db")
runs = client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time"])
print("| run | status | s/epoch (median) | val/nelbo | test/nelbo | silhouette_umap | knn_acc |")
print("|---|---|---:|---:|---:|---:|---:|")
for run in runs:
    stamps = [m.timestamp for m in sorted(client.get_metric_history(run.info.run_id, "val/nelbo"), key=lambda m: m.step)]
    epoch_s = median(b - a for a, b in zip(stamps, stamps[1:])) / 1000 if len(stamps) > 1 else float("nan")
    m = run.data.metrics
    print(f"| {run.info.run_name} | {run.info.status} | {epoch_s:.2f} | {m['val/nelbo']:.2f} | {m['test/nelbo']:.2f} "
          f"| {m['silhouette_umap']:.3f} | {m['knn_acc']:.3f} |")
PY
