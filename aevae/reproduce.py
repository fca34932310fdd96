"""`aevae reproduce`: retrain a finished run, or a sweep's best trial, from its recorded config, on any
number of devices; compare the scores with the source and register the model under a stable name."""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from jsonargparse import ArgumentParser, Namespace

from aevae import console, distributed, tracking, training
from aevae.errors import UsageError

SOURCE_ENV = "AEVAE_REPRODUCE_SOURCE_RUN"
COMPARED = (
    "val/loss", "val/nelbo", "test/loss", "test/nelbo", "test/recon",
    "silhouette_latent", "silhouette_pca", "silhouette_umap", "knn_acc", "probe_acc",
)  # fmt: skip
CHAMPION = "champion"  # the alias a user loads by name: only ever a reproduced model
VERDICT_TAG = "reproduction_verdict"
REPRODUCED, NOT_REPRODUCED = "reproduced", "not reproduced"
NOT_REPRODUCED_EXIT = 1  # the command ran, but the scores did not reproduce


@dataclass
class Source:
    run_id: str
    run_name: str
    metrics: dict[str, float]
    tags: dict[str, str]  # study / trial of origin, for the new run's tags
    config: Namespace


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="aevae reproduce", exit_on_error=False, default_meta=False)
    parser.add_argument("--run-id", type=str | None, default=None, help="MLflow run to reproduce")
    parser.add_argument("--study", type=str | None, default=None, help="reproduce this sweep's best trial")
    parser.add_argument("--storage", type=str | None, default=None, help="Optuna storage (default: mlruns/optuna.db)")
    parser.add_argument("--pareto-index", type=int | None, default=None, help="multi-objective: which Pareto trial")
    parser.add_argument("--prefer", type=str | None, default=None, help="multi-objective: pick the Pareto trial best at this metric")
    parser.add_argument("--accelerator", type=str | None, default=None)
    parser.add_argument("--devices", type=int | None, default=None, help="devices per node")
    parser.add_argument("--num-nodes", type=int | None, default=None)
    parser.add_argument("--strategy", type=str | None, default=None, help="e.g. ddp")
    parser.add_argument("--precision", type=str | None, default=None, help="e.g. bf16-mixed")
    parser.add_argument("--max-epochs", type=int | None, default=None)
    parser.add_argument("--scale-lr", type=bool, default=False, help="keep the per-device batch, scale lr linearly")
    parser.add_argument("--tolerance", type=float, default=0.05, help="relative difference still called reproduced")
    parser.add_argument("--register-as", type=str, default="aevae-vae", help="Model Registry name ('' to skip)")
    parser.add_argument("--champion-metric", type=str, default="test/loss", help="lower is better; decides the alias")
    parser.add_argument("--tracking-uri", type=str | None, default=None)
    return parser


def _pick_trial(study: Any, options: Namespace) -> Any:
    """The best trial; for a multi-objective study the Pareto trial the user names."""
    completed = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not completed:
        raise UsageError(f"--study: study {study.study_name!r} has no completed trial yet")
    if len(study.directions) == 1:
        return study.best_trial
    front = sorted(study.best_trials, key=lambda t: t.number)
    if options.pareto_index is not None:
        if not 0 <= options.pareto_index < len(front):
            raise UsageError(f"--pareto-index: the Pareto front has {len(front)} trials (0..{len(front) - 1})")
        return front[options.pareto_index]
    if options.prefer in (study.metric_names or []):
        i = study.metric_names.index(options.prefer)
        sign = 1 if study.directions[i].name == "MINIMIZE" else -1
        return min(front, key=lambda t: sign * t.values[i])
    raise UsageError(
        f"--study: {study.study_name!r} is multi-objective; pass --pareto-index 0..{len(front) - 1} "
        f"or --prefer one of {', '.join(study.metric_names or [])}"
    )


