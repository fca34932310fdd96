"""Ctrl-C during fit and test lands between batches, never inside a write to the tracking store."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from lightning.pytorch.callbacks import Callback


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
    """Within the block, SIGINT (where it raises KeyboardInterrupt, Python's default) is held by the callback; one
    that came after the last batch hook is raised when the block ends. An ignored SIGINT, and SIGINT outside the
    main thread, are left alone. SIGTERM is too: Lightning handles it in fit (its own stop, exit 0) unless it
    raises at once, which is what `aevae train` and sweep workers make it do."""
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    previous = signal.signal(signal.SIGINT, callback.hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    callback.raise_if_pending()
