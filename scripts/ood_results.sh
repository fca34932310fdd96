#!/usr/bin/env bash
# The runs behind docs/ood.md: AE and VAE (latent_dim 16, hidden [256, 128], EPOCHS epochs on the full training
# data) on MNIST, on Fashion-MNIST and on MNIST's digits 0-8 (data.classes; 9 held out), seeds 0-2, each scored
# by `aevae ood` (against the other data set, or the held-out digit) and, but for 0-8, by `aevae samples`.
# The groups in TRAIN train side by side, one thread each.
#   AEVAE_DATA_ROOT=/folder/holding/MNIST bash scripts/ood_results.sh STORE_FOLDER [train|score|table|all]
# `score` skips what a run already has, so it can run again (or beside `train`) to pick up new runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STORE=$(realpath -m "${1:?store folder}")
STEP=${2:-all}
EPOCHS=${EPOCHS:-2}
MAX_IMAGES=${MAX_IMAGES:-10000}
export OMP_NUM_THREADS=1
K=${K:-100}
ONLY=${ONLY:-}  # score only the runs whose name matches this regex, e.g. ^vae-mnist (to score in parallel)
DO=${DO:-ood samples}  # what the score step computes
N_SAMPLES=${N_SAMPLES:-10000}
TRAIN=${TRAIN:-mnist fashion-mnist heldout}  # the groups the train step trains
export MPLBACKEND=Agg
mkdir -p "$STORE"
URI="sqlite:///$STORE/mlflow.db"
train_source() {  # a group: mnist, fashion-mnist, or heldout (MNIST digits 0-8, run names mnist-0to8)
  local group=$1 source=$1 name=$1 classes=null kind seed
  if [[ $group == heldout ]]; then
    source=mnist name=mnist-0to8 classes="[0, 1, 2, 3, 4, 5, 6, 7, 8]"
  fi
  for kind in ae vae; do
    for seed in 0 1 2; do
      nice -n 5 "$PYTHON" -m aevae train --config "experiments/${kind}_mnist.yaml" --seed "$seed" \
        --data.source "$source" --data.classes "$classes" --model.init_args.latent_dim 16 \
        --model.init_args.hidden_dims "[256, 128]" --trainer.max_epochs "$EPOCHS" \
        --trainer.enable_progress_bar false --analysis.enabled false \
        --tracking.uri "$URI" --tracking.experiment ood --tracking.run_name "$kind-$name-s$seed" \
        --fit.checkpoint_dir "$STORE/checkpoints/$kind-$name-s$seed"
    done
  done
}
if [[ $STEP == train || $STEP == all ]]; then
  for group in $TRAIN; do train_source "$group" & done
  wait
fi
if [[ $STEP == score || $STEP == all ]]; then
  "$PYTHON" - "$URI" "$ONLY" <<'PY' | while read -r run_id against ood samples; do
import re
import sys
from mlflow import MlflowClient
client = MlflowClient(sys.argv[1])
experiment = client.get_experiment_by_name("ood")
other = {"mnist": "fashion-mnist", "fashion-mnist": "mnist"}
for run in client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'", order_by=["start_time"]):
    source, metrics, name = run.data.tags["data_source"], run.data.metrics, run.info.run_name
    if not re.search(sys.argv[2], name):
        continue
    heldout = "-0to8-" in name  # trained on digits 0-8: detect the 9s; no sample-quality score
    against = "heldout" if heldout else other[source]
    print(run.info.run_id, against, f"ood/{against}/seconds" not in metrics, not heldout and "samples/test_fd_half" not in metrics)
PY
    if [[ $ood == True && $DO == *ood* ]]; then
      nice -n 5 "$PYTHON" -m aevae ood --run-id "$run_id" --against "$against" --k "$K" \
        --max_images "$MAX_IMAGES" --tracking-uri "$URI" </dev/null
    fi
    if [[ $samples == True && $DO == *samples* ]]; then
      nice -n 5 "$PYTHON" -m aevae samples --run-id "$run_id" --n "$N_SAMPLES" --tracking-uri "$URI" </dev/null
    fi
  done
fi
if [[ $STEP == table || $STEP == score || $STEP == all ]]; then
  "$PYTHON" - "$URI" <<'PY'
import sys
import numpy as np
from mlflow import MlflowClient

client = MlflowClient(sys.argv[1])
runs = client.search_runs([client.get_experiment_by_name("ood").experiment_id], "attributes.status = 'FINISHED'")
other = {"mnist": "fashion-mnist", "fashion-mnist": "mnist"}
def seeds(group, kind):
    """One metrics dict per seed of the runs named KIND-GROUP-sSEED: a seed trained twice (same config, same
    weights) counts once."""
    merged = {}
    for r in sorted(runs, key=lambda r: r.info.start_time):
        if r.info.run_name.rsplit("-s", 1)[0] == f"{kind}-{group}":
            into = merged.setdefault(r.data.tags["seed"], {})
            into.update({k: v for k, v in r.data.metrics.items() if k not in into})
    return list(merged.values())
def cell(values):
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f} (n={len(values)})" if len(values) > 1 else (f"{values[0]:.3f} (n=1)" if values else "n/a")
def auroc_table(group, against, title):
    print(f"\n{title}: AUROC, mean ± std over seeds; mean score in / out\n")
    print("| score | AE AUROC | VAE AUROC | AE mean in / out | VAE mean in / out |\n|---|---:|---:|---:|---:|")
    for score in ("recon", "nelbo", "iwae", "mahalanobis", "complexity"):
        cells, means = [], []
        for kind in ("ae", "vae"):
            mine = seeds(group, kind)
            key = f"ood/{against}/{score}"
            cells.append(cell([m[f"{key}/auroc"] for m in mine if f"{key}/auroc" in m]))
            ins, outs = [m[f"{key}/mean_in"] for m in mine if f"{key}/mean_in" in m], [m[f"{key}/mean_out"] for m in mine if f"{key}/mean_out" in m]
            means.append(f"{np.mean(ins):.1f} / {np.mean(outs):.1f}" if ins else "n/a")
        print(f"| {score} | {' | '.join(cells)} | {' | '.join(means)} |")
for source in ("mnist", "fashion-mnist"):
    auroc_table(source, other[source], f"{source} (in) -> {other[source]} (out)")
auroc_table("mnist-0to8", "heldout", "MNIST digits 0-8 (in) -> digit 9 (out)")
print("\nsample quality on the training source's test images: mean ± std over seeds\n")
print("| data | sampler | FD | precision | recall |\n|---|---|---:|---:|---:|")
for source in ("mnist", "fashion-mnist"):
    for kind, sampler in (("vae", "prior"), ("vae", "gmm"), ("ae", "gmm")):
        mine = seeds(source, kind)
        row = [cell([m[f"samples/{sampler}/{x}"] for m in mine if f"samples/{sampler}/{x}" in m]) for x in ("fd", "precision", "recall")]
        print(f"| {source} | {kind.upper()} {sampler} | {' | '.join(row)} |")
    floor = [m["samples/test_fd_half"] for m in seeds(source, "ae") + seeds(source, "vae") if "samples/test_fd_half" in m]
    print(f"| {source} | test half vs half (floor) | {cell(floor)} | | |")
PY
fi
