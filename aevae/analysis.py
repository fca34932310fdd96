"""Latent-space analysis of a trained AE or VAE: codes, 2-D projections, cluster scores, probes, pictures.

`analyze` is a pure function of a model and its data; `log_analysis` is the one place that writes
an analysis into an MLflow run (`aevae analyze` is in `reanalysis`). sklearn, umap and matplotlib are
imported where they are used, so that commands which never analyse start fast.
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from jsonargparse.typing import PositiveInt

from aevae import checkpoints
from aevae.batches import to_float
from aevae.data import ImageDataModule
from aevae.errors import UsageError
from aevae.epoch_metrics import ACTIVE_UNIT_KL
from aevae.models import LatentAutoencoder, gaussian_kl_per_dim
from aevae.pictures import GRID_TITLES, evaluating, has_classes, image_grid, picture_grids, projection_title, scatter

ARTIFACT_DIR = "latent"
PROJECTIONS = ("pca", "umap")
KNN_NEIGHBOURS = 5
UMAP_NEIGHBOURS = 15
UMAP_EPOCHS = 200
Labelled = tuple[torch.Tensor, np.ndarray]  # images uint8 [N, C, H, W], labels [N] (-1: unlabelled)
NO_LABELS = "the data have no class labels (label -1): silhouettes and probes need them"


@dataclass
class AnalysisOptions:
    """Latent-space analysis of the trained model, logged into its run (metrics, and artifacts under ``latent/``).

    Args:
        enabled: analyse the best checkpoint at the end of fit.
        split: the split that is encoded, projected and scored; the probes learn from the train split's codes.
        every_n_epochs: also analyse the current weights every N epochs during fit (None: only at the end).
        umap: compute the UMAP projection (the slowest step) as well as PCA.
        sample_size: points scored by silhouette, which costs O(n^2); drawn with ``seed``.
        sample_posterior: VAE: analyse one posterior sample per image instead of the posterior mean.
        seed: seed of every random choice in the analysis (silhouette sample, UMAP, posterior and prior samples).
    """

    enabled: bool = True
    split: Literal["test", "val"] = "test"
    every_n_epochs: PositiveInt | None = None
    umap: bool = True
    sample_size: PositiveInt = 5000
    sample_posterior: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:  # UMAP seeds numpy's RandomState
            raise UsageError(f"analysis.seed: must be in 0..{2**32 - 1}, got {self.seed}")


@dataclass
class Codes:
    """One split, encoded. ``z`` is what gets projected and scored: the AE's code, the VAE's mean or a sample."""

    z: np.ndarray  # [N, D] float32
    labels: np.ndarray  # [N] int64
    logvar: np.ndarray | None = None  # VAE posterior log-variance (its mean is z unless sampled)
    mean: np.ndarray | None = None  # VAE posterior mean


@dataclass
class Analysis:
    kind: str
    split: str
    codes: Codes
    train: Codes
    projections: dict[str, np.ndarray]  # name -> [N, 2]
    scores: dict[str, float]
    grids: dict[str, np.ndarray]  # picture name -> images [rows, cols, C, H, W] in [0, 1]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per step
    skipped: dict[str, str] = field(default_factory=dict)  # scores not computed -> why


@contextmanager
def timed(timings: dict[str, float], step: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[step] = timings.get(step, 0.0) + time.perf_counter() - start


# --- checks: run before anything is logged --------------------------------------------------


def labelled_split(datamodule: ImageDataModule, split: str) -> Labelled:
    """Images and labels of a split (-1 for every image where the data have no labels)."""
    datamodule.setup()
    data = datamodule.splits.get(split)
    if data is None:
        raise UsageError(f"analysis.split: no split {split!r}; choose one of {', '.join(datamodule.splits)}")
    labels = np.full(len(data), -1, np.int64) if data.labels is None else np.asarray(data.labels, dtype=np.int64)
    if len(labels) < 2:
        raise UsageError(f"analysis.split: split {split!r} has {len(labels)} image(s); the analysis needs two or more")
    return data.images, labels


def label_problem(labels: np.ndarray, split: str) -> str | None:
    """Why the label scores cannot be computed on these labels, or None."""
    if not has_classes(labels):
        return NO_LABELS if (labels < 0).any() else f"the {split} split has fewer than two classes"
    if len(np.unique(labels)) >= len(labels):
        return f"the {split} split has {len(labels)} images of {len(np.unique(labels))} classes; silhouette needs more"
    return None


def check(model: LatentAutoencoder, datamodule: ImageDataModule, options: AnalysisOptions) -> tuple[Labelled, Labelled]:
    """The analysed split and the train split (images, labels), failing on what would stop the analysis.

    Called before a run exists, so that bad input leaves nothing logged half-way.
    """
    if model.latent_dim < 2:
        raise UsageError(
            f"model.latent_dim: a 2-D projection needs latent_dim >= 2, got {model.latent_dim}; "
            "or set analysis.enabled false"
        )
    return labelled_split(datamodule, options.split), labelled_split(datamodule, "train")


# --- encoding, projections, scores -----------------------------------------------------------


def encode(
    model: LatentAutoencoder, images: torch.Tensor, labels: np.ndarray, sample: bool = False,
    seed: int = 0, batch_size: int = 1000,
) -> Codes:  # fmt: skip
    """Codes of images: the AE's z, the VAE's posterior mean, or (sample) one seeded posterior sample."""
    generator = torch.Generator().manual_seed(seed)
    zs, means, logvars = [], [], []
    with evaluating(model):
        for batch in images.split(batch_size):
            mean, logvar = model.forward_encoder(to_float(batch.to(model.device)))
            mean = mean.float().cpu()
            z = mean
            if logvar is not None:
                logvar = logvar.float().cpu()
                logvars.append(logvar)
                if sample:
                    z = mean + torch.randn(mean.shape, generator=generator) * (0.5 * logvar).exp()
            means.append(mean)
            zs.append(z)
    z = torch.cat(zs).numpy()
    if not logvars:
        return Codes(z, labels)
    return Codes(z, labels, logvar=torch.cat(logvars).numpy(), mean=torch.cat(means).numpy())


def orient(coords: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Flip each axis so that the centroid of the lowest label (digit 0) lies on the positive side of the mean.

    PCA and UMAP axes have arbitrary signs; one convention keeps pictures of different runs comparable.
    """
    anchor = labels == labels.min() if has_classes(labels) else np.arange(len(labels)) < 1  # else the first image
    offset = coords[anchor].mean(0) - coords.mean(0)
    return coords * np.where(offset < 0, -1.0, 1.0).astype(coords.dtype)


