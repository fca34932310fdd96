"""One sweep trial: an `aevae train` run of the base experiment plus the trial's values, as an MLflow child run."""

from __future__ import annotations

import math
import os
import socket
from typing import Any, Callable

import optuna
from lightning.pytorch.callbacks import Callback
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna_integration import PyTorchLightningPruningCallback

from aevae import console, training
from aevae.errors import UsageError
from aevae.sweep import grid_map, placement
from aevae.sweep.config import Sweep, experiment_parser, known_metrics
from aevae.sweep.space import applies, cli_args
from aevae.sweep.study import RUN_ID_ATTR, end_trial_run, requeue

USAGE_ERROR_ATTR = "usage_error"  # the one line of a trial that failed on bad input


class TrialLink(Callback):
    """Ties a trial to its MLflow run as soon as training starts, keeps the last epoch's val/ metrics
    (trainer.test replaces the trainer's metrics), and fails the trial when training diverges."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.val_metrics: dict[str, float] = {}

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.trial.set_user_attr(RUN_ID_ATTR, trainer.logger.run_id)
        trainer.logger.experiment.set_tag(
            trainer.logger.run_id, "device", placement.device_name(trainer.strategy.root_device)
        )

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("val/")}
        if not math.isfinite(metrics.get(training.MONITOR, 0.0)):
            raise FloatingPointError(
                f"{training.MONITOR} is {metrics[training.MONITOR]} at epoch {trainer.current_epoch}: training diverged"
            )
        self.val_metrics = metrics


def _suggest(trial: optuna.Trial, key: str, distribution: BaseDistribution) -> Any:
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(key, distribution.choices)
    suggest = trial.suggest_int if isinstance(distribution, IntDistribution) else trial.suggest_float
    return suggest(key, distribution.low, distribution.high, step=distribution.step, log=distribution.log)


def sample(trial: optuna.Trial, sweep: Sweep) -> dict[str, Any]:
    """The trial's values, model.class first; a model key the sampled class lacks is not sampled."""
    params: dict[str, Any] = {}
    for key, distribution in sweep.space.items():
        if applies(sweep.model_args, key, params):
            params[key] = _suggest(trial, key, distribution)
    return params


def _score(metrics: dict[str, float], name: str) -> float:
    if name not in metrics:
        raise KeyError(f"objective {name} was not logged by the run (logged: {', '.join(sorted(metrics))})")
    if not math.isfinite(metrics[name]):
        raise FloatingPointError(f"objective {name} is {metrics[name]}")
    return metrics[name]


def objective(trial: optuna.Trial, sweep: Sweep, parent_run_id: str, started: Callable[[], None] = lambda: None) -> Any:
    """Train the trial's config as one MLflow child run; its state (COMPLETE, PRUNED, FAIL and why) tags the run."""
    started()
    params = sample(trial, sweep)
    names = ["--tracking.uri", sweep.tracking_uri, "--tracking.run_name", f"{sweep.study}-{trial.number}"]
    if console.level() != "verbose":  # the sweep's own progress line, not a bar and a summary per trial
        names += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    link = TrialLink(trial)
    callbacks: list[Callback] = [link]
    if len(sweep.objectives) == 1 and sweep.objectives[0].metric.startswith("val/"):
        callbacks.append(PyTorchLightningPruningCallback(trial, monitor=sweep.objectives[0].metric))
    tags = {
        "optuna.study": sweep.study,
        "optuna.trial": str(trial.number),
        "optuna.worker": f"{socket.gethostname()}:{os.getpid()}",
        "worker.gpu": os.environ.get(placement.WORKER_GPU_ENV, "none"),
    }
    run_id = None
    try:
        config = training.parse_config([*sweep.base_args, *cli_args(params), *names], experiment_parser())
        result = training.run_training(config, parent_run_id, callbacks, tags)
        run_id = result.run_id
        logged = {**link.val_metrics, **result.metrics}
        values = [_score(logged, o.metric) for o in sweep.objectives]
    except optuna.TrialPruned:
        end_trial_run(sweep.tracking_uri, trial.user_attrs.get(RUN_ID_ATTR), "PRUNED", status="KILLED")
        raise
    except (KeyboardInterrupt, SystemExit) as err:  # Ctrl-C or SIGTERM; inside fit Lightning makes it exit(1)
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        requeue(trial.study, frozen, sweep.tracking_uri, "interrupted; queued again")
        raise KeyboardInterrupt from err  # Optuna closes the trial FAIL (it would leave it RUNNING on exit())
    except UsageError as err:  # bad input fails every trial alike: the worker stops the sweep (workers.py)
        trial.set_user_attr(USAGE_ERROR_ATTR, str(err)[:1000])
        trial.set_user_attr("fail_reason", f"UsageError: {err}"[:1000])
        end_trial_run(sweep.tracking_uri, run_id or trial.user_attrs.get(RUN_ID_ATTR), "FAIL", f"UsageError: {err}")
        raise
    except Exception as err:
        reason = f"{type(err).__name__}: {err}"
        trial.set_user_attr("fail_reason", reason[:1000])
        end_trial_run(sweep.tracking_uri, run_id or trial.user_attrs.get(RUN_ID_ATTR), "FAIL", reason)
        raise
    trial.set_user_attr(grid_map.SCORES_ATTR, {name: logged[name] for name in known_metrics() if name in logged})
    end_trial_run(sweep.tracking_uri, run_id, "COMPLETE")
    return values[0] if len(values) == 1 else values
