"""The map of a grid sweep over two settings (latent_dim x kl_weight): one heat map per score, and the
Pareto front of reconstruction against cluster quality. Read from the study's finished trials, whose
scores the sweep keeps in each trial's user attributes (see `sweep.trials.objective`)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from optuna.trial import FrozenTrial, TrialState

SCORES_ATTR = "scores"
# (score, lower is better): drawn when the trials logged it
MAP_SCORES = (("val/nelbo", True), ("val/recon", True), ("silhouette_latent", False), ("silhouette_pca", False))
PARETO = ("val/recon", "silhouette_latent")  # minimize the first, maximize the second


def finished(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    return [t for t in trials if t.state == TrialState.COMPLETE and SCORES_ATTR in t.user_attrs]


def grid_values(trials: Sequence[FrozenTrial], params: tuple[str, str], score: str) -> tuple[list, list, np.ndarray]:
    """The score on the grid of the two params (x, y): rows are y values, NaN where no trial finished."""
    x_key, y_key = params
    xs = sorted({t.params[x_key] for t in trials})
    ys = sorted({t.params[y_key] for t in trials})
    grid = np.full((len(ys), len(xs)), np.nan)
    for t in trials:
        if score in t.user_attrs[SCORES_ATTR]:
            grid[ys.index(t.params[y_key]), xs.index(t.params[x_key])] = t.user_attrs[SCORES_ATTR][score]
    return xs, ys, grid


def pareto_front(points: np.ndarray) -> np.ndarray:
    """Indices of the points (minimize column 0, maximize column 1) that no other point dominates."""
    keep = []
    for i, (cost, gain) in enumerate(points):
        dominated = (points[:, 0] <= cost) & (points[:, 1] >= gain) & ((points[:, 0] < cost) | (points[:, 1] > gain))
        if not dominated.any():
            keep.append(i)
    return np.asarray(sorted(keep, key=lambda i: points[i, 0]), dtype=int)


def map_figure(trials: Sequence[FrozenTrial], params: tuple[str, str]) -> Any:
    """Heat maps of every score the finished trials logged, then the Pareto front; None if nothing finished."""
    from matplotlib import style
    from matplotlib.figure import Figure

    done = finished(trials)
    scores = [(name, low) for name, low in MAP_SCORES if any(name in t.user_attrs[SCORES_ATTR] for t in done)]
    if not done or not scores:
        return None
    columns = 3 if len(scores) > 2 else len(scores) + 1
    rows = -(-(len(scores) + 1) // columns)
    with style.context("default"):  # Optuna's plots switch pyplot's style to ggplot
        figure = Figure(figsize=(5.2 * columns, 4.4 * rows), layout="constrained")
        axes = figure.subplots(rows, columns, squeeze=False).ravel()
        for ax, (name, lower_is_better) in zip(axes, scores):
            draw_heat_map(ax, done, params, name, lower_is_better)
        draw_pareto(axes[len(scores)], done, params)
        for ax in axes[len(scores) + 1 :]:
            ax.set_axis_off()
    return figure


def draw_heat_map(ax: Any, trials: Sequence[FrozenTrial], params: tuple[str, str], name: str, lower: bool) -> None:
    """One score over the grid, each cell labelled; the colours stop at the 90th percentile of the bad side,
    so one diverging corner does not wash out the rest."""
    xs, ys, grid = grid_values(trials, params, name)
    finite = grid[np.isfinite(grid)]
    bounds = {"vmax": np.percentile(finite, 90)} if lower else {"vmin": np.percentile(finite, 10)}
    image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis_r" if lower else "viridis", **bounds)
    for (row, col), value in np.ndenumerate(grid):
        if np.isfinite(value):
            ax.text(col, row, f"{value:.3g}", ha="center", va="center", fontsize=8, color="w")
    ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
    ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
    ax.set(xlabel=params[0], ylabel=params[1], title=f"{name} ({'lower' if lower else 'higher'} is better)")
    ax.figure.colorbar(image, ax=ax, shrink=0.85, extend="max" if lower else "min")


def draw_pareto(ax: Any, trials: Sequence[FrozenTrial], params: tuple[str, str]) -> None:
    cost, gain = PARETO
    with_both = [t for t in trials if cost in t.user_attrs[SCORES_ATTR] and gain in t.user_attrs[SCORES_ATTR]]
    if not with_both:
        ax.set_axis_off()
        return
    points = np.array([[t.user_attrs[SCORES_ATTR][cost], t.user_attrs[SCORES_ATTR][gain]] for t in with_both])
    colour = np.log10([t.params[params[1]] for t in with_both])
    dots = ax.scatter(points[:, 0], points[:, 1], c=colour, cmap="plasma", s=24)
    front = pareto_front(points)
    ax.plot(points[front, 0], points[front, 1], "k-", lw=1, label="Pareto front")
    for i in front:
        t = with_both[i]
        ax.annotate(f"z={t.params[params[0]]:g}, β={t.params[params[1]]:g}", points[i], fontsize=7,
                    xytext=(4, 2), textcoords="offset points")  # fmt: skip
    ax.figure.colorbar(dots, ax=ax, shrink=0.8, label=f"log10 {params[1]}")
    ax.set(xlabel=f"{cost} (lower is better)", ylabel=f"{gain} (higher is better)", title="reconstruction vs clusters")
    ax.legend(loc="lower right", fontsize=7)
