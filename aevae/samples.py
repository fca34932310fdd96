"""Sample quality: images generated from the VAE's prior, and from a Gaussian mixture fitted on the training codes
(AE and VAE, as pythae's GMM sampler), against the test images, in the feature space of a small classifier.

Fréchet distance (FID's formula on these features) and precision/recall on k-NN manifolds (Kynkäänniemi et al.
2019, "Improved precision and recall metric for assessing generative models"). Metrics go under
``samples/<sampler>/`` in the run; image grids under the artifact folder ``samples/``.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from jsonargparse import ArgumentParser

from aevae.batches import to_float
from aevae.errors import UsageError
from aevae.models import LatentAutoencoder
from aevae.ood_scores import training_codes

ARTIFACT_DIR = "samples"
NEIGHBOURS = 3  # k of the k-NN manifolds, as in Kynkäänniemi et al.
GRID_SIDE = 8


# --- metrics ------------------------------------------------------------------------------------------------


def frechet_distance_from_stats(mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray, cov_b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), the Fréchet distance of two Gaussians."""
    from scipy.linalg import sqrtm

    root = sqrtm(cov_a @ cov_b)
    root = root.real if np.iscomplexobj(root) else root  # rounding leaves tiny imaginary parts
    return float(np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a + cov_b - 2 * root))


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance of the Gaussians with the two sets' means and covariances."""
    a, b = features_a.astype(np.float64), features_b.astype(np.float64)
    return frechet_distance_from_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def knn_radii(features: torch.Tensor, k: int, chunk: int = 2000) -> torch.Tensor:
    """Distance of each point to its k-th nearest other point of the same set."""
    radii = [torch.cdist(block, features).kthvalue(k + 1, dim=1).values for block in features.split(chunk)]
    return torch.cat(radii)


def coverage(points: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor, chunk: int = 2000) -> float:
    """Share of points inside at least one ball of the manifold (centre, k-NN radius)."""
    inside = [(torch.cdist(block, manifold) <= radii).any(1) for block in points.split(chunk)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: np.ndarray, generated: np.ndarray, k: int = NEIGHBOURS) -> tuple[float, float]:
    """Precision: generated images on the real manifold; recall: real images on the generated manifold."""
    real_t, fake_t = torch.from_numpy(real).double(), torch.from_numpy(generated).double()
    precision = coverage(fake_t, real_t, knn_radii(real_t, k))
    recall = coverage(real_t, fake_t, knn_radii(fake_t, k))
    return precision, recall


# --- generation ---------------------------------------------------------------------------------------------


