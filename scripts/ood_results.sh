#!/usr/bin/env bash
# The runs behind docs/ood.md: AE and VAE (latent_dim 16, hidden [256, 128], EPOCHS epochs on the full training
# data) on MNIST and on Fashion-MNIST, seeds 0-2, each scored by `aevae ood` against the other data set and by
# `aevae samples`. The two sources train side by side, one thread each.
#   AEVAE_DATA_ROOT=/folder/holding/MNIST bash scripts/ood_results.sh STORE_FOLDER [train|score|all]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STORE=$(realpath -m "${1:?store folder}")
STEP=${2:-all}
EPOCHS=${EPOCHS:-2}
MAX_IMAGES=${MAX_IMAGES:-10000}
export OMP_NUM_THREADS=1
K=${K:-100}
export MPLBACKEND=Agg
mkdir -p "$STORE"
URI="sqlite:///$STORE/mlflow.db"
declare -A OTHER=([mnist]=fashion-mnist [fashion-mnist]=mnist)
train_source() {
  local source=$1 kind seed
  for kind in ae vae; do
    for seed in 0 1 2; do
      nice -n 5 "$PYTHON" -m aevae train --config "experiments/${kind}_mnist.yaml" --seed "$seed" \
        --data.source "$source" --model.init_args.latent_dim 16 --model.init_args.hidden_dims "[256, 128]" \
        --trainer.max_epochs "$EPOCHS" --trainer.enable_progress_bar false --analysis.enabled false \
        --tracking.uri "$URI" --tracking.experiment ood --tracking.run_name "$kind-$source-s$seed" \
        --fit.checkpoint_dir "$STORE/checkpoints/$kind-$source-s$seed"
    done
  done
}
if [[ $STEP == train || $STEP == all ]]; then
  train_source mnist & train_source fashion-mnist & wait
fi
if [[ $STEP == score || $STEP == all ]]; then
  "$PYTHON" - "$URI" <<'PY' | while read -r run_id source; do
import sys
from mlflow import MlflowClient
client = MlflowClient(sys.argv[1])
experiment = client.get_experiment_by_name("ood")
for run in client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'", order_by=["start_time"]):
    print(run.info.run_id, run.data.tags["data_source"])
PY
    nice -n 5 "$PYTHON" -m aevae ood --run-id "$run_id" --against "${OTHER[$source]}" --k "$K" --max_images "$MAX_IMAGES" --tracking-uri "$URI"
    nice -n 5 "$PYTHON" -m aevae samples --run-id "$run_id" --tracking-uri "$URI"
  done
fi
