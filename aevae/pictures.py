"""Pictures of a trained model and its codes: image grids (grey or colour), the projection scatter and its legend."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from aevae.batches import to_float
from aevae.models import LatentAutoencoder

AXIS_NAMES = {"pca": "PC", "umap": "UMAP"}
TRAVERSAL_MAX_DIM = 4
TRAVERSAL_RANGE = 3.0  # prior standard deviations either side of 0


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no gradients, restoring the caller's mode (the analysis may run mid-fit)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def has_classes(labels: np.ndarray) -> bool:
    """Labels the label scores can use: every image labelled, two classes or more."""
    return bool(len(labels) and (labels >= 0).all() and len(np.unique(labels)) >= 2)


def picture_grids(model: LatentAutoencoder, images: torch.Tensor, labels: np.ndarray, seed: int) -> dict[str, Any]:
    """Reconstructions of the first image of each class (unlabelled: the first ten); for the VAE prior samples
    and a latent traversal. Every grid is [rows, cols, C, H, W]."""
    if has_classes(labels):
        first = [int(np.flatnonzero(labels == digit)[0]) for digit in np.unique(labels)]
    else:
        first = list(range(min(10, len(labels))))
    with evaluating(model):
        x = to_float(images[first].to(model.device))
        grids = {"reconstructions": torch.stack([x, model.reconstruct(x)])}
        if model.kind == "vae":
            z = torch.randn(64, model.latent_dim, generator=torch.Generator().manual_seed(seed))
            grids["prior_samples"] = model.decode_mean(z.to(model.device)).view(8, 8, *x.shape[1:])
            if model.latent_dim <= TRAVERSAL_MAX_DIM:
                values = torch.linspace(-TRAVERSAL_RANGE, TRAVERSAL_RANGE, 9)
                z = torch.zeros(model.latent_dim, len(values), model.latent_dim)
                for dim in range(model.latent_dim):
                    z[dim, :, dim] = values
                decoded = model.decode_mean(z.flatten(0, 1).to(model.device))
                grids["traversal"] = decoded.view(model.latent_dim, len(values), *x.shape[1:])
    return {name: grid.float().cpu().numpy() for name, grid in grids.items()}


def scatter(ax: Any, coords: np.ndarray, labels: np.ndarray, title: str, projection: str, legend: bool = True) -> None:
    """The one scatter style: tab10 colour per class (grey without labels), points in a fixed shuffled order,
    equal axes."""
    order = np.random.default_rng(0).permutation(len(labels))
    colours = [f"C{label % 10}" if label >= 0 else "0.4" for label in labels[order]]
    ax.scatter(coords[order, 0], coords[order, 1], c=colours, s=3, alpha=0.6, linewidths=0, rasterized=True)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(f"{AXIS_NAMES[projection]}1")
    ax.set_ylabel(f"{AXIS_NAMES[projection]}2")
    ax.set_aspect("equal", adjustable="datalim")
    if legend and has_classes(labels):
        ax.legend(handles=digit_handles(np.unique(labels)), fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))


def digit_handles(digits: Sequence[int]) -> list[Any]:
    from matplotlib.lines import Line2D

    return [Line2D([], [], marker="o", linestyle="", color=f"C{d % 10}", label=str(d)) for d in digits if d >= 0]


def projection_title(analysis: Any, projection: str) -> str:
    title = f"{analysis.kind.upper()} {projection.upper()} of {analysis.split} codes"
    score = analysis.scores.get(f"silhouette_{projection}")
    return title if score is None else f"{title}, silhouette {score:.3f}"


def image_grid(images: np.ndarray, title: str) -> Any:
    """rows x cols of images [C, H, W] in [0, 1] as one figure: grey for one channel, colour for three."""
    from matplotlib.figure import Figure

    rows, cols, channels, height, width = images.shape
    tiled = images.transpose(0, 3, 1, 4, 2).reshape(rows * height, cols * width, channels)
    figure = Figure(figsize=(0.6 * cols * max(1.0, width / 28), 0.6 * rows * max(1.0, height / 28) + 0.4))
    ax = figure.add_subplot()
    if channels == 1:
        ax.imshow(tiled[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(tiled[..., :3].clip(0.0, 1.0), interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    return figure


GRID_TITLES = {
    "reconstructions": "inputs (top) and reconstructions",
    "prior_samples": "samples from the prior N(0, I)",
    "traversal": f"traversal: one latent dimension per row, -{TRAVERSAL_RANGE:g} to +{TRAVERSAL_RANGE:g}",
}
