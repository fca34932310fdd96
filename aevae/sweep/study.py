"""A sweep's Optuna study and its storage, and the study's MLflow parent run: create, resume, re-queue."""

from __future__ import annotations

import json
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

import optuna
import sqlalchemy
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial

from aevae import tracking, training
from aevae.errors import UsageError
from aevae.sweep.config import Sweep
from aevae.sweep.patience import DEFAULT_OUTAGE_WAIT_S, PatientStorage
from aevae.sweep.space import build_pruner

MAX_RETRY = 2  # a trial whose worker dies is re-queued at most this often
RUN_ID_ATTR = "mlflow_run_id"
PARENT_ATTR = "mlflow_parent_run_id"
SWEEP_ATTR = "sweep"

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def counted(trials: Sequence[FrozenTrial]) -> int:
    """Trials that count toward n_trials: all but those re-queued (their retry counts in their place)."""
    requeued = {number for t in trials for number in t.system_attrs.get("retry_history", ())}
    return sum(t.number not in requeued for t in trials)


def open_storage(
    url: str,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    stale_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None,
    outage_wait: float = DEFAULT_OUTAGE_WAIT_S,
) -> PatientStorage:
    """Optuna's RDB storage (heartbeats need it), riding out a database outage of up to outage_wait seconds;
    a URL it cannot open is a UsageError before anything is created."""
    scheme = urlsplit(url).scheme.split("+")[0]
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    # Several processes write one SQLite file: wait for its lock rather than fail; never hang on a dead host.
    connect_args = {"sqlite": {"timeout": 60}, "postgresql": {"connect_timeout": 10}}.get(scheme, {})
    for attempt in range(1, 6):
        try:
            storage = PatientStorage(
                url,
                engine_kwargs={"connect_args": connect_args, "pool_pre_ping": True},  # restarted server: fresh connections
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=stale_callback,
            )
            break
        except Exception as err:  # sqlalchemy's ArgumentError, OperationalError, a missing driver, ...
            # Workers starting at once on a new database race to create Optuna's tables: the loser retries.
            if attempt < 5 and (isinstance(err, sqlalchemy.exc.IntegrityError) or "already exists" in str(err)):
                time.sleep(attempt)
                continue
            raise UsageError(f"storage: cannot open {tracking.mask_secrets(url)} ({training.one_line(err)})") from err
    storage.outage_wait = outage_wait
    if scheme == "sqlite":
        sqlalchemy.event.listen(storage.engine, "connect", _write_ahead_log)
        storage.engine.dispose()  # the connection that created the tables goes; new ones get the pragmas
    return storage


def _write_ahead_log(connection: Any, record: Any) -> None:
    """SQLite in WAL mode: readers never block the writer, and a commit is not an fsync (synchronous=NORMAL:
    a killed process loses nothing committed; only a power cut can lose the last commits). Each epoch's report
    to the pruner is a commit, which otherwise costs tens of milliseconds on a busy disk."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _fingerprint(sweep: Sweep) -> str:
    """What must not change when a study is resumed: its space and objectives."""
    space = {key: optuna.distributions.distribution_to_json(d) for key, d in sweep.space.items()}
    return json.dumps({"space": space, "objectives": [vars(o) for o in sweep.objectives]}, sort_keys=True)


def end_trial_run(
    tracking_uri: str, run_id: str | None, state: str, reason: str | None = None, status: str | None = None
) -> None:
    """Tag a trial's MLflow run with its final Optuna state (and why), optionally re-closing it."""
    from mlflow import MlflowClient

    if not run_id:
        return
    client = MlflowClient(tracking_uri)
    client.set_tag(run_id, "optuna.state", state)
    if reason:
        client.set_tag(run_id, "failure_reason", tracking.mask_secrets(reason)[:4000])
    if status:
        client.set_terminated(run_id, status=status)


