"""Optuna sweeps: a sweep config run as one Optuna study by worker processes on one or many machines,
one MLflow parent run per study and one child run per trial (each an `aevae train` run).

space (distributions, sampler) -> config (validated sweep) -> study (storage, parent run) -> trials ->
workers -> report (plots, summary, `best`) -> commands (`aevae sweep`, `aevae best`).
"""

from aevae import training
from aevae.sweep.commands import best_command, run_sweep, sweep_command
from aevae.sweep.config import (
    STORE_FILE, Objective, Sweep, check_study_name, default_storage, known_metrics, load_sweep,
)  # fmt: skip
from aevae.sweep.report import describe, summarize
from aevae.sweep.space import cli_args
from aevae.sweep.study import PARENT_ATTR, RUN_ID_ATTR, counted, load_study, open_storage, open_study
from aevae.sweep.trials import objective, sample
from aevae.sweep.workers import run_workers, work

__all__ = [
    "PARENT_ATTR", "RUN_ID_ATTR", "STORE_FILE", "Objective", "Sweep", "best_command", "check_study_name", "cli_args",
    "counted", "default_storage", "describe", "known_metrics", "load_study", "load_sweep", "objective",
    "open_storage", "open_study", "run_sweep", "run_workers", "sample", "summarize", "sweep_command", "training",
    "work",
]  # fmt: skip
