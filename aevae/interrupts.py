"""Ctrl-C (and SIGTERM, where it acts as Ctrl-C) during fit and test lands between batches, never inside a write to
the tracking store."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException


class HeldInterrupts(Callback):
    """Holds Ctrl-C until the next batch boundary and raises it there as KeyboardInterrupt; a second one at once.

    Raised wherever it lands, a Ctrl-C inside an MLflow write to a SQLite store (a metric logged at an epoch's end)
    could leave that write's connection closed under a live statement: it kept SQLite's lock, and closing the run
    KILLED then failed after SQLite's 20 s busy timeout, with MLflow's traceback on the console. Held, it waits for
    the next batch hook, which costs at most one batch.
    """

    def __init__(self) -> None:
        self.pending = False

    def hold(self, signum: int, frame: Any) -> None:
        if self.pending:  # asked twice: the user does not want to wait for the batch
            self.pending = False
            raise KeyboardInterrupt
        self.pending = True

    def raise_if_pending(self, *args: Any, **kwargs: Any) -> None:
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

    on_train_batch_end = on_validation_batch_end = on_test_batch_end = raise_if_pending  # one hook a batch suffices


@contextmanager
def held(callback: HeldInterrupts) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM, each where it raises KeyboardInterrupt (Python's default for SIGINT;
    `aevae train` and sweep workers give SIGTERM the same), are held by the callback; one that came after the last
    batch hook is raised when the block ends. A signal with another handler (ignored, Lightning's own stop for a
    plain SIGTERM), and signals outside the main thread, are left alone. Lightning adds its SIGTERM notice in fit,
    still calls the held handler after it, and may stop at its own next boundary first, with a SIGTERMException
    (a SystemExit with code 0): that ends as the held Ctrl-C would, a KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raising = [sig for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) is signal.default_int_handler]
    previous = {signum: signal.signal(signum, callback.hold) for signum in raising}
    try:
        yield
    except SIGTERMException as stop:
        if signal.SIGTERM not in previous:
            raise
        callback.pending = False
        raise KeyboardInterrupt from stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    callback.raise_if_pending()