def requeue(study: optuna.Study, trial: FrozenTrial, tracking_uri: str, reason: str) -> None:
    """A trial whose worker stopped (SIGKILL: found by its stale heartbeat; Ctrl-C/SIGTERM: at once) is queued
    again with the same params, up to MAX_RETRY times; its MLflow run, left RUNNING by a dead worker, is KILLED."""
    RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, trial)
    run_id = trial.user_attrs.get(RUN_ID_ATTR) or running_run_of(tracking_uri, study.study_name, trial.number)
    end_trial_run(tracking_uri, run_id, "FAIL", reason, status="KILLED")


def running_run_of(tracking_uri: str, study: str, number: int) -> str | None:
    """The RUNNING run of a trial whose worker died before training started (its run id not yet in the study)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    query = f"tags.`optuna.study` = '{study}' and tags.`optuna.trial` = '{number}' and attributes.status = 'RUNNING'"
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], query, max_results=1)
    return runs[0].info.run_id if runs else None


def load_study(sweep: Sweep) -> optuna.Study:
    """The study as a worker sees it: heartbeats on, stale trials re-queued."""
    stale = partial(
        requeue, tracking_uri=sweep.tracking_uri, reason=f"worker died (no heartbeat for {sweep.grace_period}s)"
    )
    storage = open_storage(sweep.storage, sweep.heartbeat_interval, sweep.grace_period, stale, sweep.outage_wait)
    return optuna.load_study(study_name=sweep.study, storage=storage, pruner=build_pruner(sweep.pruner))


def _create_parent_run(client: Any, sweep: Sweep) -> str:
    """The study's MLflow parent run: what was searched, how, and where the study lives."""
    from mlflow.entities import Param

    tags = {
        "optuna.study": sweep.study,
        "optuna.storage": tracking.mask_secrets(sweep.storage),
        "aevae.sweep": "parent",
    }
    run = client.create_run(
        tracking.experiment_id(client, sweep.experiment, sweep.tracking_uri), run_name=sweep.study, tags=tags
    )
    params = {
        "study": sweep.study,
        "sampler": json.dumps(sweep.sampler),
        "pruner": json.dumps(sweep.pruner),
        "storage_kind": urlsplit(sweep.storage).scheme.split("+")[0],
        "objectives": ", ".join(f"{o.metric} ({o.direction})" for o in sweep.objectives),
        "experiment_config": sweep.base_args[1],
        **{f"space.{key}": repr(d) for key, d in sweep.space.items()},
    }
    client.log_batch(run.info.run_id, params=[Param(key, str(value)) for key, value in params.items()])
    client.log_artifact(run.info.run_id, sweep.path)
    return run.info.run_id


def open_study(sweep: Sweep, storage: PatientStorage, client: Any) -> tuple[optuna.Study, str]:
    """Create the study and its parent run, or resume both (same space and objectives) after a stop."""
    directions = [o.direction for o in sweep.objectives]
    try:
        study = optuna.create_study(storage=storage, study_name=sweep.study, directions=directions)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=sweep.study, storage=storage)
        return study, _resumed_parent(study, sweep, client)
    parent_run_id = _create_parent_run(client, sweep)
    study.set_metric_names([o.metric for o in sweep.objectives])
    study.set_user_attr(SWEEP_ATTR, _fingerprint(sweep))
    study.set_user_attr(PARENT_ATTR, parent_run_id)  # last: the mark that the study is ready for workers
    return study, parent_run_id


def _resumed_parent(study: optuna.Study, sweep: Sweep, client: Any, wait_s: float = 60) -> str:
    """The parent run of an existing study, once its creator (maybe another machine, right now) has set it up."""
    deadline = time.monotonic() + wait_s
    while PARENT_ATTR not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(1)
    if PARENT_ATTR not in study.user_attrs:
        raise UsageError(
            f"study {sweep.study} has no MLflow parent run: it was not made by aevae sweep; use another name"
        )
    if study.user_attrs.get(SWEEP_ATTR) != _fingerprint(sweep):
        raise UsageError(
            f"study {sweep.study} exists in {tracking.mask_secrets(sweep.storage)} with another space or objectives; "
            "resume it with its own config or choose another study name"
        )
    parent_run_id = study.user_attrs[PARENT_ATTR]
    client.update_run(parent_run_id, status="RUNNING")
    return parent_run_id
