"""A sweep's result: Optuna's plots and the grid map, the parent run's summary, and what `aevae best` prints."""

from __future__ import annotations

import json
import tempfile
import warnings
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from aevae import training
from aevae.sweep import grid_map
from aevae.sweep.config import Sweep
from aevae.sweep.study import PARENT_ATTR, RUN_ID_ATTR

CONTOUR_PARAMS = ["model.latent_dim", "model.kl_weight"]


def _plots(study: optuna.Study, sweep: Sweep, folder: Path) -> None:
    """Optuna's own plots (matplotlib): history, importances and latent_dim x kl_weight per objective, Pareto front."""
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    names = [o.metric for o in sweep.objectives]
    multi = len(names) > 1
    completed = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if not completed:
        return  # nothing to plot (Optuna would warn about each empty plot)
    figures: dict[str, Callable[[], Any]] = {}
    for i, name in enumerate(names):
        target = {"target": (lambda t, i=i: t.values[i]) if multi else None, "target_name": name}
        slug = name.replace("/", "_")
        figures[f"history_{slug}.png"] = partial(plots.plot_optimization_history, study, **target)
        if completed >= 2:  # importances compare finished trials
            figures[f"importances_{slug}.png"] = partial(plots.plot_param_importances, study, **target)
        if all(key in sweep.space for key in CONTOUR_PARAMS):
            figures[f"contour_{slug}.png"] = partial(plots.plot_contour, study, params=CONTOUR_PARAMS, **target)
        else:
            figures[f"slice_{slug}.png"] = partial(plots.plot_slice, study, **target)
    if multi:
        figures["pareto_front.png"] = partial(plots.plot_pareto_front, study, target_names=names)
    for filename, plot in figures.items():
        try:
            plot()
            plt.gcf().savefig(folder / filename, bbox_inches="tight")
        except Exception as err:  # e.g. a contour of trials that all share one value
            warnings.warn(f"sweep: plot {filename} skipped ({training.one_line(err)})")
        finally:
            plt.close("all")
    if sweep.sampler["name"] == "grid" and len(sweep.space) == 2:
        figure = grid_map.map_figure(study.get_trials(deepcopy=False), (*sweep.space,))
        if figure is not None:
            figure.savefig(folder / "map.png", dpi=110)


def summarize(study: optuna.Study, sweep: Sweep, client: Any, parent_run_id: str) -> None:
    """The parent run gets the best trial's params and scores (or the Pareto set), the trials table and plots."""
    trials, names = study.get_trials(deepcopy=False), [o.metric for o in sweep.objectives]
    for state, count in Counter(t.state.name.lower() for t in trials).items():
        client.log_metric(parent_run_id, f"trials_{state}", count)
    best = study.best_trials
    if len(sweep.objectives) == 1 and best:
        trial = study.best_trial
        client.set_tag(parent_run_id, "best.trial", str(trial.number))
        client.set_tag(parent_run_id, "best.mlflow_run_id", str(trial.user_attrs.get(RUN_ID_ATTR)))
        for key, value in trial.params.items():
            client.set_tag(parent_run_id, f"best.{key}", str(value))
        client.log_metric(parent_run_id, f"best/{sweep.objectives[0].metric}", trial.value)
    client.set_tag(parent_run_id, "best.trials", ",".join(str(t.number) for t in best))
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        records = [
            {
                "trial": t.number,
                "values": dict(zip(names, t.values)),
                "params": t.params,
                "mlflow_run_id": t.user_attrs.get(RUN_ID_ATTR),
            }
            for t in best
        ]
        (out / ("best_trial.json" if len(sweep.objectives) == 1 else "pareto_front.json")).write_text(
            json.dumps(records, indent=2)
        )
        study.trials_dataframe().to_csv(out / "trials.csv", index=False)
        _plots(study, sweep, out)
        client.log_artifacts(parent_run_id, folder, "optuna")


def describe(study: optuna.Study) -> str:
    """What `aevae best` prints: trial counts, then the best trial (or the Pareto front) with its MLflow run."""
    trials = study.get_trials(deepcopy=False)
    names = study.metric_names or [f"objective_{i}" for i in range(len(study.directions))]
    counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(Counter(t.state.name for t in trials).items()))
    goals = ", ".join(f"{name} ({d.name.lower()})" for name, d in zip(names, study.directions))
    lines = [f"study {study.study_name}: {len(trials)} trials ({counts or 'none'}); objectives: {goals}"]
    lines.append(f"MLflow parent run: {study.user_attrs.get(PARENT_ATTR)}")
    best = study.best_trials
    lines.append("best trial:" if len(names) == 1 else f"Pareto front ({len(best)} trials):")
    for t in sorted(best, key=lambda t: t.number):
        scores = " ".join(f"{name}={value:.6g}" for name, value in zip(names, t.values))
        params = " ".join(
            f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}" for key, value in t.params.items()
        )
        lines.append(f"  trial {t.number}: {scores} | {params} | MLflow run {t.user_attrs.get(RUN_ID_ATTR)}")
    if not best:
        lines.append("  none completed yet")
    return "\n".join(lines)
