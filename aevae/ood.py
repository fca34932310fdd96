"""`aevae ood`: score a run's test images against another data set's and log the detection metrics into the run.

Metrics go under ``ood/<against>/<score>/<metric>`` (with ``_low``/``_high`` bootstrap bounds); the score
histograms, the per-image scores and the table go under the artifact folder ``ood/<against>/``.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from jsonargparse import ArgumentParser

from aevae.batches import to_float
from aevae.builtin_sources import SOURCES
from aevae.data import ImageDataModule
from aevae.errors import UsageError
from aevae.models import LatentAutoencoder
from aevae.ood_metrics import METRICS, Estimate, detection_metrics
from aevae.ood_scores import LatentGaussian, check_scores, score_images, scores_for, training_codes

HELD_OUT = "heldout"
AGAINST = (*SOURCES, HELD_OUT)
ARTIFACT_DIR = "ood"


@dataclass
class OodOptions:
    """What `aevae ood` scores and how."""

    against: str
    k: int = 100
    scores: list[str] | None = None
    bootstrap: int = 200
    max_images: int | None = None
    seed: int = 0

    def check(self) -> None:
        if self.against not in AGAINST:
            raise UsageError(f"against: unknown source {self.against!r}; choose one of {', '.join(AGAINST)}")
        if self.k < 1:
            raise UsageError(f"k: the number of importance samples must be >= 1, got {self.k}")
        if self.bootstrap < 0:
            raise UsageError(f"bootstrap: must be >= 0, got {self.bootstrap}")
        if self.max_images is not None and self.max_images < 2:
            raise UsageError(f"max-images: must be >= 2, got {self.max_images}")
        if not 0 <= self.seed < 2**32:
            raise UsageError(f"seed: must be in 0..{2**32 - 1}, got {self.seed}")


@dataclass
class OodResult:
    against: str
    metrics: dict[str, dict[str, Estimate]]  # score -> metric -> estimate
    in_scores: dict[str, np.ndarray]
    out_scores: dict[str, np.ndarray]
    seconds: float
    cpu_seconds: float  # process CPU time over all threads: comparable on a shared machine, unlike wall time

    def flat(self) -> dict[str, float]:
        """MLflow metrics: ood/<against>/<score>/<metric>, its _low and _high bounds, and the score's mean in and out."""
        flat = {f"{ARTIFACT_DIR}/{self.against}/seconds": self.seconds,
                f"{ARTIFACT_DIR}/{self.against}/cpu_seconds": self.cpu_seconds}  # fmt: skip
        for score, estimates in self.metrics.items():
            prefix = f"{ARTIFACT_DIR}/{self.against}/{score}"
            flat[f"{prefix}/mean_in"] = float(np.mean(self.in_scores[score]))
            flat[f"{prefix}/mean_out"] = float(np.mean(self.out_scores[score]))
            for metric, estimate in estimates.items():
                key = f"{ARTIFACT_DIR}/{self.against}/{score}/{metric}"
                flat.update({key: estimate.value, f"{key}_low": estimate.low, f"{key}_high": estimate.high})
        return flat

    def markdown(self) -> str:
        lines = [f"| score | {' | '.join(METRICS)} |", "|---|" + "---:|" * len(METRICS)]
        for score, estimates in self.metrics.items():
            cells = [f"{e.value:.3f} [{e.low:.3f}, {e.high:.3f}]" for e in (estimates[m] for m in METRICS)]
            lines.append(f"| {score} | {' | '.join(cells)} |")
        return "\n".join(lines)


def other_data(data: ImageDataModule, against: str) -> ImageDataModule:
    """The out-of-distribution data: another source, or the classes the run held out, preprocessed alike."""
    settings = {key: value for key, value in data.hparams.items()}
    if against == HELD_OUT:
        if data.classes is None:
            raise UsageError("against: heldout needs a run trained with data.classes (some classes held out)")
        held_out = [label for label in range(10) if label not in data.classes]
        if not held_out:
            raise UsageError("against: the run's data.classes keeps every class; none is held out")
        return ImageDataModule(**{**settings, "classes": held_out})
    if against == data.source and data.classes is None:
        raise UsageError(f"against: the run was trained on {against}; choose another source")
    return ImageDataModule(**{**settings, "source": against, "classes": None})


def test_images(data: ImageDataModule, max_images: int | None, seed: int) -> torch.Tensor:
    """The test split's images, or a seeded random max_images of them."""
    data.setup()
    images = to_float(data.splits["test"].images)
    if max_images is None or max_images >= len(images):
        return images
    keep = np.sort(np.random.default_rng(seed).choice(len(images), max_images, replace=False))
    return images[torch.from_numpy(keep)]


