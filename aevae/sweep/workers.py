"""Sweep workers: processes on one machine that take trials from the shared study until it holds n_trials."""

from __future__ import annotations

import fcntl
import hashlib
import math
import multiprocessing
import multiprocessing.connection
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
from optuna.trial import FrozenTrial, TrialState

from aevae import console
from aevae.errors import UsageError
from aevae.sweep import placement
from aevae.sweep.config import Sweep
from aevae.sweep.space import build_sampler
from aevae.sweep.study import counted, load_study
from aevae.sweep.trials import USAGE_ERROR_ATTR, objective

USAGE_EXIT = 2  # a worker's exit code for bad input, as the CLI's
PROGRESS_EVERY_S = 2.0  # how often the parent of worker processes reads the study for its progress line


@contextmanager
def machine_lock(key: str) -> Iterator[Callable[[], None]]:
    """A lock shared by this machine's processes (flock on a file named after key); yields an early release."""
    path = Path(tempfile.gettempdir()) / f"aevae-{hashlib.sha1(key.encode()).hexdigest()[:16]}.lock"
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield lambda: fcntl.flock(handle, fcntl.LOCK_UN)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def stop_on_usage_error(study: optuna.Study, trial: FrozenTrial) -> None:
    """A trial that failed on bad input (a data file gone, a value no model takes) would fail every trial: stop."""
    if USAGE_ERROR_ATTR in trial.user_attrs:
        raise UsageError(trial.user_attrs[USAGE_ERROR_ATTR])


def work(sweep: Sweep, parent_run_id: str, on_trial: Callable[[], None] = lambda: None) -> None:
    """One worker: run trials until the study holds n_trials (or time is up), then wait while others still run
    theirs, so that a trial whose worker dies is found stale and run again."""
    study = load_study(sweep)
    deadline = time.monotonic() + (sweep.timeout or math.inf)
    while time.monotonic() < deadline:
        # One local worker at a time goes from "is a trial left?" to Optuna's ask(), so that workers on one
        # machine never start more than n_trials; the trial's number is taken when the objective releases it.
        with machine_lock(f"{sweep.storage}#{sweep.study}") as release:
            optuna.storages.fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
            waiting = any(t.state == TrialState.WAITING for t in trials)
            if waiting or sweep.n_trials is None or counted(trials) < sweep.n_trials:
                study.sampler = build_sampler(sweep.sampler, sweep.space, offset=len(trials))
                run = partial(objective, sweep=sweep, parent_run_id=parent_run_id, started=release)
                study.optimize(
                    run, n_trials=1, catch=(Exception,), callbacks=[stop_on_usage_error, lambda *_: on_trial()]
                )
                continue
        if not any(t.state == TrialState.RUNNING for t in trials):
            return
        time.sleep(1)


def _worker_process(sweep: Sweep, parent_run_id: str, gpu: str | None, threads: int, errors: Any) -> None:
    placement.pin(gpu)  # before torch starts CUDA
    import torch

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop like Ctrl-C: runs closed, trial re-queued
    torch.set_num_threads(threads)
    console.quiet_libraries()  # a spawned process starts with the libraries' default logging
    try:
        work(sweep, parent_run_id)
    except UsageError as err:
        errors.put(str(err))
        sys.exit(USAGE_EXIT)


def run_workers(sweep: Sweep, parent_run_id: str, on_trial: Callable[[], None] = lambda: None) -> None:
    """--workers 1 without --gpus works in this process; otherwise N fresh (spawned) processes, each pinned to
    its GPU (if any) with its share of the CPU cores. Bad input in one worker stops them all."""
    if sweep.workers == 1 and sweep.gpus is None:
        work(sweep, parent_run_id, on_trial)
        return
    context = multiprocessing.get_context("spawn")  # no SQLite/SQLAlchemy connection crosses a fork
    threads = placement.threads_per_worker(sweep.workers)
    errors = context.SimpleQueue()
    gpus = placement.place(sweep.workers, sweep.gpus or [])
    processes = [
        context.Process(target=_worker_process, args=(sweep, parent_run_id, gpu, threads, errors)) for gpu in gpus
    ]
    for process in processes:
        process.start()
    try:
        running = list(processes)
        while running:
            multiprocessing.connection.wait([process.sentinel for process in running], timeout=PROGRESS_EVERY_S)
            on_trial()
            running = [process for process in running if process.exitcode is None]
            if any(process.exitcode == USAGE_EXIT for process in processes):
                break
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()  # SIGTERM: each closes its run and re-queues its trial
                process.join(60)
    if not errors.empty():
        raise UsageError(errors.get())
    failed = [process.exitcode for process in processes if process.exitcode]
    if failed:
        raise RuntimeError(f"{len(failed)} of {sweep.workers} workers failed (exit codes {failed})")
