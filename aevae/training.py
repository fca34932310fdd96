"""One config parser and one trainer factory for every command that trains (train, compare, sweep, reproduce)."""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import lightning.pytorch as pl
import jsonargparse
import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from jsonargparse.typing import PositiveInt
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.plugins.io import AsyncCheckpointIO

import aevae
from aevae import analysis, distributed, host_memory, tracking
from aevae.data import ImageDataModule
from aevae.checkpoints import (
    AtomicCheckpointIO,
    BestCheckpoint,
    LastCheckpoint,
    RandomState,
    check_compatible,
    check_room_for_checkpoints,
    read_checkpoint,
)
from aevae.errors import UsageError, causes
from aevae.interrupts import HeldInterrupts, held
from aevae.models import LatentAutoencoder
from aevae.steps import StepLossBar, check_compile, manual_eager_fits, plain_cuda_checks, steps_per_call

MONITOR = "val/loss"
# Trainer arguments that aevae sets itself (tracking, checkpoints) or that would load arbitrary classes.
_TRAINER_SKIP = {"logger", "callbacks", "plugins", "enable_checkpointing", "profiler", "default_root_dir"}


@dataclass
class TrackingOptions:
    """Where and under which names the run is recorded.

    Args:
        uri: MLflow tracking URI; default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<cwd>/mlruns/mlflow.db``.
        experiment: MLflow experiment name.
        run_name: run name; default says model, latent size, beta and seed (``vae-z4-b1-s0``).
        log_checkpoints: ``best`` logs the best checkpoint to the run; ``none`` keeps the record small (sweep trials).
    """

    uri: str | None = None
    experiment: str = "aevae"
    run_name: str | None = None
    log_checkpoints: Literal["best", "none"] = "best"


@dataclass
class FitOptions:
    """What happens around ``Trainer.fit``.

    Args:
        early_stopping_patience: stop after this many epochs without a better val/loss (None: off).
        checkpoint_dir: local folder for last/best checkpoints (the best is also logged to MLflow).
        test: evaluate the best checkpoint on the test split after fit.
        resume: an MLflow run id: continue that run from its last checkpoint, logging into the same run.
        on_nonfinite: on a NaN/inf loss or gradient, ``stop`` (the run fails, its last good checkpoint
            stays) or ``skip`` the batch and count it (single device only).
        compile: the training step as it runs: ``none`` (eager), ``compile`` (``torch.compile`` of forward, loss
            and backward; CPU or GPU), ``reduce-overhead`` (the same through torch.compile's CUDA graphs; CUDA) or
            ``cudagraph`` (the whole step, fused Adam included, captured in one CUDA graph and replayed; one CUDA
            device). All train the same model as eager, to rounding.
        steps_per_call: training batches one Lightning training step takes, an optimizer step each, so that
            Lightning's per-batch work runs once a run of batches: ``auto`` (8 where nothing counts Lightning's
            batches: a manual step, batches cut from memory, no batch-counted trainer.limit_train_batches or
            trainer.val_check_interval; else 1) or a number (refused where those do not hold). The same batches,
            steps and random draws in the same order: the same model as 1.
    """

    early_stopping_patience: PositiveInt | None = None
    checkpoint_dir: str = "checkpoints"
    test: bool = True
    resume: str | None = None
    on_nonfinite: Literal["stop", "skip"] = "stop"
    compile: Literal["none", "compile", "reduce-overhead", "cudagraph"] = "none"
    steps_per_call: PositiveInt | Literal["auto"] = "auto"


ALLOWED_IMPORTS = ["aevae", "torch.nn"]  # class paths a config may name; more only by `aevae --allow-import`


def allow_imports(extra: Sequence[str] = ()) -> None:
    """Configs name classes by import path; refuse, before importing, any outside the allow-list."""
    jsonargparse.set_parsing_settings(import_path_denylist=["*"], import_path_allowlist=[*ALLOWED_IMPORTS, *extra])


