"""`aevae compare`: AE and VAE with the same encoder/decoder, data and budget, over seeds, as one MLflow parent run.

The config is an experiment config (experiments/*.yaml) plus a ``compare`` group. Every child is parsed
by `training.parse_config` from that experiment with its model class and seed, so each one is an ordinary,
re-runnable training run nested under the parent.
"""

from __future__ import annotations

import csv
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from jsonargparse import ArgumentParser, Namespace

from aevae import analysis, tracking, training
from aevae.errors import UsageError

TABLE_SCORES = ("silhouette_latent", "silhouette_pca", "silhouette_umap", "knn_acc", "probe_acc", "active_units",
                "test/recon")  # fmt: skip
FIGURE_NAME = "ae_vs_vae.png"


@dataclass
class CompareOptions:
    """What `aevae compare` varies.

    Args:
        seeds: one run of each model per seed.
        models: the two model classes; both get the experiment's ``model.init_args`` (those they accept).
        output_dir: local folder for the figure and the table (both are also logged to the parent run).
    """

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    models: list[str] = field(default_factory=lambda: ["aevae.models.AE", "aevae.models.VAE"])
    output_dir: str = "out/compare"


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
    """(model kind, seed, config) of every child run, each parsed as `aevae train` would parse it."""
    options = config.compare
    if len(options.models) != 2 or len(set(options.models)) != 2:
        raise UsageError(f"compare.models: give two different model classes, got {options.models}")
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
        for model in options.models:
            for seed in options.seeds:
                children.append(child_config(path, model, seed))
    return children


def child_config(experiment: Path, model: str, seed: int) -> tuple[str, int, Namespace]:
    try:
        child = training.parse_config(["--config", str(experiment), f"--model={model}", f"--seed={seed}"])
    except UsageError as err:  # the base experiment parsed, so it is the model class
        raise UsageError(f"compare.models: {model}: {err}") from err
    return training.model_kind(child), seed, child


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def score_table(scores: dict[str, dict[int, dict[str, float]]]) -> list[dict[str, Any]]:
    """One row per score: each model's mean and std over seeds, and the paired difference (second - first)."""
    (first, first_runs), (second, second_runs) = scores.items()
    seeds = sorted(first_runs)
    rows = []
    for name in TABLE_SCORES:
        row: dict[str, Any] = {"score": name, "seeds": len(seeds)}
        for kind, runs in ((first, first_runs), (second, second_runs)):
            values = [runs[seed][name] for seed in seeds if name in runs[seed]]
            row[f"{kind}_mean"], row[f"{kind}_std"] = mean_std(values) if values else (None, None)
        if row[f"{first}_mean"] is None and row[f"{second}_mean"] is None:
            continue
        both = [seed for seed in seeds if name in first_runs[seed] and name in second_runs[seed]]
        paired = [second_runs[seed][name] - first_runs[seed][name] for seed in both]
        row["diff_mean"], row["diff_std"] = mean_std(paired) if paired else (None, None)
        rows.append(row)
    return rows


def cell(mean: float | None, std: float | None, sign: str = "") -> str:
    return "n/a" if mean is None else f"{mean:{sign}.3f} ± {std:.3f}"


def markdown_table(rows: list[dict[str, Any]], kinds: Sequence[str]) -> str:
    first, second = kinds
    header = f"| score | {first.upper()} | {second.upper()} | {second.upper()} - {first.upper()} |"
    lines = [header, "| --- | ---: | ---: | ---: |"]
    for row in rows:
        cells = [cell(row[f"{kind}_mean"], row[f"{kind}_std"]) for kind in kinds]
        lines.append(f"| {row['score']} | {cells[0]} | {cells[1]} | {cell(row['diff_mean'], row['diff_std'], '+')} |")
    return "\n".join(lines) + f"\n\nmean ± std over {rows[0]['seeds']} seeds; the difference is paired by seed.\n"


def comparison_figure(latents: Sequence[analysis.Analysis]) -> Any:
    """Rows: the models; columns: the projections; the silhouette in every title; one legend."""
    from matplotlib.figure import Figure

    projections = list(latents[0].projections)
    figure = Figure(figsize=(4.2 * len(projections) + 0.8, 4.0 * len(latents)), layout="constrained")
    axes = figure.subplots(len(latents), len(projections), squeeze=False)
    for row, latent in zip(axes, latents):
        for ax, name in zip(row, projections):
            title = analysis.projection_title(latent, name)
            analysis.scatter(ax, latent.projections[name], latent.codes.labels, title, name, legend=False)
    figure.legend(handles=analysis.digit_handles(np.unique(latents[0].codes.labels)), loc="outside right center")
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


def run_compare(args: Sequence[str]) -> Comparison:
    """Every child run under one parent run, then the side-by-side figure and the score table."""
    from mlflow import MlflowClient

    parser = compare_parser()
    config = training.parse_config(args, parser)
    children = child_configs(config)
    built = [training.instantiate(child) for _, _, child in children]  # every model and seed, before any run
    model, datamodule = built[0]  # data, trainer and analysis are the same for all
    training.check_trainer(children[0][2])
    analysis.check(model, datamodule, analysis.AnalysisOptions(**config.analysis.as_dict()))
    uri = tracking.open_store(config.tracking.uri or tracking.default_tracking_uri())
    client = MlflowClient(uri)
    kinds = list(dict.fromkeys(kind for kind, _, _ in children))
    name = config.tracking.run_name or f"{'-vs-'.join(kinds)}-z{config.model.init_args.latent_dim}"
    experiment = tracking.experiment_id(client, config.tracking.experiment, uri)
    tags = {"compare": "-vs-".join(kinds), "git_commit": tracking.git_commit()}
    parent = client.create_run(experiment, run_name=name, tags=tags).info.run_id
    error: BaseException | None = None
    try:
        log_params(client, parent, config)
        training._log_config(client, parent, parser, config)
        return compare_children(client, parent, uri, config, children, kinds)
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
    client: Any, parent: str, uri: str, config: Namespace, children: list[tuple[str, int, Namespace]], kinds: list[str]
) -> Comparison:
    """Train the children, then log the figure (the first seed's models) and the table into the parent."""
    from mlflow.entities import Metric

    scores: dict[str, dict[int, dict[str, float]]] = {kind: {} for kind in kinds}
    shown = []
    for kind, seed, child in children:
        result = training.run_training(child, parent_run_id=parent)
        scores[kind][seed] = result.metrics
        if seed == config.compare.seeds[0]:
            shown.append(result.latent)
    rows = score_table(scores)
    markdown = markdown_table(rows, kinds)
    folder = Path(config.compare.output_dir)
    figure = write_outputs(folder, rows, markdown, comparison_figure(shown))
    for file in ("scores.csv", "scores.md", FIGURE_NAME):
        client.log_artifact(parent, str(folder / file), "compare")
    now = int(time.time() * 1000)
    summary = [Metric(f"{row['score']}/{column}", value, now, 0) for row in rows for column, value in row.items()
               if column.endswith(("_mean", "_std")) and value is not None]  # fmt: skip
    client.log_batch(parent, metrics=summary)
    return Comparison(parent, uri, rows, markdown, figure)
