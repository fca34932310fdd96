#!/usr/bin/env bash
# Wheels for a lent GPU machine (Python 3.12, x86-64, no network, PyTorch and Lightning already there): aevae's
# dependencies for that platform, less what its image already holds (scripts/device_packages.txt), into .whl/
# (git-ignored), and the MNIST files into .data/ (git-ignored). Then scripts/gpu_run.sh there installs and runs.
#   bash scripts/device_wheels.sh [MNIST_ROOT]     # MNIST_ROOT holds MNIST/raw/*.gz (default: $AEVAE_DATA_ROOT)
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
rm -rf .whl && mkdir -p .whl
"$PIP" download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl \
  "mlflow>=3.7,<4" "optuna>=5,<6" "optuna-integration>=5,<6" "jsonargparse[signatures]>=4.40" \
  "umap-learn>=0.5.7" "mlxtend>=0.23" pyyaml
for wheel in .whl/*.whl; do
  name=$(basename "$wheel" | sed 's/-[0-9].*//' | tr 'A-Z_' 'a-z-')
  if grep -qx "$name" scripts/device_packages.txt; then rm "$wheel"; fi
done
root=${1:-${AEVAE_DATA_ROOT:-../shared/datasets}}
mkdir -p .data/MNIST/raw && cp "$root"/MNIST/raw/*.gz .data/MNIST/raw/
du -sh .whl .data
