"""Riding out a database outage: Optuna storage calls that wait and retry, up to a deadline, while it is away."""

from __future__ import annotations

import functools
import sys
import threading
import time
from typing import Any, Callable

import sqlalchemy
from optuna.exceptions import StorageInternalError
from optuna.storages import RDBStorage

from aevae import tracking

DEFAULT_OUTAGE_WAIT_S = 120  # how long workers wait for a store that went away before their trial fails
_FIRST_DELAY_S, _MAX_DELAY_S = 0.5, 5.0
# What Optuna's _CachedStorage calls on its backend besides the public API (each one round trip of its own).
_PRIVATE_RETRIED = {"_get_trials", "_get_stale_trial_ids", "_create_new_trial", "_set_trial_param", "_get_best_trial_id"}
# Storage API that is not a database round trip (or is Optuna's schema tooling): called as is.
_NOT_RETRIED = {"get_heartbeat_interval", "get_heartbeat_stale_trial_callback", "get_failed_trial_callback",
                "remove_session", "upgrade", "get_current_version", "get_head_version", "get_all_versions"}  # fmt: skip


def transient(error: BaseException) -> bool:
    """A lost or refused database connection (the server stopped, restarting, unreachable), not a bad query."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            return True
        if isinstance(seen, sqlalchemy.exc.DBAPIError) and seen.connection_invalidated:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class PatientStorage(RDBStorage):
    """Optuna's RDBStorage whose every call waits out a database outage of up to ``outage_wait`` seconds.

    Optuna has no retry of its own for a lost database (RetryFailedTrialCallback and heartbeats re-run trials of
    dead workers; they do not keep a live worker's calls alive), and SQLAlchemy's pool_pre_ping only replaces
    connections that died while idle. Stale-trial checks pause for a grace period after an outage: no trial's
    heartbeat could be recorded while the database was away, and its worker needs one interval to beat again.
    """

    outage_wait: float = DEFAULT_OUTAGE_WAIT_S
    _recovered_at: float = -float("inf")
    _local = threading.local()

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        pause = (self.grace_period or 0) + (self.heartbeat_interval or 0)
        if time.monotonic() - PatientStorage._recovered_at < pause:
            return []
        return super()._get_stale_trial_ids(study_id)


def _patient(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(self: PatientStorage, *args: Any, **kwargs: Any) -> Any:
        if getattr(PatientStorage._local, "inside", False):  # the outer call retries the whole
            return method(self, *args, **kwargs)
        PatientStorage._local.inside = True
        try:
            return _retry(lambda: method(self, *args, **kwargs), self.outage_wait, self.url)
        finally:
            PatientStorage._local.inside = False

    return call


def _retry(call: Callable[[], Any], wait_s: float, url: str) -> Any:
    deadline, delay, warned = time.monotonic() + wait_s, _FIRST_DELAY_S, False
    while True:
        try:
            result = call()
        except (StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as err:
            if not transient(err) or time.monotonic() + delay > deadline:
                raise
            if not warned:
                warned = True
                print(f"aevae: study storage {tracking.mask_secrets(url)} unreachable, retrying for up to {wait_s:.0f} s",
                      file=sys.stderr, flush=True)  # fmt: skip
            time.sleep(delay)
            delay = min(2 * delay, _MAX_DELAY_S)
            continue
        if warned:
            PatientStorage._recovered_at = time.monotonic()
        return result


for _name, _method in list(vars(RDBStorage).items()):
    if callable(_method) and _name not in _NOT_RETRIED and (not _name.startswith("_") or _name in _PRIVATE_RETRIED):
        setattr(PatientStorage, _name, _patient(getattr(PatientStorage, _name)))
