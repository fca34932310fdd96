"""Optuna sweeps: a sweep config (base experiment + search space + objectives) run as one Optuna study
by N worker processes on one or many machines, one MLflow parent run per study and one child run per trial.

Every trial is a normal `aevae train` run: its config is the base experiment plus the trial's values as
dotted CLI overrides, parsed by `training.parse_config` and trained by `training.run_training`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import multiprocessing
import os
import re
import signal
import socket
import tempfile
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import urlsplit

import optuna
import sqlalchemy
import yaml
from jsonargparse import ArgumentParser, Namespace
from jsonargparse.typing import PositiveFloat, PositiveInt
from lightning.pytorch.callbacks import Callback
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from optuna_integration import PyTorchLightningPruningCallback

from aevae import sweep_map, tracking, training
from aevae.errors import UsageError

SWEEP_KEYS = (
    "study", "experiment", "overrides", "space", "objectives", "n_trials", "timeout",
    "sampler", "pruner", "storage", "heartbeat_interval", "grace_period",
)  # fmt: skip
SAMPLERS = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler, "grid": optuna.samplers.GridSampler}
PRUNERS = {
    "median": optuna.pruners.MedianPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "none": optuna.pruners.NopPruner,
}
# What run_training puts in TrainingResult.metrics: per-epoch metrics per stage, then the latent analysis.
EPOCH_METRICS = ("loss", "recon", "kl", "nelbo", "active_units")
VAE_ONLY_METRICS = ("kl", "nelbo", "active_units")
ANALYSIS_METRICS = ("silhouette_latent", "silhouette_pca", "silhouette_umap", "knn_acc", "probe_acc")
STORE_FILE = "optuna.db"  # beside mlflow.db in mlruns/, so DVC versions studies with their runs
MAX_RETRY = 2  # a trial whose worker dies is re-queued at most this often
RUN_ID_ATTR = "mlflow_run_id"
PARENT_ATTR = "mlflow_parent_run_id"
SWEEP_ATTR = "sweep"
CONTOUR_PARAMS = ["model.latent_dim", "model.kl_weight"]

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str  # minimize | maximize


@dataclass(frozen=True)
class Sweep:
    """A validated sweep config: all a worker process needs (picklable)."""

    path: str
    study: str
    base_args: tuple[str, ...]  # --config experiment.yaml plus the fixed overrides, as CLI args
    space: dict[str, BaseDistribution]  # sweep key (model.latent_dim) -> distribution; model.class first
    model_args: dict[str, frozenset[str]]  # searched model.class choice -> the init args it accepts
    objectives: tuple[Objective, ...]
    n_trials: int | None
    timeout: float | None
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    storage: str
    heartbeat_interval: int
    grace_period: int
    tracking_uri: str
    experiment: str  # MLflow experiment
    workers: int


# --- sweep config -------------------------------------------------------------------------


@cache
def experiment_parser() -> ArgumentParser:
    """training.build_parser, built once a process (it inspects every Trainer argument)."""
    return training.build_parser()


def config_key(key: str) -> str:
    """Sweep (and MLflow param) names -> experiment config keys: model.class -> model.class_path,
    model.latent_dim -> model.init_args.latent_dim; other keys are the same."""
    head, _, rest = key.partition(".")
    if head != "model":
        return key
    return "model.class_path" if rest == "class" else f"model.init_args.{rest}"


def cli_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def cli_args(values: dict[str, Any]) -> list[str]:
    return [arg for key, value in values.items() for arg in (f"--{config_key(key)}", cli_value(value))]


def _named(spec: Any, where: str, choices: dict[str, Any]) -> dict[str, Any]:
    """`tpe` or {name: tpe, seed: 0, ...} -> {name: tpe, ...}, name checked."""
    spec = {"name": spec} if isinstance(spec, str) else dict(spec or {"name": "none"})
    if spec.get("name") not in choices:
        raise UsageError(f"{where}.name: unknown {spec.get('name')!r}; choose one of {', '.join(choices)}")
    return spec


def _sampler(spec: dict[str, Any], space: dict[str, BaseDistribution], offset: int = 0) -> optuna.samplers.BaseSampler:
    """Seeded per trial (seed + trials so far): resumed and parallel studies never repeat a draw.
    `grid` visits every combination of the space's choice lists once: trial n takes cell n of one seeded
    shuffle of the grid, so its seed must not change between trials."""
    kwargs = {key: value for key, value in spec.items() if key not in ("name", "seed")}
    if spec["name"] == "grid":
        ranges = [key for key, d in space.items() if not isinstance(d, CategoricalDistribution)]
        if ranges:
            raise ValueError(f"grid needs a list of choices for every key; space.{ranges[0]} is a range")
        kwargs["search_space"] = {key: list(d.choices) for key, d in space.items()}
        offset = 0
    return SAMPLERS[spec["name"]](seed=spec.get("seed", 0) + offset, **kwargs)


def _pruner(spec: dict[str, Any]) -> optuna.pruners.BasePruner:
    return PRUNERS[spec["name"]](**{key: value for key, value in spec.items() if key != "name"})


def _distribution(key: str, spec: Any, base_value: Any) -> BaseDistribution:
    """{low, high[, log, step]} -> int or float range (float if a bound or the config value is); a list -> choices."""
    where = f"space.{key}"
    spec = {"choices": spec} if isinstance(spec, list) else spec
    if not isinstance(spec, dict) or not spec or set(spec) - {"low", "high", "log", "step", "choices"}:
        raise UsageError(f"{where}: expected {{low, high, log, step}} or a list of choices, got {spec!r}")
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise UsageError(f"{where}: empty list of choices")
        # Optuna stores scalars; a list choice (hidden_dims) travels as its CLI text, e.g. "[64, 32]".
        return CategoricalDistribution(
            [c if isinstance(c, (str, int, float, bool)) else json.dumps(c) for c in choices]
        )
    low, high, log, step = spec.get("low"), spec.get("high"), bool(spec.get("log", False)), spec.get("step")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        raise UsageError(f"{where}: low and high must be numbers, got low={low!r} high={high!r}")
    if low > high:
        raise UsageError(f"{where}: low ({low}) > high ({high})")
    if low == high:
        raise UsageError(f"{where}: empty range (low == high == {low}); set a fixed value in overrides instead")
    if log and low <= 0:
        raise UsageError(f"{where}: a log scale needs low > 0, got {low}")
    try:
        if any(isinstance(v, float) for v in (low, high, base_value)):
            return FloatDistribution(low, high, log=log, step=step)
        return IntDistribution(low, high, log=log, step=step or 1)
    except ValueError as err:
        raise UsageError(f"{where}: {err}") from err


def _corners(distribution: BaseDistribution) -> list[Any]:
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    return [distribution.low, distribution.high]


def _applies(model_args: dict[str, frozenset[str]], key: str, params: dict[str, Any]) -> bool:
    """With model.class searched, a model key (model.kl_weight) is sampled only for classes that take it."""
    model_class = params.get("model.class")
    return model_class is None or not key.startswith("model.") or key.partition(".")[2] in model_args[model_class]


def _check(args: Sequence[str], parser: ArgumentParser, where: str) -> Namespace:
    """Parse and build a config as a trial would (model constructors check their ranges): bad -> UsageError."""
    try:
        config = training.parse_config(list(args), parser)
        training.instantiate(config, parser)
        training.check_trainer(config)
    except UsageError as err:
        raise UsageError(f"{where}: {err}") from err
    return config


def _space(raw: Any, base_args: list[str], base: Namespace, parser: ArgumentParser) -> tuple[dict, dict]:
    """The search space, and the config of each searched model.class choice. Every key must exist in the
    experiment config (a model key in one of the searched classes); every bound and choice must build."""
    if not isinstance(raw, dict) or not raw:
        raise UsageError("space: expected a mapping of config keys to ranges or choices")
    keys = sorted(raw, key=lambda key: key != "model.class")  # model.class first: model keys depend on it
    space = {key: _distribution(key, raw[key], base.get(config_key(key))) for key in keys}
    classes = {
        choice: _check([*base_args, *cli_args({"model.class": choice})], parser, f"space.model.class={choice!r}")
        for choice in (_corners(space["model.class"]) if "model.class" in space else [])
    }
    for key in keys[bool(classes) :]:
        head, _, arg = key.partition(".")
        takers = [c for c, config in classes.items() if arg in config.model.init_args] if head == "model" else []
        missing = not takers if classes and head == "model" else config_key(key) not in base
        if missing:
            raise UsageError(f"space.{key}: no such key in the experiment config")
        for value in _corners(space[key]):
            params = {"model.class": takers[0], key: value} if takers else {key: value}
            _check([*base_args, *cli_args(params)], parser, f"space.{key}={value!r}")
    return space, classes


def known_metrics() -> list[str]:
    return [f"{stage}/{name}" for stage in ("val", "test", "train") for name in EPOCH_METRICS] + list(ANALYSIS_METRICS)


def _objectives(raw: Any, configs: list[Namespace]) -> tuple[Objective, ...]:
    """One metric and direction, or several (a multi-objective study), each one the trials will log."""
    if not isinstance(raw, list) or not raw:
        raise UsageError(
            "objectives: expected a list of {metric, direction}, e.g. [{metric: val/nelbo, direction: minimize}]"
        )
    objectives = []
    for i, spec in enumerate(raw):
        where = f"objectives[{i}]"
        if not isinstance(spec, dict) or set(spec) - {"metric", "direction"}:
            raise UsageError(f"{where}: expected {{metric, direction}}, got {spec!r}")
        metric, direction = spec.get("metric"), spec.get("direction", "minimize")
        if metric not in known_metrics():
            raise UsageError(f"{where}.metric: unknown metric {metric!r}; choose one of {', '.join(known_metrics())}")
        if direction not in ("minimize", "maximize"):
            raise UsageError(f"{where}.direction: expected minimize or maximize, got {direction!r}")
        if metric.partition("/")[2] in VAE_ONLY_METRICS and any(training.model_kind(c) != "vae" for c in configs):
            raise UsageError(f"{where}.metric: {metric} is only logged for VAE models")
        if metric.startswith("test/") and not all(c.fit.test for c in configs):
            raise UsageError(f"{where}.metric: {metric} needs fit.test: true in the experiment config")
        if metric in ANALYSIS_METRICS and not all(
            c.analysis.enabled and (c.analysis.umap or "umap" not in metric) for c in configs
        ):
            raise UsageError(
                f"{where}.metric: {metric} needs the latent analysis (analysis.enabled, analysis.umap for UMAP)"
            )
        objectives.append(Objective(metric, direction))
    if len({o.metric for o in objectives}) < len(objectives):
        raise UsageError("objectives: the same metric twice")
    return tuple(objectives)


def _check_pruner(pruner: dict[str, Any], objectives: tuple[Objective, ...]) -> None:
    if pruner["name"] == "none":
        return
    if len(objectives) > 1:
        raise UsageError("pruner: Optuna cannot prune multi-objective studies; use pruner: none")
    if not objectives[0].metric.startswith("val/"):
        raise UsageError(
            f"pruner: prunes on the objective each epoch, so it must be a val/ metric, not {objectives[0].metric}"
        )


def _check_single_device(config: Namespace) -> None:
    """A trial trains on one device: DDP would re-run the sweep on every rank, each rank sampling its own trial.
    Several trials at once is what --workers (and more machines) are for."""
    devices = config.trainer.devices
    one = devices in (1, "1") or (isinstance(devices, list) and len(devices) == 1)
    if not one or (config.trainer.num_nodes or 1) != 1:
        raise UsageError(
            f"trainer.devices={devices!r}, num_nodes={config.trainer.num_nodes}: a sweep trains each trial on one "
            "device (set trainer.devices: 1); run trials in parallel with --workers"
        )


def check_study_name(name: str, field: str) -> str:
    """A study name also names MLflow runs and folders: letters, digits, '.', '_', '-'; no path separators."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name) or ".." in name:
        raise UsageError(f"{field}: {name!r} is not a study name; use letters, digits, '.', '_', '-' (no '/' or '..')")
    return name


