# Two commands on a fresh machine: `make demo` (main job, embedded data) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export MPLBACKEND := Agg

.PHONY: demo test install install-dev system-deps benchmarks snapshot mutation clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch/torchvision come first and alone: pip takes them from this machine's disk.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

system-deps:
	bash scripts/install_system_deps.sh

# AE vs VAE on the embedded 5k MNIST digits, 3 seeds each: prints the score table and the figure's path.
demo: install
	$(BIN)/aevae compare --config experiments/ae_vs_vae_demo.yaml

# Two passes: every test but those marked serial on PYTEST_WORKERS processes (pytest-xdist: test by test, a file
# that shares a costly module fixture as one group), then the serial ones (signals, kills, heartbeats, an outage)
# with the machine to themselves.
PYTEST_WORKERS ?= 2
test: install system-deps
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup -m "not serial"
	$(BIN)/python -m pytest -q -m serial

# Mutation testing of the numeric core (not in CI; an hour or more on 2 cores): the functions below, mutated one
# at a time, each run against the fast numeric tests ([tool.mutmut] in pyproject.toml). Score: docs/faults.md.
MUTATED := "aevae.models.x_reconstruction_nll*" "aevae.models.x_gaussian_kl_per_dim*" "aevae.models.x_kl_warmup*" \
	"aevae.models.xǁVAEǁloss_terms*" "aevae.models.xǁAEǁloss_terms*" "aevae.models.xǁVAEǁbeta*" \
	"aevae.models.xǁVAEǁforward__*" "aevae.models.xǁLatentAutoencoderǁ_accumulate*" \
	"aevae.models.xǁLatentAutoencoderǁ_log_epoch*" "aevae.analysis.x_silhouette*" "aevae.analysis.x_sample_index*" \
	"aevae.analysis.x_probe_scores*" "aevae.analysis.x_kl_scores*" "aevae.compare.x_mean_std*" \
	"aevae.compare.x_paired_p*" "aevae.compare.x_score_table*"
# OMP_NUM_THREADS=1: torch's OpenMP pool does not survive the fork of mutmut's workers (they hung at 0% CPU).
mutation: install
	OMP_NUM_THREADS=1 nice -n 5 $(BIN)/mutmut run --max-children 2 $(MUTATED)
	$(BIN)/mutmut results

# Record mlruns/ in mlruns.dvc and push it to the default DVC remote (refused while anything writes to it).
snapshot: install
	$(BIN)/aevae snapshot

benchmarks: install
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/analysis.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
