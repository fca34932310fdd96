"""What a command shows on the console: progress and results for the user; library chatter only with --verbose."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

LEVEL_ENV = "AEVAE_CONSOLE"  # quiet | normal | verbose; spawned sweep workers inherit it with the environment
LEVELS = ("quiet", "normal", "verbose")
# Library loggers whose INFO lines (Lightning's GPU/TPU banner and tips, MLflow's and Optuna's progress) are chatter.
CHATTY_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning", "mlflow", "optuna", "alembic", "urllib3")
# Library loggers whose WARNING lines are not the user's to act on either.
CHATTY_WARNING_LOGGERS = ("lightning.pytorch.loggers.mlflow",)  # "Experiment with name X not found. Creating it."
# Library warnings that are not the user's to act on: the library's own internals or aevae's deliberate choices.
CHATTER_WARNINGS = (
    r".*`transfer_batch_to_device`.*",  # aevae's data module moves its batches itself (in-memory images)
    r".*log_every_n_steps.*",  # fewer batches than the logging interval: aevae logs per epoch
    r".*does not have many workers.*",  # in-memory data: loader workers would only copy it
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*Restoring states from the checkpoint.*",
    r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*",
)


def level() -> str:
    value = os.environ.get(LEVEL_ENV, "normal")
    return value if value in LEVELS else "normal"


def configure(verbose: bool = False, quiet: bool = False) -> None:
    """Set the console level for this process and the worker processes it starts."""
    os.environ[LEVEL_ENV] = "verbose" if verbose else "quiet" if quiet else "normal"


def quiet_libraries() -> None:
    """Below --verbose: the libraries log warnings only, and Optuna's trial lines go (aevae shows its own progress).
    Lightning sets its logger to INFO when imported, so this runs after the import."""
    if level() == "verbose":
        return
    importlib.import_module("lightning.pytorch")  # its import sets its loggers to INFO; ours come after
    import optuna

    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in CHATTY_WARNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # its "trial failed" traceback: aevae says it in one line
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@contextmanager
def command_warnings(lightning: bool = True) -> Iterator[None]:
    """Warnings while a command runs: library chatter hidden (unless --verbose), any other warning shown once.
    lightning=False for commands that never import it (its import alone takes seconds)."""
    with warnings.catch_warnings():
        if level() != "verbose":
            warnings.simplefilter("once")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=ImportWarning)  # umap: "Tensorflow not installed"
            warnings.filterwarnings("ignore", category=PendingDeprecationWarning)
            for pattern in CHATTER_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            if lightning:
                _hide_possible_user_warnings()
        yield


def _hide_possible_user_warnings() -> None:
    """Lightning's PossibleUserWarning is advice on settings aevae chose (num_workers, logging interval)."""
    from lightning.fabric.utilities.warnings import PossibleUserWarning

    warnings.filterwarnings("ignore", category=PossibleUserWarning)


def show_progress() -> bool:
    return level() == "normal"


def say(text: str) -> None:
    """A line for the user on stdout (results); nothing else is printed with --quiet but the result itself."""
    print(text, flush=True)


def summary(text: str) -> None:
    """A line of the closing summary on stdout (figure, run, how to open it), hidden by --quiet."""
    if level() != "quiet":
        print(text, flush=True)


def note(text: str, bar: Any = None) -> None:
    """A progress or summary line on stderr, hidden by --quiet; above the progress bar while one shows."""
    if level() == "quiet":
        return
    if bar is not None and not bar.disable:
        bar.write(text, file=sys.stderr)
    else:
        print(text, file=sys.stderr, flush=True)


def bar(total: int, unit: str, description: str) -> Any:
    """A tqdm bar on stderr (hidden by --quiet and --verbose, where Lightning's own output shows)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, desc=description, disable=not show_progress(), file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)  # fmt: skip


def minutes(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Clock:
    """Elapsed time and a linear estimate of the time left."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def left(self, done: float, total: float) -> str:
        if done <= 0:
            return "?"
        elapsed = time.monotonic() - self.start
        return minutes(elapsed * (total - done) / done)
