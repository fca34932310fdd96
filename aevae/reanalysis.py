"""`aevae analyze`: recompute a finished run's latent-space analysis from its logged checkpoint, into the run."""

from __future__ import annotations

import tempfile
from typing import Sequence

from jsonargparse import ArgumentParser

from aevae import tracking, training
from aevae.analysis import Analysis, AnalysisOptions, analyze_into_run


def analyze_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="aevae analyze", exit_on_error=False, default_meta=False)
    parser.add_argument("--run-id", type=str, required=True, help="MLflow run id of a training run")
    parser.add_argument(
        "--tracking-uri", type=str | None, default=None, help="default: $MLFLOW_TRACKING_URI or ./mlruns"
    )
    parser.add_class_arguments(AnalysisOptions, skip={"enabled", "every_n_epochs"})
    return parser


def analyze_run(args: Sequence[str]) -> tuple[str, Analysis]:
    """`aevae analyze --run-id ID`: analyse the run's best checkpoint again and add it to the run."""
    from mlflow import MlflowClient

    cli = training.parse_config(args, analyze_parser())
    options = AnalysisOptions(**{key: value for key, value in cli.items() if key not in ("run_id", "tracking_uri")})
    uri = tracking.require_existing(cli.tracking_uri or tracking.default_tracking_uri(), "tracking-uri")
    client = MlflowClient(tracking.open_store(uri))
    with tempfile.TemporaryDirectory() as folder:
        _, config_path, checkpoint = tracking.fetch_run_files(client, cli.run_id, "run-id", folder)
        model, datamodule = training.instantiate(training.parse_config(["--config", str(config_path)]))
        history = client.get_metric_history(cli.run_id, "silhouette_pca")
        step = max((metric.step for metric in history), default=0)  # newest value at the latest step
        return uri, analyze_into_run(client, cli.run_id, model, datamodule, options, step, checkpoint)
