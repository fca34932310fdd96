"""`aevae compare`: AE and VAE with the same encoder/decoder, data and budget, over seeds, as one MLflow parent run.

The config is an experiment config (experiments/*.yaml) plus a ``compare`` group. Every child is parsed
by `training.parse_config` from that experiment with its model class and seed, so each one is an ordinary,
re-runnable training run nested under the parent.
"""

from __future__ import annotations

import csv
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch.callbacks import Callback

from aevae import analysis, console, pictures, tracking, training, uses
from aevae.errors import UsageError

TABLE_SCORES = ("silhouette_latent", "silhouette_pca", "silhouette_umap", "knn_acc", "probe_acc", "active_units",
                "test/recon")  # fmt: skip
FIGURE_NAME = "ae_vs_vae.png"


@dataclass
class CompareOptions:
    """What `aevae compare` varies.

    Args:
        seeds: one run of each model per seed.
        models: two or more model variants; the first is the baseline the others are compared with. A variant
            is a class path (it gets the experiment's ``model.init_args``, those it accepts) or a mapping
            ``{class_path: ..., init_args: {...}}`` whose init_args override the experiment's, e.g. a VAE with
            another ``kl_weight``.
        output_dir: local folder for the figure and the table (both are also logged to the parent run).
        ood: also score each run's out-of-distribution detection, as `aevae ood` with these options,
            e.g. ``{against: fashion-mnist, k: 100}``.
        samples: also score each run's samples, as `aevae samples` with these options, e.g. ``{n: 10000}``.
    """

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    models: list[Union[str, dict[str, Any]]] = field(default_factory=lambda: ["aevae.models.AE", "aevae.models.VAE"])
    output_dir: str = "out/compare"
    ood: Optional[dict[str, Any]] = None
    samples: Optional[dict[str, Any]] = None


@dataclass
class Comparison:
    parent_run_id: str
    tracking_uri: str
    table: list[dict[str, Any]]
    markdown: str
    figure: Path


def compare_parser() -> ArgumentParser:
    parser = training.build_parser()
    parser.prog = "aevae compare"
    parser.add_class_arguments(CompareOptions, "compare", instantiate=False)
    return parser


def child_configs(config: Namespace) -> list[tuple[str, int, Namespace]]:
    """(variant label, seed, config) of every child run, each parsed as `aevae train` would parse it."""
    options = config.compare
    if len(options.models) < 2:
        raise UsageError(f"compare.models: give two or more model variants, got {options.models}")
    if not options.seeds or len(set(options.seeds)) != len(options.seeds):
        raise UsageError(f"compare.seeds: give one or more different seeds, got {options.seeds}")
    if not config.analysis.enabled:
        raise UsageError("analysis.enabled: compare scores the analysis of every run; leave it enabled")
    base = config.clone()
    del base["compare"]
    base.tracking.run_name = None  # each child is named by its model and seed
    children = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "experiment.yaml"
        path.write_text(training.build_parser().dump(base, skip_none=False))
        for i, variant in enumerate(options.models):
            class_path, overrides = model_variant(variant, f"compare.models[{i}]")
            for seed in options.seeds:
                children.append(child_config(path, class_path, overrides, seed, f"compare.models[{i}]"))
    labels = list(dict.fromkeys(label for label, _, _ in children))
    if len(labels) != len(options.models):
        raise UsageError(f"compare.models: the same variant twice ({', '.join(label for label, _, _ in children)})")
    return children


def model_variant(variant: Any, where: str) -> tuple[str, dict[str, Any]]:
    """A class path, or {class_path, init_args}: (class path, the init_args it overrides)."""
    if isinstance(variant, str):
        return variant, {}
    if set(variant) - {"class_path", "init_args"} or not isinstance(variant.get("class_path"), str):
        raise UsageError(f"{where}: expected a class path or {{class_path, init_args}}, got {variant}")
    overrides = variant.get("init_args") or {}
    if not isinstance(overrides, dict):
        raise UsageError(f"{where}.init_args: expected a mapping of model arguments, got {overrides!r}")
    return variant["class_path"], overrides


def child_config(
    experiment: Path, class_path: str, overrides: dict[str, Any], seed: int, where: str
) -> tuple[str, int, Namespace]:
    args = [f"--model.init_args.{key}={json.dumps(value)}" for key, value in overrides.items()]
    try:
        child = training.parse_config(["--config", str(experiment), f"--model={class_path}", *args, f"--seed={seed}"])
    except UsageError as err:  # the base experiment parsed, so it is the variant
        raise UsageError(f"{where}: {class_path}: {err}") from err
    label = training.model_kind(child) + "".join(f"_{key}{value}" for key, value in overrides.items())
    return label.replace(" ", ""), seed, child


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def paired_p(differences: Sequence[float]) -> float | None:
    """Two-sided p-value of a paired t-test (are the per-seed differences centred on 0?); None under 2 seeds."""
    from scipy.stats import ttest_1samp

    if len(differences) < 2:
        return None
    if np.ptp(differences) == 0:
        return 1.0 if differences[0] == 0 else 0.0
    return float(ttest_1samp(differences, 0.0).pvalue)