@torch.no_grad()
def decode_means(model: LatentAutoencoder, z: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    model.eval()
    return torch.cat([model.decode_mean(b.to(model.device)).float().cpu() for b in z.split(batch_size)])


def prior_codes(model: LatentAutoencoder, n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, model.latent_dim, generator=torch.Generator().manual_seed(seed))


def gmm_codes(train_codes: np.ndarray, n: int, components: int, seed: int) -> torch.Tensor:
    """Codes drawn from a full-covariance Gaussian mixture fitted on the training codes (seeded)."""
    from sklearn.mixture import GaussianMixture

    mixture = GaussianMixture(components, covariance_type="full", random_state=seed).fit(train_codes)
    mixture.random_state = seed  # sample() draws from random_state too
    return torch.from_numpy(mixture.sample(n)[0]).float()


def samplers_for(kind: str) -> tuple[str, ...]:
    return ("prior", "gmm") if kind == "vae" else ("gmm",)


@dataclass
class SampleQuality:
    scores: dict[str, float]  # samples/<sampler>/<metric>
    grids: dict[str, np.ndarray]  # sampler -> [GRID_SIDE * GRID_SIDE, 28, 28]
    seconds: float


def sample_quality(
    model: LatentAutoencoder, train_images: torch.Tensor, test_images: torch.Tensor, features: Any,
    n: int, components: int, seed: int,
) -> SampleQuality:  # fmt: skip
    """Generate n images per sampler and score them against the test images' features."""
    start = time.perf_counter()
    real = features(test_images)
    codes = {"prior": lambda: prior_codes(model, n, seed)}
    codes["gmm"] = lambda: gmm_codes(training_codes(model, train_images), n, components, seed)
    scores, grids = {}, {}
    for sampler in samplers_for(model.kind):
        images = decode_means(model, codes[sampler]())
        generated = features(images)
        precision, recall = precision_recall(real, generated)
        scores.update({f"{ARTIFACT_DIR}/{sampler}/fd": frechet_distance(real, generated),
                       f"{ARTIFACT_DIR}/{sampler}/precision": precision, f"{ARTIFACT_DIR}/{sampler}/recall": recall})  # fmt: skip
        grids[sampler] = images[: GRID_SIDE**2].squeeze(1).numpy()
    scores[f"{ARTIFACT_DIR}/test_fd_half"] = frechet_distance(real[::2], real[1::2])  # the floor: real against real
    return SampleQuality(scores, grids, time.perf_counter() - start)


def save_grids(quality: SampleQuality, folder: Path) -> None:
    import matplotlib.pyplot as plt

    for sampler, images in quality.grids.items():
        rows = images.reshape(GRID_SIDE, GRID_SIDE, 28, 28).transpose(0, 2, 1, 3).reshape(GRID_SIDE * 28, -1)
        plt.imsave(folder / f"{sampler}.png", rows, cmap="gray", vmin=0, vmax=1)


def log_quality(client: Any, run_id: str, quality: SampleQuality, extra: dict[str, float]) -> None:
    from mlflow.entities import Metric

    with tempfile.TemporaryDirectory() as folder:
        save_grids(quality, Path(folder))
        now = int(time.time() * 1000)
        metrics = {**quality.scores, **extra}
        client.log_batch(run_id, metrics=[Metric(key, value, now, 0) for key, value in metrics.items()])
        client.log_artifacts(run_id, folder, ARTIFACT_DIR)


def evaluate_into_run(
    client: Any, uri: str, run_id: str, model: LatentAutoencoder, data: Any, n: int = 10000, components: int = 10,
    seed: int = 0,
) -> SampleQuality:  # fmt: skip
    """The run's sample quality, with the data set's cached feature classifier, logged into the run."""
    from aevae.feature_net import feature_net

    data.setup()
    net, accuracy = feature_net(client, uri, data, seed=0)
    train, test = to_float(data.splits["train"].images), to_float(data.splits["test"].images)
    quality = sample_quality(model, train, test, net.features, n, components, seed)
    log_quality(client, run_id, quality, {f"{ARTIFACT_DIR}/classifier_test_acc": accuracy})
    return quality


# --- aevae samples --------------------------------------------------------------------------------------------


def samples_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="aevae samples", exit_on_error=False, default_meta=False)
    parser.add_argument("--run-id", type=str, required=True, help="MLflow run id of a training run")
    parser.add_argument("--tracking-uri", type=str | None, default=None, help="default: $MLFLOW_TRACKING_URI or ./mlruns")
    parser.add_argument("--n", type=int, default=10000, help="images generated per sampler")
    parser.add_argument("--components", type=int, default=10, help="Gaussian mixture components on the codes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated codes")
    return parser


def check_options(n: int, components: int, seed: int) -> None:
    if n < NEIGHBOURS + 1:
        raise UsageError(f"n: must be >= {NEIGHBOURS + 1} (k-NN manifolds of k={NEIGHBOURS}), got {n}")
    if components < 1:
        raise UsageError(f"components: must be >= 1, got {components}")
    if not 0 <= seed < 2**32:
        raise UsageError(f"seed: must be in 0..{2**32 - 1}, got {seed}")


def samples_command(args: Sequence[str]) -> int:
    """`aevae samples --run-id ID`: checked before anything is written; prints and logs the scores."""
    from mlflow import MlflowClient

    from aevae import checkpoints, tracking, training
    from aevae.tracking import mask_secrets

    cli = training.parse_config(args, samples_parser())
    check_options(cli.n, cli.components, cli.seed)
    uri = tracking.require_existing(cli.tracking_uri or tracking.default_tracking_uri(), "tracking-uri")
    client = MlflowClient(tracking.open_store(uri))
    with tempfile.TemporaryDirectory() as folder:
        _, config_path, checkpoint = tracking.fetch_run_files(client, cli.run_id, "run-id", folder)
        model, data = training.instantiate(training.parse_config(["--config", str(config_path)]))
        data.setup()
        checkpoints.load_weights(model, checkpoint)
    quality = evaluate_into_run(client, uri, cli.run_id, model, data, cli.n, cli.components, cli.seed)
    print(" ".join(f"{key.removeprefix(ARTIFACT_DIR + '/')}={value:.4g}" for key, value in quality.scores.items()))
    print(f"logged under {ARTIFACT_DIR}/: {mask_secrets(uri)}")
    return 0