def default_storage(tracking_uri: str) -> str:
    """SQLite beside the MLflow store (./mlruns/optuna.db by default)."""
    folder = tracking.local_store_dir(tracking_uri) or tracking.DEFAULT_STORE
    return f"sqlite:///{(folder / STORE_FILE).resolve()}"


def _number(raw: dict, key: str, kind: type, minimum: float) -> Any:
    value = raw.get(key)
    if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < minimum):
        raise UsageError(f"{key}: expected a {kind.__name__} >= {minimum}, got {value!r}")
    return None if value is None else kind(value)


def load_sweep(
    path: str,
    n_trials: int | None = None,
    timeout: float | None = None,
    workers: int = 1,
    storage: str | None = None,
    study: str | None = None,
) -> Sweep:
    """Read and validate a sweep config (command-line values win); nothing is created here but the store folder."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UsageError(f"--config: cannot read {path} ({training.one_line(err)})") from err
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: expected a mapping of {', '.join(SWEEP_KEYS)}")
    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        raise UsageError(f"{path}: unknown key {unknown[0]!r}; expected {', '.join(SWEEP_KEYS)}")
    experiment = Path(path).parent / str(raw.get("experiment") or "")
    if not raw.get("experiment") or not experiment.is_file():
        raise UsageError(f"experiment: no experiment config at {experiment} (a path relative to the sweep config)")
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise UsageError(f"overrides: expected a mapping of config keys to values, got {overrides!r}")
    base_args = ["--config", str(experiment.resolve()), *cli_args(overrides)]
    parser = experiment_parser()
    base = _check(base_args, parser, "experiment")
    _check_single_device(base)
    space, classes = _space(raw.get("space"), base_args, base, parser)
    objectives = _objectives(raw.get("objectives"), list(classes.values()) or [base])
    sampler = _named(raw.get("sampler", "tpe"), "sampler", SAMPLERS)
    pruner = _named(raw.get("pruner"), "pruner", PRUNERS)
    for where, build in (("sampler", partial(_sampler, sampler, space)), ("pruner", partial(_pruner, pruner))):
        try:
            build()
        except (TypeError, ValueError) as err:
            raise UsageError(f"{where}: {training.one_line(err)}") from err
    _check_pruner(pruner, objectives)
    n_trials = n_trials or _number(raw, "n_trials", int, 1)
    timeout = timeout or _number(raw, "timeout", float, 1)
    if n_trials is None and timeout is None:
        raise UsageError("n_trials: set n_trials or timeout (or both)")
    heartbeat = _number(raw, "heartbeat_interval", int, 1) or 10
    grace = _number(raw, "grace_period", int, 1) or 6 * heartbeat
    if grace <= heartbeat:
        raise UsageError(f"grace_period: must be longer than heartbeat_interval ({heartbeat}s), got {grace}")
    name = check_study_name(str(study or raw.get("study") or Path(path).stem), "--study" if study else "study")
    tracking_uri = tracking.validate_tracking_uri(base.tracking.uri or tracking.default_tracking_uri())
    return Sweep(
        path=str(Path(path).resolve()),
        study=name,
        base_args=tuple(base_args),
        space=space,
        model_args={choice: frozenset(config.model.init_args.keys()) for choice, config in classes.items()},
        objectives=objectives,
        n_trials=n_trials,
        timeout=timeout,
        sampler=sampler,
        pruner=pruner,
        storage=str(storage or raw.get("storage") or default_storage(tracking_uri)),
        heartbeat_interval=heartbeat,
        grace_period=grace,
        tracking_uri=tracking_uri,
        experiment=base.tracking.experiment,
        workers=workers,
    )


# --- storage and study --------------------------------------------------------------------


def open_storage(
    url: str,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    stale_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None,
) -> RDBStorage:
    """Optuna's RDB storage (heartbeats need it); a URL it cannot open is a UsageError before anything is created."""
    scheme = urlsplit(url).scheme.split("+")[0]
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    # Several processes write one SQLite file: wait for its lock rather than fail; never hang on a dead host.
    connect_args = {"sqlite": {"timeout": 60}, "postgresql": {"connect_timeout": 10}}.get(scheme, {})
    for attempt in range(1, 6):
        try:
            storage = RDBStorage(
                url,
                engine_kwargs={"connect_args": connect_args},
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


def _end_run(
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
    run_id = trial.user_attrs.get(RUN_ID_ATTR) or _running_run_of(tracking_uri, study.study_name, trial.number)
    _end_run(tracking_uri, run_id, "FAIL", reason, status="KILLED")


def _running_run_of(tracking_uri: str, study: str, number: int) -> str | None:
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
    storage = open_storage(sweep.storage, sweep.heartbeat_interval, sweep.grace_period, stale)
    return optuna.load_study(study_name=sweep.study, storage=storage, pruner=_pruner(sweep.pruner))


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


def open_study(sweep: Sweep, storage: RDBStorage, client: Any) -> tuple[optuna.Study, str]:
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


# --- trials --------------------------------------------------------------------------------


class TrialLink(Callback):
    """Ties a trial to its MLflow run as soon as training starts, keeps the last epoch's val/ metrics
    (trainer.test replaces the trainer's metrics), and fails the trial when training diverges."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.val_metrics: dict[str, float] = {}

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.trial.set_user_attr(RUN_ID_ATTR, trainer.logger.run_id)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("val/")}
        if not math.isfinite(metrics.get(training.MONITOR, 0.0)):
            raise FloatingPointError(
                f"{training.MONITOR} is {metrics[training.MONITOR]} at epoch {trainer.current_epoch}: training diverged"
            )
        self.val_metrics = metrics


def _suggest(trial: optuna.Trial, key: str, distribution: BaseDistribution) -> Any:
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(key, distribution.choices)
    suggest = trial.suggest_int if isinstance(distribution, IntDistribution) else trial.suggest_float
    return suggest(key, distribution.low, distribution.high, step=distribution.step, log=distribution.log)


def sample(trial: optuna.Trial, sweep: Sweep) -> dict[str, Any]:
    """The trial's values, model.class first; a model key the sampled class lacks is not sampled."""
    params: dict[str, Any] = {}
    for key, distribution in sweep.space.items():
        if _applies(sweep.model_args, key, params):
            params[key] = _suggest(trial, key, distribution)
    return params


def _score(metrics: dict[str, float], name: str) -> float:
    if name not in metrics:
        raise KeyError(f"objective {name} was not logged by the run (logged: {', '.join(sorted(metrics))})")
    if not math.isfinite(metrics[name]):
        raise FloatingPointError(f"objective {name} is {metrics[name]}")
    return metrics[name]


def objective(trial: optuna.Trial, sweep: Sweep, parent_run_id: str, started: Callable[[], None] = lambda: None) -> Any:
    """Train the trial's config as one MLflow child run; its state (COMPLETE, PRUNED, FAIL and why) tags the run."""
    started()
    params = sample(trial, sweep)
    names = ["--tracking.uri", sweep.tracking_uri, "--tracking.run_name", f"{sweep.study}-{trial.number}"]
    config = training.parse_config([*sweep.base_args, *cli_args(params), *names], experiment_parser())
    link = TrialLink(trial)
    callbacks: list[Callback] = [link]
    if len(sweep.objectives) == 1 and sweep.objectives[0].metric.startswith("val/"):
        callbacks.append(PyTorchLightningPruningCallback(trial, monitor=sweep.objectives[0].metric))
    tags = {
        "optuna.study": sweep.study,
        "optuna.trial": str(trial.number),
        "optuna.worker": f"{socket.gethostname()}:{os.getpid()}",
    }
    run_id = None
    try:
        result = training.run_training(config, parent_run_id, callbacks, tags)
        run_id = result.run_id
        logged = {**link.val_metrics, **result.metrics}
        values = [_score(logged, o.metric) for o in sweep.objectives]
    except optuna.TrialPruned:
        _end_run(sweep.tracking_uri, trial.user_attrs.get(RUN_ID_ATTR), "PRUNED", status="KILLED")
        raise
    except (KeyboardInterrupt, SystemExit) as err:  # Ctrl-C or SIGTERM; inside fit Lightning makes it exit(1)
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        requeue(trial.study, frozen, sweep.tracking_uri, "interrupted; queued again")
        raise KeyboardInterrupt from err  # Optuna closes the trial FAIL (it would leave it RUNNING on exit())
    except Exception as err:
        reason = f"{type(err).__name__}: {err}"
        trial.set_user_attr("fail_reason", reason[:1000])
        _end_run(sweep.tracking_uri, run_id or trial.user_attrs.get(RUN_ID_ATTR), "FAIL", reason)
        raise
    trial.set_user_attr(sweep_map.SCORES_ATTR, {name: logged[name] for name in known_metrics() if name in logged})
    _end_run(sweep.tracking_uri, run_id, "COMPLETE")
    return values[0] if len(values) == 1 else values


# --- workers -------------------------------------------------------------------------------


def counted(trials: Sequence[FrozenTrial]) -> int:
    """Trials that count toward n_trials: all but those re-queued (their retry counts in their place)."""
    requeued = {number for t in trials for number in t.system_attrs.get("retry_history", ())}
    return sum(t.number not in requeued for t in trials)


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


def work(sweep: Sweep, parent_run_id: str) -> None:
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
                study.sampler = _sampler(sweep.sampler, sweep.space, offset=len(trials))
                run = partial(objective, sweep=sweep, parent_run_id=parent_run_id, started=release)
                study.optimize(run, n_trials=1, catch=(Exception,))
                continue
        if not any(t.state == TrialState.RUNNING for t in trials):
            return
        time.sleep(1)


def _worker_process(sweep: Sweep, parent_run_id: str, threads: int) -> None:
    import torch

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop like Ctrl-C: runs closed, trial re-queued
    torch.set_num_threads(threads)
    work(sweep, parent_run_id)


def run_workers(sweep: Sweep, parent_run_id: str) -> None:
    """--workers 1 works in this process; N > 1 start N fresh (spawned) processes sharing the CPU cores."""
    if sweep.workers == 1:
        work(sweep, parent_run_id)
        return
    context = multiprocessing.get_context("spawn")  # no SQLite/SQLAlchemy connection crosses a fork
    threads = max(1, (os.cpu_count() or 1) // sweep.workers)
    processes = [
        context.Process(target=_worker_process, args=(sweep, parent_run_id, threads)) for _ in range(sweep.workers)
    ]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join()
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()  # SIGTERM: each closes its run and re-queues its trial
                process.join(60)
    failed = [process.exitcode for process in processes if process.exitcode]
    if failed:
        raise RuntimeError(f"{len(failed)} of {sweep.workers} workers failed (exit codes {failed})")


# --- results -------------------------------------------------------------------------------


def _plots(study: optuna.Study, sweep: Sweep, folder: Path) -> None:
    """Optuna's own plots (matplotlib): history, importances and latent_dim x kl_weight per objective, Pareto front."""
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    names = [o.metric for o in sweep.objectives]
    multi = len(names) > 1
    figures: dict[str, Callable[[], Any]] = {}
    for i, name in enumerate(names):
        target = {"target": (lambda t, i=i: t.values[i]) if multi else None, "target_name": name}
        slug = name.replace("/", "_")
        figures[f"history_{slug}.png"] = partial(plots.plot_optimization_history, study, **target)
        figures[f"importances_{slug}.png"] = partial(plots.plot_param_importances, study, **target)
        if all(key in sweep.space for key in CONTOUR_PARAMS):
            figures[f"contour_{slug}.png"] = partial(plots.plot_contour, study, params=CONTOUR_PARAMS, **target)
        else:
            figures[f"slice_{slug}.png"] = partial(plots.plot_slice, study, **target)
    if multi:
        figures["pareto_front.png"] = partial(plots.plot_pareto_front, study, target_names=names)
    for filename, plot in figures.items():
        try:
            plot()
            plt.gcf().savefig(folder / filename, bbox_inches="tight")
        except Exception as err:  # e.g. importances of fewer than two finished trials
            warnings.warn(f"sweep: plot {filename} skipped ({training.one_line(err)})")
        finally:
            plt.close("all")
    if sweep.sampler["name"] == "grid" and len(sweep.space) == 2:
        figure = sweep_map.map_figure(study.get_trials(deepcopy=False), (*sweep.space,))
        if figure is not None:
            figure.savefig(folder / "map.png", dpi=110)


def summarize(study: optuna.Study, sweep: Sweep, client: Any, parent_run_id: str) -> None:
    """The parent run gets the best trial's params and scores (or the Pareto set), the trials table and plots."""
    trials, names = study.get_trials(deepcopy=False), [o.metric for o in sweep.objectives]
    for state, count in Counter(t.state.name.lower() for t in trials).items():
        client.log_metric(parent_run_id, f"trials_{state}", count)
    best = study.best_trials
    if len(sweep.objectives) == 1 and best:
        trial = study.best_trial
        client.set_tag(parent_run_id, "best.trial", str(trial.number))
        client.set_tag(parent_run_id, "best.mlflow_run_id", str(trial.user_attrs.get(RUN_ID_ATTR)))
        for key, value in trial.params.items():
            client.set_tag(parent_run_id, f"best.{key}", str(value))
        client.log_metric(parent_run_id, f"best/{sweep.objectives[0].metric}", trial.value)
    client.set_tag(parent_run_id, "best.trials", ",".join(str(t.number) for t in best))
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        records = [
            {
                "trial": t.number,
                "values": dict(zip(names, t.values)),
                "params": t.params,
                "mlflow_run_id": t.user_attrs.get(RUN_ID_ATTR),
            }
            for t in best
        ]
        (out / ("best_trial.json" if len(sweep.objectives) == 1 else "pareto_front.json")).write_text(
            json.dumps(records, indent=2)
        )
        study.trials_dataframe().to_csv(out / "trials.csv", index=False)
        _plots(study, sweep, out)
        client.log_artifacts(parent_run_id, folder, "optuna")


def describe(study: optuna.Study) -> str:
    """What `aevae best` prints: trial counts, then the best trial (or the Pareto front) with its MLflow run."""
    trials = study.get_trials(deepcopy=False)
    names = study.metric_names or [f"objective_{i}" for i in range(len(study.directions))]
    counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(Counter(t.state.name for t in trials).items()))
    goals = ", ".join(f"{name} ({d.name.lower()})" for name, d in zip(names, study.directions))
    lines = [f"study {study.study_name}: {len(trials)} trials ({counts or 'none'}); objectives: {goals}"]
    lines.append(f"MLflow parent run: {study.user_attrs.get(PARENT_ATTR)}")
    best = study.best_trials
    lines.append("best trial:" if len(names) == 1 else f"Pareto front ({len(best)} trials):")
    for t in sorted(best, key=lambda t: t.number):
        scores = " ".join(f"{name}={value:.6g}" for name, value in zip(names, t.values))
        params = " ".join(
            f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}" for key, value in t.params.items()
        )
        lines.append(f"  trial {t.number}: {scores} | {params} | MLflow run {t.user_attrs.get(RUN_ID_ATTR)}")
    if not best:
        lines.append("  none completed yet")
    return "\n".join(lines)


def run_sweep(sweep: Sweep) -> optuna.Study:
    """Create or resume the study, run the workers, then record the result on the parent run."""
    from mlflow import MlflowClient

    storage = open_storage(sweep.storage)  # an unreachable storage fails before the MLflow store is touched
    with machine_lock(sweep.tracking_uri):  # sweeps started at once on a fresh store: one creates its tables
        client = MlflowClient(tracking.open_store(sweep.tracking_uri))
    study, parent_run_id = open_study(sweep, storage, client)
    client.set_tag(parent_run_id, "n_trials", str(sweep.n_trials))
    error: BaseException | None = None
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        run_workers(sweep, parent_run_id)
        summarize(study, sweep, client, parent_run_id)
        return study
    except BaseException as err:
        error = err
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        tracking.close_run(client, parent_run_id, error)


# --- commands ------------------------------------------------------------------------------


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
    options = training.parse_config(args, parser)
    sweep = load_sweep(
        options.config, options.n_trials, options.timeout, options.workers, options.storage, options.study
    )
    study = run_sweep(sweep)
    print(describe(study))
    return 0


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
    print(describe(optuna.load_study(study_name=options.study, storage=storage)))
    return 0
