"""A sweep config (base experiment + search space + objectives): read, validated and checked before a study exists."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any, Sequence

import yaml
from jsonargparse import ArgumentParser, Namespace
from optuna.distributions import BaseDistribution

from aevae import tracking, training
from aevae.errors import UsageError
from aevae.sweep.space import (
    PRUNERS, SAMPLERS, build_pruner, build_sampler, cli_args, config_key, corners, distribution, named,
)  # fmt: skip

SWEEP_KEYS = (
    "study", "experiment", "overrides", "space", "objectives", "n_trials", "timeout",
    "sampler", "pruner", "storage", "heartbeat_interval", "grace_period", "outage_wait",
)  # fmt: skip
# What run_training puts in TrainingResult.metrics: per-epoch metrics per stage, then the latent analysis.
EPOCH_METRICS = ("loss", "recon", "kl", "nelbo", "active_units")
VAE_ONLY_METRICS = ("kl", "nelbo", "active_units")
ANALYSIS_METRICS = ("silhouette_latent", "silhouette_pca", "silhouette_umap", "knn_acc", "probe_acc")
STORE_FILE = "optuna.db"  # beside mlflow.db in mlruns/, so DVC versions studies with their runs


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
    gpus: tuple[str, ...] | None = None  # physical GPU ids the workers are pinned to, round-robin (None: no pinning)
    outage_wait: float = 120.0  # seconds workers wait for a tracking server or study storage that went away


@cache
def experiment_parser() -> ArgumentParser:
    """training.build_parser, built once a process (it inspects every Trainer argument)."""
    return training.build_parser()


def _check(args: Sequence[str], parser: ArgumentParser, where: str) -> Namespace:
    """Parse and build a config as a trial would (model constructors check their ranges): bad -> UsageError."""
    try:
        config = training.parse_config(list(args), parser)
        training.instantiate(config, parser)
        training.check_trainer(config)
    except UsageError as err:
        raise UsageError(f"{where}: {err}") from err
    return config


def _check_base(args: Sequence[str], parser: ArgumentParser) -> Namespace:
    """The base experiment, checked as `aevae train` checks a config before its run exists (model, trainer,
    data files, analysis): a sweep that cannot train fails here, before its study or parent run is created."""
    try:
        config = training.parse_config(list(args), parser)
        _check_single_device(config)
        training.prepare(config, parser)
    except UsageError as err:
        raise UsageError(f"experiment: {err}") from err
    return config


def _space(raw: Any, base_args: list[str], base: Namespace, parser: ArgumentParser) -> tuple[dict, dict]:
    """The search space, and the config of each searched model.class choice. Every key must exist in the
    experiment config (a model key in one of the searched classes); every bound and choice must build."""
    if not isinstance(raw, dict) or not raw:
        raise UsageError("space: expected a mapping of config keys to ranges or choices")
    keys = sorted(raw, key=lambda key: key != "model.class")  # model.class first: model keys depend on it
    space = {key: distribution(key, raw[key], base.get(config_key(key))) for key in keys}
    classes = {
        choice: _check([*base_args, *cli_args({"model.class": choice})], parser, f"space.model.class={choice!r}")
        for choice in (corners(space["model.class"]) if "model.class" in space else [])
    }
    for key in keys[bool(classes) :]:
        head, _, arg = key.partition(".")
        takers = [c for c, config in classes.items() if arg in config.model.init_args] if head == "model" else []
        missing = not takers if classes and head == "model" else config_key(key) not in base
        if missing:
            raise UsageError(f"space.{key}: no such key in the experiment config")
        for value in corners(space[key]):
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
    gpus: Sequence[str] | None = None,
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
    base = _check_base(base_args, parser)
    space, classes = _space(raw.get("space"), base_args, base, parser)
    objectives = _objectives(raw.get("objectives"), list(classes.values()) or [base])
    sampler = named(raw.get("sampler", "tpe"), "sampler", SAMPLERS)
    pruner = named(raw.get("pruner"), "pruner", PRUNERS)
    for where, build in (("sampler", partial(build_sampler, sampler, space)), ("pruner", partial(build_pruner, pruner))):
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
    outage_wait = _number(raw, "outage_wait", float, 1) or 120.0
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
        gpus=None if gpus is None else tuple(gpus),
        outage_wait=outage_wait,
    )
