"""Likelihood next to the literature: a VAE on dynamically binarized MNIST, its test negative ELBO and
an importance-sampled NLL (IWAE bound), beside an independent per-pixel Bernoulli model as a floor.

Architecture (stated, as the literature's): MLP 784-500-500-50 encoder and mirrored decoder, ReLU,
Bernoulli likelihood, Gaussian posterior, N(0, I) prior, Adam 1e-3, batch 100, latent 50. Training is an
ordinary `aevae train` run (recorded in MLflow) stopped by a wall-clock budget (Trainer max_time).

Anchors: VAE, 1 stochastic layer, dynamic binarization, k=5000: 86.76 nats (Burda et al. 2015, Table 1);
pythae's reproduction: 89.78 nats (200 importance samples).

Run: `python benchmarks/quality.py --minutes 60 --k 1000` (full test set; the standard error is printed).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer

from aevae.batches import to_float
from aevae.models import VAE
from aevae.training import parse_config, run_training

REPO = Path(__file__).resolve().parents[1]


def bernoulli_floor(train: torch.Tensor, test: torch.Tensor) -> float:
    """NLL (nats/image) of independent pixels with the train set's mean intensities (a model with no latent)."""
    p = train.mean(0).clamp(1e-4, 1 - 1e-4)
    return float(-(test * p.log() + (1 - test) * (1 - p).log()).flatten(1).sum(1).mean())


def iwae_nll(model: VAE, images: torch.Tensor, k: int, batch: int = 100) -> tuple[float, float]:
    """Mean IWAE-bound NLL over images and its standard error (nats/image)."""
    model.eval()
    per_image = torch.cat([model.importance_sampled_nll(x, k=k, chunk=min(k, 500)) for x in images.split(batch)])
    return float(per_image.mean()), float(per_image.std() / math.sqrt(len(per_image)))


def plot_curve(tracking_uri: str, run_id: str, folder: Path) -> Path:
    """Validation negative ELBO and IWAE NLL against epochs, from the run's metric history; logged to the run."""
    from matplotlib.figure import Figure
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    figure = Figure(figsize=(6, 4), layout="constrained")
    ax = figure.subplots()
    for metric, label in (("val/nelbo", "val negative ELBO"), ("val/iwae_nll", "val IWAE NLL, k=100, 1000 images")):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric))
        if history:
            ax.plot(*zip(*history), marker="." if metric == "val/iwae_nll" else None, label=label)
    ax.set(xlabel="epoch", ylabel="nats / image", ylim=(84, 130), title="VAE 784-500-500-50, binarized MNIST")
    ax.axhline(86.76, color="grey", ls=":", label="Burda et al. 2015 (test, k=5000)")
    ax.legend()
    folder.mkdir(parents=True, exist_ok=True)
    figure.savefig(folder / "nll_curve.png", dpi=110)
    client.log_artifact(run_id, str(folder / "nll_curve.png"))
    return folder / "nll_curve.png"


class LikelihoodCurve(Callback):
    """The curve of NLL against epochs: every `every` epochs, the IWAE bound (k samples) on the first `n`
    validation images, logged to the run as val/iwae_nll (its time counts against the budget)."""

    def __init__(self, every: int, k: int = 100, n: int = 1000) -> None:
        self.every, self.k, self.n = every, k, n

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: VAE) -> None:
        epoch = trainer.current_epoch + 1
        if trainer.sanity_checking or epoch % self.every:
            return
        images = to_float(trainer.datamodule.splits["val"].images[: self.n])
        with torch.inference_mode():
            nll, _ = iwae_nll(pl_module, images, self.k)
        trainer.logger.log_metrics({"val/iwae_nll": nll}, step=epoch)
        print(f"epoch {epoch}: val IWAE NLL (k={self.k}, {len(images)} images) {nll:.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=os.environ.get("AEVAE_DATA_ROOT", str(REPO.parent / "shared" / "datasets")))
    parser.add_argument("--minutes", type=float, default=60.0, help="training budget (wall clock)")
    parser.add_argument("--k", type=int, default=1000, help="importance samples per test image")
    parser.add_argument("--test-images", type=int, default=10000, help="test images scored by the IWAE bound")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="out/quality", help="folder for the NLL curve figure")
    parser.add_argument("--curve-every", type=int, default=10, help="epochs between points of the NLL curve")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    budget = time.strftime("%H:%M:%S", time.gmtime(args.minutes * 60))
    with tempfile.TemporaryDirectory() as folder:
        config = parse_config([
            "--model", "aevae.models.VAE", "--model.latent_dim", "50", "--model.hidden_dims", "[500, 500]",
            "--data.source", "mnist", "--data.root", args.root, "--data.binarize", "true", "--data.batch_size", "100",
            "--trainer.max_epochs", "10000", "--trainer.max_time", f"00:{budget}", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--analysis.enabled", "false",
            "--tracking.experiment", "quality", "--tracking.run_name", "vae-z50-binarized",
            "--fit.checkpoint_dir", str(Path(folder) / "checkpoints"),
        ])  # fmt: skip
        started = time.perf_counter()
        result = run_training(config, callbacks=[LikelihoodCurve(args.curve_every)])
        minutes = (time.perf_counter() - started) / 60
    curve = plot_curve(result.tracking_uri, result.run_id, Path(args.out))
    data = result.datamodule
    test = to_float(data.splits["test"].images[: args.test_images])
    nll, stderr = iwae_nll(result.model, test, args.k)
    floor = bernoulli_floor(to_float(data.splits["train"].images), to_float(data.splits["test"].images))
    print(f"\nVAE 784-500-500-50, dynamic binarization, {result.trainer.current_epoch} epochs in {minutes:.1f} min "
          f"(MLflow run {result.run_id})")  # fmt: skip
    print("| model | test NLL (nats) |\n|---|---:|")
    print(f"| independent Bernoulli pixels (floor) | {floor:.2f} |")
    print(f"| this VAE, negative ELBO (best checkpoint) | {result.metrics['test/nelbo']:.2f} |")
    print(f"| this VAE, IWAE k={args.k} on {len(test)} test images | {nll:.2f} ± {stderr:.2f} |")
    print("| Burda et al. 2015, VAE 1 layer, k=5000 | 86.76 |\n| pythae reproduction, 200 samples | 89.78 |")
    print(f"NLL against epochs: {curve}")


if __name__ == "__main__":
    main()
