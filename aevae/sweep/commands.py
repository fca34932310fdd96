"""`aevae sweep` and `aevae best`: run or resume a study and record it, or print a study's best trials."""

from __future__ import annotations

import signal
from typing import Sequence

import optuna
from optuna.trial import TrialState
from jsonargparse import ArgumentParser
from jsonargparse.typing import PositiveFloat, PositiveInt

from aevae import console, tracking, training
from aevae.sweep import placement
from aevae.errors import CommandFailed, UsageError
from aevae.sweep.config import Sweep, check_study_name, default_storage, load_sweep
from aevae.sweep.progress import SweepProgress
from aevae.sweep.report import describe, summarize
from aevae.sweep.study import open_storage, open_study
from aevae.sweep.workers import machine_lock, run_workers


def run_sweep(sweep: Sweep) -> optuna.Study:
    """Create or resume the study, run the workers, then record the result on the parent run."""
    from mlflow import MlflowClient

    tracking.wait_out_http_outages(sweep.outage_wait)  # before the workers start: they inherit it
    storage = open_storage(sweep.storage, outage_wait=sweep.outage_wait)  # unreachable: fails before MLflow is touched
    with machine_lock(sweep.tracking_uri):  # sweeps started at once on a fresh store: one creates its tables
        client = MlflowClient(tracking.open_store(sweep.tracking_uri))
    study, parent_run_id = open_study(sweep, storage, client)
    client.set_tag(parent_run_id, "n_trials", str(sweep.n_trials))
    error: BaseException | None = None
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    progress = SweepProgress(sweep, study)
    try:
        run_workers(sweep, parent_run_id, progress.update)
        summarize(study, sweep, client, parent_run_id)
        check_some_trial_finished(study)
        return study
    except BaseException as err:
        error = err
        raise
    finally:
        progress.close()
        signal.signal(signal.SIGTERM, previous)
        tracking.close_run(client, parent_run_id, error)


def check_some_trial_finished(study: optuna.Study) -> None:
    """A sweep whose every trial failed has failed (the parent run too), though each failure is recorded."""
    trials = study.get_trials(deepcopy=False)
    if trials and all(t.state == TrialState.FAIL for t in trials):
        reason = trials[-1].user_attrs.get("fail_reason", "see the trials' failure_reason tags")
        raise CommandFailed(f"all {len(trials)} trials failed; the last: {reason}")


def sweep_command(args: Sequence[str]) -> int:
    parser = ArgumentParser(prog="aevae sweep", exit_on_error=False, default_meta=False)
    parser.add_argument("--config", type=str, required=True, help="sweep config (sweeps/*.yaml)")
    parser.add_argument("--n-trials", type=PositiveInt | None, default=None, help="trials in the study in total")
    parser.add_argument(
        "--timeout", type=PositiveFloat | None, default=None, help="seconds after which no trial starts"
    )
    parser.add_argument("--workers", type=PositiveInt, default=1, help="worker processes on this machine")
    parser.add_argument("--storage", type=str | None, default=None, help="Optuna storage URL (any SQLAlchemy URL)")
    parser.add_argument("--study", type=str | None, default=None, help="study name (default: the config's)")
    parser.add_argument(
        "--gpus", type=str | None, default=None, help="GPUs for the workers, e.g. 0,2 (default: all visible)"
    )
    options = training.parse_config(args, parser)
    gpus = worker_gpus(options.gpus, options.workers)
    sweep = load_sweep(
        options.config, options.n_trials, options.timeout, options.workers, options.storage, options.study, gpus
    )
    study = run_sweep(sweep)
    console.say(describe(study))
    where = tracking.mask_secrets(sweep.storage)
    console.summary(f"study {sweep.study} in {where} (again: aevae best --study {sweep.study})")
    console.summary("open it: aevae ui")
    return 0


def worker_gpus(listed: str | None, workers: int) -> list[str] | None:
    """The GPUs the workers are pinned to: those listed, or with several workers every visible GPU; None (no
    pinning) for one worker and no --gpus, which trains in this process as `aevae train` would."""
    visible = placement.visible_gpus()
    if listed is None and (workers == 1 or not visible):
        return None
    return placement.parse_gpus(listed, visible)


def best_command(args: Sequence[str]) -> int:
    parser = ArgumentParser(prog="aevae best", exit_on_error=False, default_meta=False)
    parser.add_argument("--study", type=str, required=True, help="study name")
    parser.add_argument(
        "--storage", type=str | None, default=None, help="Optuna storage URL (default: mlruns/optuna.db)"
    )
    options = training.parse_config(args, parser)
    check_study_name(options.study, "--study")
    url = options.storage or default_storage(tracking.default_tracking_uri())
    storage = open_storage(tracking.require_existing(url, "--storage"))
    names = optuna.get_all_study_names(storage)
    if options.study not in names:
        where = tracking.mask_secrets(storage.url)
        raise UsageError(f"--study: no study {options.study!r} in {where} (studies: {', '.join(names) or 'none'})")
    console.say(describe(optuna.load_study(study_name=options.study, storage=storage)))
    return 0