def build_parser() -> ArgumentParser:
    """The experiment config: seed, model (AE or VAE), data, trainer, tracking, fit, analysis."""
    allow_imports()
    parser = ArgumentParser(prog="aevae train", exit_on_error=False, default_meta=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML experiment config (experiments/*.yaml)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, batch order and sampling")
    parser.add_subclass_arguments(LatentAutoencoder, "model", required=True)
    parser.add_class_arguments(ImageDataModule, "data")
    parser.add_class_arguments(pl.Trainer, "trainer", skip=_TRAINER_SKIP, fail_untyped=False, instantiate=False)
    parser.add_class_arguments(TrackingOptions, "tracking", instantiate=False)
    parser.add_class_arguments(FitOptions, "fit", instantiate=False)
    parser.add_class_arguments(analysis.AnalysisOptions, "analysis", instantiate=False)
    return parser


def parse_config(args: Sequence[str] | None = None, parser: ArgumentParser | None = None) -> Namespace:
    """Parse and validate an experiment config; raises UsageError naming the bad field."""
    parser = parser or build_parser()
    try:
        config = parser.parse_args(args)
        parser.validate(config, skip_unset=False)  # a null in a config file skips the type checks of parsing
    except Exception as err:  # jsonargparse's ArgumentError and friends
        raise UsageError(one_line(err)) from err
    return config


_NOISE = (
    "Parser key", "Does not validate", "Subtypes:", "Errors:", "Problem with given class_path",
    "Expected a <class 'NoneType'>", "Given value type", "Given value: NestedArg",
)  # fmt: skip


def yaml_problem(err: yaml.MarkedYAMLError) -> str:
    mark = err.problem_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"not valid YAML: {err.problem or err.context}{where}"


def one_line(err: BaseException) -> str:
    """jsonargparse explains a bad key over many lines; keep the key (model.kl_weight) and what is wrong with it."""
    chain = causes(err)
    for cause in chain:  # a check in a constructor already names its field
        if isinstance(cause, UsageError):
            return str(cause)
    text = str(err)
    if text.startswith("Unexpected config:"):  # a --config file that is not a mapping of options
        content = text.partition(":")[2].strip().splitlines()
        return f"--config: expected a YAML mapping of options, got {repr(content[0]) if content else 'an empty file'}"
    marked = next((cause for cause in chain if isinstance(cause, yaml.MarkedYAMLError)), None)
    if marked is not None:
        return f"--config: {yaml_problem(marked)}" if text.startswith("Problems parsing config") else yaml_problem(marked)
    keys = dict.fromkeys(re.findall(r'Parser key "([^"]+)"', text))  # nested: "model", then "kl_weight"
    lines = [re.sub(r'^Parser key "[^"]+":\s*', "", line.strip(" -")) for line in text.splitlines()]
    details = [line for line in lines if line and not line.startswith(_NOISE)][:2]
    message = "; ".join(details) or type(err).__name__
    return f"{'.'.join(keys)}: {message}" if keys else message


def model_kind(config: Namespace) -> str:
    return config.model.class_path.rsplit(".", 1)[-1].lower()


def default_run_name(config: Namespace) -> str:
    args = config.model.init_args
    beta = f"-b{args.kl_weight:g}" if "kl_weight" in args else ""
    return f"{model_kind(config)}-z{args.latent_dim}{beta}-s{config.seed}"


@dataclass
class TrainingResult:
    run_id: str | None
    tracking_uri: str
    model: LatentAutoencoder
    datamodule: ImageDataModule
    trainer: pl.Trainer
    best_checkpoint: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    latent: analysis.Analysis | None = None  # the latent-space analysis of the best checkpoint


def build_trainer(config: Namespace, logger: Any, callbacks: Sequence[Callback] = ()) -> pl.Trainer:
    """The one Trainer factory: config's trainer options plus aevae's checkpointing and early stopping."""
    checkpoints = BestCheckpoint(
        monitor=MONITOR, mode="min", save_top_k=1, filename="best", enable_version_counter=False,
        save_on_train_epoch_end=True,  # after the whole epoch, so a resume starts at a clean epoch boundary
    )  # fmt: skip
    # Its own callback: Lightning's save_last writes last.ckpt only in epochs that improved the best one.
    last = LastCheckpoint(checkpoints, save_on_train_epoch_end=True)
    all_callbacks: list[Callback] = [checkpoints, last, RandomState(), distributed.RankAgreement(), *callbacks]
    if config.trainer.get("enable_progress_bar") is not False:
        all_callbacks.append(StepLossBar())
    if config.fit.early_stopping_patience:
        all_callbacks.append(EarlyStopping(monitor=MONITOR, mode="min", patience=config.fit.early_stopping_patience))
    trainer_options = {key: value for key, value in config.trainer.items() if value is not None or key == "max_epochs"}
    plain_cuda_checks(aevae.USER_NVML_CUDA_CHECK, str(trainer_options.get("strategy", "auto")))
    try:
        trainer = pl.Trainer(
            **trainer_options,
            logger=logger,
            callbacks=all_callbacks,
            plugins=[AsyncCheckpointIO(AtomicCheckpointIO())],  # written while the next epoch trains
            default_root_dir=config.fit.checkpoint_dir,
        )
    except (ValueError, TypeError, RuntimeError, MisconfigurationException) as err:  # e.g. devices=0, no GPU
        raise UsageError(f"trainer: {one_line(err)}") from err
    if trainer.world_size == 1:  # nothing to agree on; Lightning calls every callback's hooks every step
        trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, distributed.RankAgreement)]
    return trainer


def check_trainer(config: Namespace, datamodule: ImageDataModule | None = None) -> None:
    """Build the config's Trainer once and drop it (quietly), so that bad trainer options, a step that cannot be
    compiled or captured on it, and data that cannot go on its device fail before any run."""
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)  # its "GPU available" lines are printed again by the real Trainer
    try:
        trainer = build_trainer(config, logger=False)
    finally:
        lightning_log.setLevel(level)
    check_compile(config.fit.compile, precision_of(config), trainer)
    if datamodule is not None:
        step_runs(config, trainer, datamodule)  # and whether the data fits on the device


def precision_of(config: Namespace) -> str:
    """trainer.precision as asked (Lightning may swap 16 for bf16 on a CPU)."""
    return str(config.trainer.get("precision") or "32-true")


def optimizes_manually(config: Namespace, trainer: pl.Trainer) -> bool:
    """Whether the step optimizes manually: a compiled or captured one always, the eager one where it can (see
    aevae.steps.manual_eager_fits); elsewhere Lightning's automatic optimization steps."""
    return config.fit.compile != "none" or manual_eager_fits(precision_of(config), trainer)


def step_runs(config: Namespace, trainer: pl.Trainer, datamodule: ImageDataModule) -> int:
    """fit.steps_per_call for this trainer and data (see aevae.steps.steps_per_call)."""
    on_device = datamodule.goes_on_device(trainer.strategy.root_device, trainer.world_size)
    in_memory = datamodule.cut_in_memory(on_device, trainer.world_size > 1)
    return steps_per_call(config.fit.steps_per_call, optimizes_manually(config, trainer), trainer, in_memory)


def instantiate(config: Namespace, parser: ArgumentParser | None = None) -> tuple[LatentAutoencoder, ImageDataModule]:
    """Seed everything, then build the model and the data module from a parsed config."""
    try:
        pl.seed_everything(config.seed, workers=True, verbose=False)
    except ValueError as err:  # numpy takes 0..2**32 - 1
        raise UsageError(f"seed: {err}") from err
    nulls = [key for key, value in config.model.init_args.items() if value is None and key != "image_shape"]
    if nulls:  # parsing does not type-check a config file's nulls inside model.init_args; no model argument takes one
        raise UsageError(f"model.{nulls[0]}: null is not a value it takes; leave the key out for its default")
    parser = parser or build_parser()
    try:
        datamodule = ImageDataModule(**config.data.as_dict())
    except Exception as err:
        raise UsageError(one_line(err)) from err
    with_shape = config.clone()
    with_shape.model.init_args.image_shape = data_shape(config, datamodule)
    try:
        objects = parser.instantiate_classes(with_shape)
    except Exception as err:
        raise UsageError(one_line(err)) from err
    return objects.model, datamodule


def data_shape(config: Namespace, datamodule: ImageDataModule) -> list[int]:
    """The data's image shape (loading the data), which a model.image_shape in the config must match."""
    shape = list(datamodule.image_shape)
    given = config.model.init_args.get("image_shape")
    if given is not None and list(given) != shape:
        raise UsageError(f"model.image_shape is {list(given)}, but data.source={config.data.source} gives {shape}")
    return shape


def prepare(
    config: Namespace, parser: ArgumentParser | None = None
) -> tuple[LatentAutoencoder, ImageDataModule, analysis.AnalysisOptions]:
    """Everything a run checks before it exists (model, trainer options, data files, analysis), writing nothing."""
    model, datamodule = instantiate(config, parser)
    datamodule.setup("fit")  # a missing data file fails here, before any run exists
    check_trainer(config, datamodule)
    latent_options = analysis.AnalysisOptions(**config.analysis.as_dict())
    if latent_options.enabled:
        analysis.check(model, datamodule, latent_options)
    return model, datamodule, latent_options


def run_training(
    config: Namespace,
    parent_run_id: str | None = None,
    callbacks: Sequence[Callback] = (),
    tags: dict[str, str] | None = None,
) -> TrainingResult:
    """Train one model as one MLflow run: params, per-epoch metrics, config and best checkpoint."""
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient

    host_memory.keep_freed_memory()  # before the data and the model take their memory
    parser = build_parser()
    model, datamodule, latent_options = prepare(config, parser)
    if latent_options.enabled and latent_options.every_n_epochs:
        callbacks = [*callbacks, analysis.PeriodicAnalysis(latent_options)]
    tracking_uri = config.tracking.uri or tracking.default_tracking_uri()
    if config.fit.resume:
        tracking.require_existing(tracking_uri, "fit.resume")
    tracking.open_store(tracking_uri)
    tracking.experiment_id(MlflowClient(tracking_uri), config.tracking.experiment, tracking_uri)  # marked for the UI
    check_room_for_checkpoints(model, Path(config.fit.checkpoint_dir))
    resume = resume_point(config, model, tracking_uri)
    model.nonfinite_policy = config.fit.on_nonfinite

    run_tags = {
        "model_kind": model.kind,
        "data_source": config.data.source,
        "seed": str(config.seed),
        "git_commit": tracking.git_commit(),
        **(tags or {}),
    }
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    logger = MLFlowLogger(
        experiment_name=config.tracking.experiment,
        run_name=config.tracking.run_name or default_run_name(config),
        tracking_uri=tracking_uri,
        tags=run_tags,
        artifact_location=tracking.artifact_location(tracking_uri),
        run_id=resume.run_id if resume else None,
    )
    interrupts = HeldInterrupts()
    trainer = build_trainer(config, logger, [*callbacks, interrupts])
    model.configure_step(config.fit.compile, optimizes_manually(config, trainer))
    datamodule.steps_per_call = step_runs(config, trainer, datamodule)
    client: MlflowClient | None = logger.experiment if trainer.is_global_zero else None
    run_id = logger.run_id if trainer.is_global_zero else None
    error: BaseException | None = None
    try:
        if client is not None and resume:
            client.update_run(run_id, status="RUNNING")
        elif client is not None:
            logger.log_hyperparams(tracking.flatten(config.as_dict()))
            _log_config(client, run_id, parser, config)
        with held(interrupts):  # Ctrl-C (and SIGTERM) between batches, never inside a store write
            trainer.fit(model, datamodule=datamodule, ckpt_path=resume.checkpoint if resume else None)
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}  # last epoch's
        best = trainer.checkpoint_callback.best_model_path or None
        if config.fit.test:
            with held(interrupts):
                trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)
            metrics.update({key: float(value) for key, value in trainer.callback_metrics.items()})
        if client is not None and best and config.tracking.log_checkpoints == "best":
            client.log_artifact(run_id, best, "checkpoints")
        latent = None
        if client is not None and latent_options.enabled:
            latent = analysis.analyze_into_run(
                client, run_id, model, datamodule, latent_options, trainer.current_epoch, best
            )
            metrics.update(latent.scores)
        return TrainingResult(run_id, tracking_uri, model, datamodule, trainer, best, metrics, latent)
    except BaseException as err:
        error = err
        raise
    finally:
        if client is not None:
            tracking.close_run(client, run_id, error)


@dataclass
class ResumePoint:
    run_id: str
    checkpoint: Path


RESUMABLE_CHANGES = ("fit.resume", "trainer.max_epochs")  # all else must match the run being resumed


def resume_point(config: Namespace, model: LatentAutoencoder, tracking_uri: str) -> ResumePoint | None:
    """The run named by fit.resume and its last checkpoint, checked against this config."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not config.fit.resume:
        return None
    try:
        run = MlflowClient(tracking_uri).get_run(config.fit.resume)
    except MlflowException as err:
        raise UsageError(f"fit.resume: no run {config.fit.resume!r} in the tracking store") from err
    if run.info.status == "FINISHED":
        raise UsageError(f"fit.resume: run {run.info.run_id} has already finished")
    for key, value in tracking.flatten(config.as_dict()).items():
        recorded = run.data.params.get(key)
        if recorded is not None and recorded != str(value) and key not in RESUMABLE_CHANGES:
            raise UsageError(f"fit.resume: {key} is {value}, but run {run.info.run_id} was trained with {recorded}")
    checkpoint = Path(config.fit.checkpoint_dir) / run.info.experiment_id / run.info.run_id / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        raise UsageError(f"fit.resume: run {run.info.run_id} has no last checkpoint at {checkpoint}")
    check_compatible(read_checkpoint(checkpoint), model, checkpoint)
    return ResumePoint(run.info.run_id, checkpoint)


def _log_config(client: Any, run_id: str, parser: ArgumentParser, config: Namespace) -> None:
    """The resolved config, re-runnable with `aevae train --config config.yaml`."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(tracking.mask_secrets(parser.dump(config, skip_none=False)))
        client.log_artifact(run_id, str(path))
