"""The search space of a sweep: distributions read from the config, Optuna's sampler and pruner."""

from __future__ import annotations

import json
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from aevae.errors import UsageError

SAMPLERS = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler, "grid": optuna.samplers.GridSampler}
PRUNERS = {
    "median": optuna.pruners.MedianPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "none": optuna.pruners.NopPruner,
}


def config_key(key: str) -> str:
    """Sweep (and MLflow param) names -> experiment config keys: model.class -> model.class_path,
    model.latent_dim -> model.init_args.latent_dim; other keys are the same."""
    head, _, rest = key.partition(".")
    if head != "model":
        return key
    return "model.class_path" if rest == "class" else f"model.init_args.{rest}"


def cli_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def cli_args(values: dict[str, Any]) -> list[str]:
    return [arg for key, value in values.items() for arg in (f"--{config_key(key)}", cli_value(value))]


def named(spec: Any, where: str, choices: dict[str, Any]) -> dict[str, Any]:
    """`tpe` or {name: tpe, seed: 0, ...} -> {name: tpe, ...}, name checked."""
    spec = {"name": spec} if isinstance(spec, str) else dict(spec or {"name": "none"})
    if spec.get("name") not in choices:
        raise UsageError(f"{where}.name: unknown {spec.get('name')!r}; choose one of {', '.join(choices)}")
    return spec


def build_sampler(spec: dict[str, Any], space: dict[str, BaseDistribution], offset: int = 0) -> optuna.samplers.BaseSampler:
    """Seeded per trial (seed + trials so far): resumed and parallel studies never repeat a draw.
    `grid` visits every combination of the space's choice lists once: trial n takes cell n of one seeded
    shuffle of the grid, so its seed must not change between trials."""
    kwargs = {key: value for key, value in spec.items() if key not in ("name", "seed")}
    if spec["name"] == "grid":
        ranges = [key for key, d in space.items() if not isinstance(d, CategoricalDistribution)]
        if ranges:
            raise ValueError(f"grid needs a list of choices for every key; space.{ranges[0]} is a range")
        kwargs["search_space"] = {key: list(d.choices) for key, d in space.items()}
        offset = 0
    return SAMPLERS[spec["name"]](seed=spec.get("seed", 0) + offset, **kwargs)


def build_pruner(spec: dict[str, Any]) -> optuna.pruners.BasePruner:
    return PRUNERS[spec["name"]](**{key: value for key, value in spec.items() if key != "name"})


def distribution(key: str, spec: Any, base_value: Any) -> BaseDistribution:
    """{low, high[, log, step]} -> int or float range (float if a bound or the config value is); a list -> choices."""
    where = f"space.{key}"
    spec = {"choices": spec} if isinstance(spec, list) else spec
    if not isinstance(spec, dict) or not spec or set(spec) - {"low", "high", "log", "step", "choices"}:
        raise UsageError(f"{where}: expected {{low, high, log, step}} or a list of choices, got {spec!r}")
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise UsageError(f"{where}: empty list of choices")
        # Optuna stores scalars; a list choice (hidden_dims) travels as its CLI text, e.g. "[64, 32]".
        return CategoricalDistribution(
            [c if isinstance(c, (str, int, float, bool)) else json.dumps(c) for c in choices]
        )
    low, high, log, step = spec.get("low"), spec.get("high"), bool(spec.get("log", False)), spec.get("step")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        raise UsageError(f"{where}: low and high must be numbers, got low={low!r} high={high!r}")
    if low > high:
        raise UsageError(f"{where}: low ({low}) > high ({high})")
    if low == high:
        raise UsageError(f"{where}: empty range (low == high == {low}); set a fixed value in overrides instead")
    if log and low <= 0:
        raise UsageError(f"{where}: a log scale needs low > 0, got {low}")
    try:
        if any(isinstance(v, float) for v in (low, high, base_value)):
            return FloatDistribution(low, high, log=log, step=step)
        return IntDistribution(low, high, log=log, step=step or 1)
    except ValueError as err:
        raise UsageError(f"{where}: {err}") from err


def corners(distribution: BaseDistribution) -> list[Any]:
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    return [distribution.low, distribution.high]


def applies(model_args: dict[str, frozenset[str]], key: str, params: dict[str, Any]) -> bool:
    """With model.class searched, a model key (model.kl_weight) is sampled only for classes that take it."""
    model_class = params.get("model.class")
    return model_class is None or not key.startswith("model.") or key.partition(".")[2] in model_args[model_class]