def pca_2d(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
    from sklearn.decomposition import PCA

    return orient(PCA(n_components=2, svd_solver="full").fit_transform(z), labels)


def umap_2d(z: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    """Seeded (hence single-threaded) UMAP on an exact k-NN graph from sklearn.

    The exact graph replaces pynndescent, whose JIT compilation alone took ~45 s per process;
    PCA initialisation is deterministic and several times faster than the spectral one on 10k points.
    """
    import umap
    from sklearn.neighbors import NearestNeighbors

    neighbours = min(UMAP_NEIGHBOURS, len(z) - 1)
    distances, indices = NearestNeighbors(n_neighbors=neighbours).fit(z).kneighbors(z)
    reducer = umap.UMAP(
        n_components=2, n_neighbors=neighbours, n_epochs=UMAP_EPOCHS, init="pca", random_state=seed, n_jobs=1,
        precomputed_knn=(indices, distances, None),
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*knn_search_index.*")  # we never call transform
        return orient(reducer.fit_transform(z).astype(np.float32), labels)


def sample_index(n: int, sample_size: int, seed: int) -> np.ndarray:
    """The points silhouette scores: all of them, or a seeded subset (the same one in every space)."""
    if n <= sample_size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:sample_size])


def silhouette(points: np.ndarray, labels: np.ndarray, sample_size: int = 5000, seed: int = 0) -> float:
    """Mean silhouette of the labels (1: compact, separate classes; 0: overlapping), on a seeded sample."""
    from sklearn.metrics import silhouette_score

    index = sample_index(len(labels), sample_size, seed)
    return float(silhouette_score(points[index], labels[index]))


def probe_scores(train: Codes, test: Codes) -> dict[str, float]:
    """How much digit identity the codes hold: k-NN and a logistic-regression probe, train -> test codes."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    knn = KNeighborsClassifier(n_neighbors=KNN_NEIGHBOURS).fit(train.z, train.labels)
    # Newton-CG converges in ~10 iterations where lbfgs took ~250 (and 10 s) on 54k 32-D codes, to the same accuracy.
    probe = make_pipeline(StandardScaler(), LogisticRegression(solver="newton-cg")).fit(train.z, train.labels)
    return {"knn_acc": float(knn.score(test.z, test.labels)), "probe_acc": float(probe.score(test.z, test.labels))}


def kl_scores(codes: Codes) -> dict[str, float]:
    """VAE: KL(q(z|x) || p(z)) per dimension averaged over the split, and how many dimensions are active."""
    kl = gaussian_kl_per_dim(torch.from_numpy(codes.mean), torch.from_numpy(codes.logvar)).mean(0)
    return {"active_units": float((kl > ACTIVE_UNIT_KL).sum()), **{f"kl_dim_{i}": float(v) for i, v in enumerate(kl)}}


def write_analysis(analysis: Analysis, folder: Path) -> list[Path]:
    """PNGs, the codes (.npz, with labels and projections) and scores.json into folder."""
    from matplotlib.figure import Figure

    folder.mkdir(parents=True, exist_ok=True)
    with timed(analysis.timings, "plots"):
        for name, coords in analysis.projections.items():
            figure = Figure(figsize=(5.5, 4.5), layout="constrained")
            scatter(figure.add_subplot(), coords, analysis.codes.labels, projection_title(analysis, name), name)
            figure.savefig(folder / f"{name}.png", dpi=100)
        for name, images in analysis.grids.items():
            image_grid(images, f"{analysis.kind.upper()} {GRID_TITLES[name]}").savefig(
                folder / f"{name}.png", dpi=100, bbox_inches="tight"
            )
    arrays = {"z": analysis.codes.z, "labels": analysis.codes.labels, "train_z": analysis.train.z,
              "train_labels": analysis.train.labels, **analysis.projections}  # fmt: skip
    if analysis.codes.logvar is not None:
        arrays.update(mean=analysis.codes.mean, logvar=analysis.codes.logvar)
    np.savez_compressed(folder / "codes.npz", **arrays)
    (folder / "scores.json").write_text(json.dumps({"split": analysis.split, **analysis.scores}, indent=1))
    if analysis.skipped:
        lines = [f"{score}: skipped, {reason}" for score, reason in analysis.skipped.items()]
        (folder / "skipped.txt").write_text("\n".join(lines) + "\n")
    return sorted(folder.iterdir())


# --- the analysis, and its record in MLflow ----------------------------------------------------


def analyze(model: LatentAutoencoder, datamodule: ImageDataModule, options: AnalysisOptions) -> Analysis:
    """Encode the split (and train, for the probes), project, score and draw. Deterministic given options.seed."""
    (images, labels), (train_images, train_labels) = check(model, datamodule, options)
    timings: dict[str, float] = {}
    with timed(timings, "encode"):
        codes = encode(model, images, labels, options.sample_posterior, options.seed)
        train = encode(model, train_images, train_labels, options.sample_posterior, options.seed + 1)
    with timed(timings, "pca"):
        projections = {"pca": pca_2d(codes.z, labels)}
    if options.umap:
        with timed(timings, "umap"):
            projections["umap"] = umap_2d(codes.z, labels, options.seed)
    scores: dict[str, float] = {}
    skipped: dict[str, str] = {}
    problem = label_problem(labels, options.split) or label_problem(train_labels, "train")
    if problem is None:
        with timed(timings, "silhouette"):
            scores["silhouette_latent"] = silhouette(codes.z, labels, options.sample_size, options.seed)
            for name, coords in projections.items():
                scores[f"silhouette_{name}"] = silhouette(coords, labels, options.sample_size, options.seed)
        with timed(timings, "probes"):
            scores.update(probe_scores(train, codes))
    else:
        names = ["silhouette_latent", *(f"silhouette_{name}" for name in projections), "knn_acc", "probe_acc"]
        skipped = dict.fromkeys(names, problem)
    if codes.logvar is not None:
        scores.update(kl_scores(codes))
    with timed(timings, "plots"):
        grids = picture_grids(model, images, labels, options.seed)
    return Analysis(model.kind, options.split, codes, train, projections, scores, grids, timings, skipped)


def log_analysis(client: Any, run_id: str, analysis: Analysis, step: int, artifact_path: str = ARTIFACT_DIR) -> None:
    """Scores as metrics at ``step`` and the files under ``artifact_path``; everything is written locally first."""
    from mlflow.entities import Metric

    with tempfile.TemporaryDirectory() as folder:
        write_analysis(analysis, Path(folder))
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(key, value, now, step) for key, value in analysis.scores.items()])
        if analysis.skipped:  # the reason, on the run's page and in latent/skipped.txt
            client.set_tag(run_id, "analysis.skipped", f"{', '.join(analysis.skipped)}: {next(iter(analysis.skipped.values()))}")
        client.log_artifacts(run_id, folder, artifact_path)


def analyze_into_run(
    client: Any, run_id: str, model: LatentAutoencoder, datamodule: ImageDataModule,
    options: AnalysisOptions, step: int, checkpoint: str | Path | None = None,
) -> Analysis:  # fmt: skip
    """Analyse the checkpoint's weights (or the model as it is) and log the analysis into the run."""
    if checkpoint:
        checkpoints.load_weights(model, checkpoint)
    latent = analyze(model, datamodule, options)
    log_analysis(client, run_id, latent, step)
    return latent


class PeriodicAnalysis(pl.Callback):
    """Analyse the current weights every N epochs into the run, under ``latent/epoch_NNN`` (rank 0 only)."""

    def __init__(self, options: AnalysisOptions) -> None:
        self.options = options

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if trainer.sanity_checking or not trainer.is_global_zero or (epoch + 1) % self.options.every_n_epochs:
            return
        latent = analyze(pl_module, trainer.datamodule, self.options)
        folder = f"{ARTIFACT_DIR}/epoch_{epoch:03d}"
        log_analysis(trainer.logger.experiment, trainer.logger.run_id, latent, epoch, folder)
