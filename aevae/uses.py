"""What `aevae compare` adds to each run when configured: OOD detection and sample quality, and their table rows."""

from __future__ import annotations

from typing import Any, Iterable

from aevae.errors import UsageError

TABLE_METRICS = ("auroc", "fd", "precision", "recall")
SAMPLE_DEFAULTS = {"n": 10000, "components": 10}


def ood_options(ood: dict[str, Any], seed: int = 0) -> Any:
    from aevae.ood import OodOptions

    try:
        options = OodOptions(**{"seed": seed, **ood})
    except TypeError as err:
        raise UsageError(f"compare.ood: {err}; give the options of `aevae ood`, e.g. {{against: mnist, k: 100}}") from err
    options.check()
    return options


def sample_options(samples: dict[str, Any]) -> dict[str, Any]:
    from aevae.samples import check_options

    unknown = set(samples) - set(SAMPLE_DEFAULTS)
    if unknown:
        raise UsageError(f"compare.samples: unknown option {sorted(unknown)[0]!r}; choose from n, components")
    options = {**SAMPLE_DEFAULTS, **samples}
    check_options(options["n"], options["components"], 0)
    return options


def check(ood: dict[str, Any] | None, samples: dict[str, Any] | None, data: Any) -> None:
    """Before any run: the options are valid and the data set to detect against exists and has its files."""
    from aevae.ood import other_data

    if samples is not None:
        sample_options(samples)
    if ood is None:
        return
    try:
        other_data(data, ood_options(ood).against).setup()
    except UsageError as err:
        raise UsageError(f"compare.ood: {err}") from err


def evaluate(client: Any, uri: str, run_id: str, model: Any, data: Any, ood: dict[str, Any] | None,
             samples: dict[str, Any] | None, seed: int = 0) -> dict[str, float]:  # fmt: skip
    """Score a freshly trained run (best weights loaded) and log into it; the metrics it logged."""
    metrics: dict[str, float] = {}
    if ood is not None:
        from aevae.ood import detect, log_result, other_data

        options = ood_options(ood, seed)
        result = detect(model, data, other_data(data, options.against), options)
        log_result(client, run_id, result, data.source)
        metrics.update(result.flat())
    if samples is not None:
        from aevae.samples import evaluate_into_run

        metrics.update(evaluate_into_run(client, uri, run_id, model, data, **sample_options(samples), seed=seed).scores)
    return metrics


def table_scores(runs: Iterable[dict[str, float]]) -> list[str]:
    """The OOD and sample-quality metrics any run has, in a stable order, for the compare table."""
    names = {key for metrics in runs for key in metrics if key.startswith(("ood/", "samples/"))}
    return sorted(name for name in names if name.rsplit("/", 1)[-1] in TABLE_METRICS)