def detect(model: LatentAutoencoder, data: ImageDataModule, other: ImageDataModule, options: OodOptions) -> OodResult:
    """Score both test sets with every requested score and measure how well each score separates them."""
    start, cpu_start = time.perf_counter(), time.process_time()
    names = options.scores or list(scores_for(model.kind))
    inside = test_images(data, options.max_images, options.seed)
    outside = test_images(other, options.max_images, options.seed + 1)
    latent = LatentGaussian(training_codes(model, to_float(data.splits["train"].images))) if "mahalanobis" in names else None
    in_scores = score_images(model, inside, names, options.k, latent, options.seed)
    out_scores = score_images(model, outside, names, options.k, latent, options.seed + 1)
    metrics = {
        name: detection_metrics(in_scores[name], out_scores[name], options.bootstrap, seed=options.seed)
        for name in names
    }
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return OodResult(options.against, metrics, in_scores, out_scores, seconds, cpu_seconds)


def histograms(result: OodResult, source: str, path: Path) -> None:
    """One panel per score: in- and out-of-distribution test images, shared bins, AUROC in the title."""
    import matplotlib.pyplot as plt

    names = list(result.metrics)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        both = np.concatenate([result.in_scores[name], result.out_scores[name]])
        bins = np.linspace(*np.percentile(both, [0.5, 99.5]), 50)
        ax.hist(result.in_scores[name], bins, density=True, alpha=0.6, label=f"{source} (in)")
        ax.hist(result.out_scores[name], bins, density=True, alpha=0.6, label=f"{result.against} (out)")
        ax.set_title(f"{name}: AUROC {result.metrics[name]['auroc'].value:.3f}", fontsize=9)
        ax.set_yticks([])
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_result(client: Any, run_id: str, result: OodResult, source: str) -> None:
    """Metrics under ood/<against>/ and the histograms, scores and table as artifacts; files written locally first."""
    from mlflow.entities import Metric

    with tempfile.TemporaryDirectory() as folder:
        folder_path = Path(folder)
        histograms(result, source, folder_path / "histograms.png")
        np.savez_compressed(
            folder_path / "scores.npz",
            **{f"in_{k}": v for k, v in result.in_scores.items()}, **{f"out_{k}": v for k, v in result.out_scores.items()},
        )
        (folder_path / "metrics.json").write_text(json.dumps(result.flat(), indent=1))
        (folder_path / "metrics.md").write_text(result.markdown() + "\n")
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(key, value, now, 0) for key, value in result.flat().items()])
        client.log_artifacts(run_id, folder, f"{ARTIFACT_DIR}/{result.against}")


# --- aevae ood ---------------------------------------------------------------------------------------------


def ood_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="aevae ood", exit_on_error=False, default_meta=False)
    parser.add_argument("--run-id", type=str, required=True, help="MLflow run id of a training run")
    parser.add_argument(
        "--tracking-uri", type=str | None, default=None, help="default: $MLFLOW_TRACKING_URI or ./mlruns"
    )
    parser.add_class_arguments(OodOptions)
    return parser


def ood_command(args: Sequence[str]) -> int:
    """`aevae ood --run-id ID --against SOURCE`: everything is checked before the first metric is logged."""
    from mlflow import MlflowClient

    from aevae import checkpoints, tracking, training
    from aevae.tracking import mask_secrets

    cli = training.parse_config(args, ood_parser())
    options = OodOptions(**{key: value for key, value in cli.items() if key not in ("run_id", "tracking_uri")})
    options.check()
    uri = tracking.require_existing(cli.tracking_uri or tracking.default_tracking_uri(), "tracking-uri")
    client = MlflowClient(tracking.open_store(uri))
    with tempfile.TemporaryDirectory() as folder:
        _, config_path, checkpoint = tracking.fetch_run_files(client, cli.run_id, "run-id", folder)
        model, data = training.instantiate(training.parse_config(["--config", str(config_path)]))
        check_scores(model.kind, options.scores or [])
        other = other_data(data, options.against)
        data.setup(), other.setup()  # a missing data file fails here, before anything is logged
        checkpoints.load_weights(model, checkpoint)
    result = detect(model, data, other, options)
    log_result(client, cli.run_id, result, data.source)
    print(f"{data.source} (in) against {options.against} (out), {model.kind.upper()} run {cli.run_id}, "
          f"IWAE k={options.k}, {result.seconds:.0f} s ({result.cpu_seconds:.0f} CPU s)")  # fmt: skip
    print(result.markdown())
    print(f"logged under {ARTIFACT_DIR}/{options.against}/: {mask_secrets(uri)}")
    return 0