def score_table(scores: dict[str, dict[int, dict[str, float]]]) -> list[dict[str, Any]]:
    """One row per score: each variant's mean and std over seeds, and every other variant's difference from the
    first (the baseline), paired by seed, with the p-value of a paired t-test."""
    (baseline, baseline_runs), *others = scores.items()
    seeds = sorted(baseline_runs)
    rows = []
    for name in (*TABLE_SCORES, *uses.table_scores(r for runs in scores.values() for r in runs.values())):
        row: dict[str, Any] = {"score": name, "seeds": len(seeds)}
        for label, runs in scores.items():
            values = [runs[seed][name] for seed in seeds if name in runs[seed]]
            row[f"{label}_mean"], row[f"{label}_std"] = mean_std(values) if values else (None, None)
        if all(row[f"{label}_mean"] is None for label in scores):
            continue
        for label, runs in others:
            both = [seed for seed in seeds if name in baseline_runs[seed] and name in runs[seed]]
            paired = [runs[seed][name] - baseline_runs[seed][name] for seed in both]
            diff = f"{label}-{baseline}"
            row[f"{diff}_mean"], row[f"{diff}_std"] = mean_std(paired) if paired else (None, None)
            row[f"{diff}_p"] = paired_p(paired)
        rows.append(row)
    return rows


def cell(mean: float | None, std: float | None, sign: str = "") -> str:
    return "n/a" if mean is None else f"{mean:{sign}.3f} ± {std:.3f}"


def markdown_table(rows: list[dict[str, Any]], labels: Sequence[str]) -> str:
    baseline, *others = labels
    diffs = [f"{label}-{baseline}" for label in others]
    header = [label.upper() for label in labels] + [f"{label.upper()} - {baseline.upper()} | p" for label in others]
    lines = [f"| score | {' | '.join(header)} |", "| --- |" + " ---: |" * (len(labels) + 2 * len(others))]
    for row in rows:
        cells = [cell(row[f"{label}_mean"], row[f"{label}_std"]) for label in labels]
        for diff in diffs:
            p = row[f"{diff}_p"]
            cells += [cell(row[f"{diff}_mean"], row[f"{diff}_std"], "+"), "n/a" if p is None else f"{p:.2g}"]
        lines.append(f"| {row['score']} | {' | '.join(cells)} |")
    return "\n".join(lines) + (
        f"\n\nmean ± std over {rows[0]['seeds']} seeds; each difference from {baseline.upper()} is paired by seed, "
        "p is the two-sided p-value of a paired t-test.\n"
    )


def comparison_figure(latents: Sequence[analysis.Analysis], labels: Sequence[str]) -> Any:
    """Rows: the model variants; columns: the projections; the silhouette in every title; one legend."""
    from matplotlib.figure import Figure

    projections = list(latents[0].projections)
    figure = Figure(figsize=(4.2 * len(projections) + 0.8, 4.0 * len(latents)), layout="constrained")
    axes = figure.subplots(len(latents), len(projections), squeeze=False)
    for row, latent, label in zip(axes, latents, labels):
        for ax, name in zip(row, projections):
            title = pictures.projection_title(latent, name).replace(latent.kind.upper(), label.upper(), 1)
            pictures.scatter(ax, latent.projections[name], latent.codes.labels, title, name, legend=False)
    figure.legend(handles=pictures.digit_handles(np.unique(latents[0].codes.labels)), loc="outside right center")
    return figure


