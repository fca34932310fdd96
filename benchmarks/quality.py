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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=os.environ.get("AEVAE_DATA_ROOT", str(REPO.parent / "shared" / "datasets")))
    parser.add_argument("--minutes", type=float, default=60.0, help="training budget (wall clock)")
    parser.add_argument("--k", type=int, default=1000, help="importance samples per test image")
    parser.add_argument("--test-images", type=int, default=10000, help="test images scored by the IWAE bound")
    parser.add_argument("--threads", type=int, default=2)
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
        result = run_training(config)
        minutes = (time.perf_counter() - started) / 60
    data = result.datamodule
    test = data.splits["test"].images[: args.test_images]
    nll, stderr = iwae_nll(result.model, test, args.k)
    floor = bernoulli_floor(data.splits["train"].images, data.splits["test"].images)
    print(f"\nVAE 784-500-500-50, dynamic binarization, {result.trainer.current_epoch} epochs in {minutes:.1f} min "
          f"(MLflow run {result.run_id})")  # fmt: skip
    print("| model | test NLL (nats) |\n|---|---:|")
    print(f"| independent Bernoulli pixels (floor) | {floor:.2f} |")
    print(f"| this VAE, negative ELBO (best checkpoint) | {result.metrics['test/nelbo']:.2f} |")
    print(f"| this VAE, IWAE k={args.k} on {len(test)} test images | {nll:.2f} ± {stderr:.2f} |")
    print("| Burda et al. 2015, VAE 1 layer, k=5000 | 86.76 |\n| pythae reproduction, 200 samples | 89.78 |")


if __name__ == "__main__":
    main()