def study_source_run(options: Namespace, tracking_uri: str) -> tuple[str, dict[str, str]]:
    """The MLflow run of a study's chosen trial, and the tags that say where it came from."""
    import optuna

    from aevae import sweep

    sweep.check_study_name(options.study, "--study")
    default = sweep.default_storage(tracking_uri)
    storage = sweep.open_storage(tracking.require_existing(options.storage or default, "--storage"))
    if options.study not in optuna.get_all_study_names(storage):
        raise UsageError(f"--study: no study {options.study!r} in {tracking.mask_secrets(storage.url)}")
    study = optuna.load_study(study_name=options.study, storage=storage)
    trial = _pick_trial(study, options)
    run_id = trial.user_attrs.get(sweep.RUN_ID_ATTR)
    if not run_id:
        raise UsageError(f"--study: trial {trial.number} of {options.study!r} has no MLflow run")
    return run_id, {"source_study": options.study, "source_trial": str(trial.number)}


def load_source(client: Any, run_id: str, origin: dict[str, str], folder: Path) -> Source:
    """The source run's recorded config and scores; it must have finished with a checkpoint."""
    run, config_path, _ = tracking.fetch_run_files(client, run_id, "--run-id", str(folder), checkpoint=False)
    if run.info.status != "FINISHED":
        raise UsageError(f"--run-id: run {run_id} is {run.info.status}, not FINISHED")
    config = training.parse_config(["--config", str(config_path)])
    return Source(run_id, run.info.run_name, dict(run.data.metrics), {"source_run_id": run_id, **origin}, config)


def reproduction_args(source: Source, options: Namespace, tracking_uri: str) -> list[str]:
    """The source config with only what the user passed changed, and the batch rule applied."""
    trainer = source.config.trainer
    overrides = {
        "accelerator": options.accelerator, "devices": options.devices, "num_nodes": options.num_nodes,
        "strategy": options.strategy, "precision": options.precision, "max_epochs": options.max_epochs,
    }  # fmt: skip
    args = ["--config", str(source.config.config[0])]
    for key, value in overrides.items():
        if value is not None:
            args += [f"--trainer.{key}", str(value)]
    source_world = distributed.world_size(trainer.devices, trainer.num_nodes)
    target_world = distributed.world_size(
        options.devices if options.devices is not None else trainer.devices,
        options.num_nodes if options.num_nodes is not None else trainer.num_nodes,
    )
    batch, lr = distributed.scale_batch(
        source.config.data.batch_size, source.config.model.init_args.lr, source_world, target_world, options.scale_lr
    )
    args += ["--data.batch_size", str(batch), "--model.init_args.lr", repr(lr)]
    return args + ["--tracking.uri", tracking_uri, "--tracking.run_name", f"{source.run_name}-repro"]


def compare_scores(source: dict[str, float], reproduction: dict[str, float], tolerance: float) -> tuple[list[dict], bool]:
    """Every score both runs have, side by side; reproduced when each differs by <= tolerance (relative)."""
    rows = []
    for name in COMPARED:
        if name in source and name in reproduction:
            diff = reproduction[name] - source[name]
            within = abs(diff) <= tolerance * max(abs(source[name]), 1e-12)
            rows.append({"metric": name, "source": source[name], "reproduction": reproduction[name], "difference": diff, "within_tolerance": within})
    return rows, bool(rows) and all(row["within_tolerance"] for row in rows)


def comparison_markdown(rows: list[dict], verdict: bool, tolerance: float) -> str:
    lines = ["| metric | source | reproduction | difference | within |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['metric']} | {r['source']:.6g} | {r['reproduction']:.6g} | {r['difference']:+.3g} | {'yes' if r['within_tolerance'] else 'no'} |"
        for r in rows
    ]
    word = "REPRODUCED" if verdict else "NOT REPRODUCED"
    return "\n".join(lines) + f"\n\nverdict: {word} (relative tolerance {tolerance:g})\n"


def check_registry_name(client: Any, name: str, kind: str) -> None:
    """A registered name holds one model kind: refuse before training, not after."""
    from mlflow.exceptions import MlflowException

    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        return
    existing = registered.tags.get("model_kind")
    if existing and existing != kind:
        raise UsageError(f"--register-as: registered model {name!r} holds {existing} models, not {kind}")


