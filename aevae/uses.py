"""What `aevae compare` adds to each run when configured: OOD detection and sample quality, and their table rows."""

from __future__ import annotations

from typing import Any, Iterable

from aevae.errors import UsageError

TABLE_METRICS = ("auroc", "fd", "precision", "recall")


def check(ood_against: str | None, data: Any) -> None:
    """Before any run: the source to detect against exists, differs from the training data, and has its files."""
    from aevae.ood import AGAINST, other_data

    if ood_against is None:
        return
    if ood_against not in AGAINST:
        raise UsageError(f"compare.ood_against: unknown source {ood_against!r}; choose one of {', '.join(AGAINST)}")
    try:
        other_data(data, ood_against).setup()
    except UsageError as err:
        raise UsageError(f"compare.ood_against: {err}") from err


def evaluate(client: Any, uri: str, run_id: str, model: Any, data: Any, ood_against: str | None,
             sample_quality: bool, seed: int = 0) -> dict[str, float]:  # fmt: skip
    """Score a freshly trained run (best weights loaded) and log into it; the metrics it logged."""
    metrics: dict[str, float] = {}
    if ood_against is not None:
        from aevae.ood import OodOptions, detect, log_result, other_data

        other = other_data(data, ood_against)
        result = detect(model, data, other, OodOptions(against=ood_against, seed=seed))
        log_result(client, run_id, result, data.source)
        metrics.update(result.flat())
    if sample_quality:
        from aevae.samples import evaluate_into_run

        metrics.update(evaluate_into_run(client, uri, run_id, model, data, seed=seed).scores)
    return metrics


def table_scores(runs: Iterable[dict[str, float]]) -> list[str]:
    """The OOD and sample-quality metrics any run has, in a stable order, for the compare table."""
    names = {key for metrics in runs for key in metrics if key.startswith(("ood/", "samples/"))}
    return sorted(name for name in names if name.rsplit("/", 1)[-1] in TABLE_METRICS)