def write_outputs(folder: Path, rows: list[dict[str, Any]], markdown: str, figure: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "scores.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (folder / "scores.md").write_text(markdown)
    figure.savefig(folder / FIGURE_NAME, dpi=110)
    return folder / FIGURE_NAME


def instantiate(label: str, child: Namespace) -> tuple[Any, Any]:
    try:
        return training.instantiate(child)
    except UsageError as err:
        raise UsageError(f"compare.models ({label}): {err}") from err


def run_compare(args: Sequence[str]) -> Comparison:
    """Every child run under one parent run, then the side-by-side figure and the score table."""
    from mlflow import MlflowClient

    parser = compare_parser()
    config = training.parse_config(args, parser)
    children = child_configs(config)
    built = [instantiate(label, child) for label, _, child in children]  # every model and seed, before any run
    model, datamodule = built[0]  # data, trainer and analysis are the same for all
    training.check_trainer(children[0][2])
    analysis.check(model, datamodule, analysis.AnalysisOptions(**config.analysis.as_dict()))
    uses.check(config.compare.ood, config.compare.samples, datamodule)
    uri = tracking.open_store(config.tracking.uri or tracking.default_tracking_uri())
    client = MlflowClient(uri)
    labels = list(dict.fromkeys(label for label, _, _ in children))
    name = config.tracking.run_name or f"{'-vs-'.join(labels)}-z{config.model.init_args.latent_dim}"
    experiment = tracking.experiment_id(client, config.tracking.experiment, uri)
    tags = {"compare": "-vs-".join(labels), "git_commit": tracking.git_commit()}
    parent = client.create_run(experiment, run_name=name, tags=tags).info.run_id
    error: BaseException | None = None
    try:
        log_params(client, parent, config)
        training._log_config(client, parent, parser, config)
        return compare_children(client, parent, uri, config, children, labels)
    except BaseException as err:
        error = err
        raise
    finally:
        tracking.close_run(client, parent, error)


def log_params(client: Any, run_id: str, config: Namespace) -> None:
    """The flattened config as params, in batches of MLflow's limit of 100."""
    from mlflow.entities import Param

    flat = [Param(key, str(value)) for key, value in tracking.flatten(config.as_dict()).items() if value is not None]
    for start in range(0, len(flat), 100):
        client.log_batch(run_id, params=flat[start : start + 100])


def compare_children(
    client: Any, parent: str, uri: str, config: Namespace, children: list[tuple[str, int, Namespace]], labels: list[str]
) -> Comparison:
    """Train the children, then log the figure (the first seed's models) and the table into the parent."""
    from mlflow.entities import Metric

    scores: dict[str, dict[int, dict[str, float]]] = {label: {} for label in labels}
    shown = []
    progress = RunsProgress(children)
    for label, seed, child in children:
        if console.show_progress():  # one progress line for all runs instead of Lightning's bar per run
            child.trainer.enable_progress_bar = child.trainer.enable_model_summary = False
        progress.next_run(label, seed)
        tags = {"compare.variant": label}
        result = training.run_training(child, parent_run_id=parent, tags=tags, callbacks=[progress])
        scores[label][seed] = {**result.metrics, **uses.evaluate(client, uri, result.run_id, result.model,
                               result.datamodule, config.compare.ood, config.compare.samples, seed)}
        if seed == config.compare.seeds[0]:
            shown.append(result.latent)
    progress.close()
    rows = score_table(scores)
    markdown = markdown_table(rows, labels)
    folder = Path(config.compare.output_dir)
    figure = write_outputs(folder, rows, markdown, comparison_figure(shown, labels))
    for file in ("scores.csv", "scores.md", FIGURE_NAME):
        client.log_artifact(parent, str(folder / file), "compare")
    now = int(time.time() * 1000)
    summary = [Metric(f"{row['score']}/{column}", value, now, 0) for row in rows for column, value in row.items()
               if column.endswith(("_mean", "_std", "_p")) and value is not None]  # fmt: skip
    client.log_batch(parent, metrics=summary)
    return Comparison(parent, uri, rows, markdown, figure)


class RunsProgress(Callback):
    """One progress bar over every epoch of every child run: runs done of total, the current model and seed,
    its epoch and validation loss; tqdm adds the time left."""

    def __init__(self, children: list[tuple[str, int, Namespace]]) -> None:
        self.epochs = [child.trainer.max_epochs or 1 for _, _, child in children]
        self.bar = console.bar(sum(self.epochs), "epoch", "compare")
        self.run, self.label, self.seed, self.counted = -1, "", 0, 0

    def next_run(self, label: str, seed: int) -> None:
        if self.run >= 0:  # a run that stopped early: its remaining epochs are done too
            self.bar.update(sum(self.epochs[: self.run + 1]) - self.counted)
            self.counted = sum(self.epochs[: self.run + 1])
        self.run, self.label, self.seed = self.run + 1, label, seed
        self.show(0, None)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        loss = trainer.callback_metrics.get(training.MONITOR)
        self.show(trainer.current_epoch + 1, None if loss is None else float(loss), refresh=False)
        self.bar.update(1)
        self.counted += 1

    def show(self, epoch: int, loss: float | None, refresh: bool = True) -> None:
        shown = f" {training.MONITOR} {loss:.4g}" if loss is not None else ""
        self.bar.set_postfix_str(
            f"run {self.run + 1}/{len(self.epochs)} {self.label} seed {self.seed} "
            f"epoch {epoch}/{self.epochs[self.run]}{shown}",
            refresh=refresh,
        )

    def close(self) -> None:
        self.bar.close()