def register(
    client: Any, run_id: str, model: Any, name: str, kind: str, metric: str, score: float | None, reproduced: bool
) -> tuple[str, bool]:
    """Log the model to the run, make it a version of `name` tagged with its verdict, and move the champion alias
    to it when it reproduced and its metric is at least as good (lower) as the current (reproduced) champion's."""
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as folder:
        # pickle keeps the class, so the loaded model still has encode(); pt2 would be a traced forward
        mlflow.pytorch.save_model(model.cpu().eval(), str(Path(folder) / "model"), serialization_format="pickle")
        client.log_artifacts(run_id, str(Path(folder) / "model"), "model")
    try:
        client.create_registered_model(name, tags={"model_kind": kind})
    except MlflowException:
        pass  # exists: check_registry_name has vetted its kind
    verdict = {VERDICT_TAG: REPRODUCED if reproduced else NOT_REPRODUCED}
    version = client.create_model_version(
        name, f"{client.get_run(run_id).info.artifact_uri}/model", run_id=run_id, tags=verdict
    )
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
        current = client.get_run(champion.run_id).data.metrics.get(metric)
        if champion.tags.get(VERDICT_TAG) != REPRODUCED:
            current = None  # a champion from before verdicts were kept gives way to any reproduced model
    except MlflowException:
        current = None
    promote = reproduced and (current is None or (score is not None and score <= current))
    if promote:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return version.version, promote


@contextmanager
def _source_for_launched_ranks(run_id: str) -> Iterator[None]:
    """DDP re-runs this command on every rank; the ranks it launches inherit the source resolved here,
    so a study that gains a better trial meanwhile cannot give them a different one."""
    previous = os.environ.get(SOURCE_ENV)
    os.environ[SOURCE_ENV] = run_id
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(SOURCE_ENV)
        else:
            os.environ[SOURCE_ENV] = previous


def reproduce(options: Namespace) -> tuple[training.TrainingResult, bool | None]:
    """Retrain the source, compare, register; the verdict (None on ranks other than 0, which only train)."""
    from mlflow import MlflowClient

    if bool(options.run_id) == bool(options.study):
        raise UsageError("reproduce: pass exactly one of --run-id or --study")
    if not (math.isfinite(options.tolerance) and options.tolerance >= 0):
        raise UsageError(f"--tolerance: a relative difference >= 0, got {options.tolerance}")
    tracking_uri = tracking.require_existing(options.tracking_uri or tracking.default_tracking_uri(), "--tracking-uri")
    client = MlflowClient(tracking.validate_tracking_uri(tracking_uri))
    run_id, origin = (
        (os.environ[SOURCE_ENV], {}) if os.environ.get(SOURCE_ENV)
        else study_source_run(options, tracking_uri) if options.study
        else (options.run_id, {})
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        source = load_source(client, run_id, origin, Path(folder))
        config = training.parse_config(reproduction_args(source, options, tracking_uri))
        kind = training.model_kind(config)
        if options.register_as:
            check_registry_name(client, options.register_as, kind)
        with _source_for_launched_ranks(run_id):
            result = training.run_training(config, tags={**source.tags, "reproduction": "true"})
    if result.run_id is None:  # not rank 0: rank 0 compares and registers
        return result, None
    rows, verdict = compare_scores(source.metrics, result.metrics, options.tolerance)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "comparison.md").write_text(comparison_markdown(rows, verdict, options.tolerance))
        (Path(folder) / "comparison.json").write_text(json.dumps({"verdict": verdict, "scores": rows}, indent=2))
        client.log_artifacts(result.run_id, folder, "reproduction")
    client.set_tag(result.run_id, VERDICT_TAG, REPRODUCED if verdict else NOT_REPRODUCED)
    console.say(comparison_markdown(rows, verdict, options.tolerance))
    if options.register_as:
        score = result.metrics.get(options.champion_metric)
        version, promoted = register(
            client, result.run_id, result.model, options.register_as, kind, options.champion_metric, score, verdict
        )
        champion = f" as @{CHAMPION}" if promoted else ""
        console.summary(f"registered {options.register_as} version {version}{champion}")
    return result, verdict


def reproduce_command(args: Sequence[str]) -> int:
    try:
        options = build_parser().parse_args(list(args))
    except Exception as err:
        raise UsageError(training.one_line(err)) from err
    result, verdict = reproduce(options)
    if result.run_id:
        where = tracking.mask_secrets(result.tracking_uri)
        console.summary(f"reproduction run {result.run_id}: {where} (open it: aevae ui)")
    return NOT_REPRODUCED_EXIT if verdict is False else 0
