"""The MLflow record: where it lives, how runs are named, flattened, tagged and closed."""

from __future__ import annotations

import fcntl
import os
import re
import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit
from urllib.request import url2pathname

from aevae import empty_store
from aevae.errors import UsageError, causes

DEFAULT_STORE = Path("mlruns")
DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
LOCK_NAME = ".aevae.lock"  # in the store; .dvcignore keeps it out of snapshots
TABLES_LOCK_NAME = ".aevae.tables.lock"  # likewise
# Every column where MLflow records an absolute artifact location.
LOCATION_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"), ("logged_models", "artifact_location"))
_HELD_LOCKS: dict[Path, int] = {}
SUPPORTED_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


def default_tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI`, else a SQLite database inside ./mlruns (the folder DVC versions)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(DEFAULT_STORE / DB_NAME).resolve()}"


def mask_secrets(text: str) -> str:
    """Hide passwords in URLs (``scheme://user:secret@host`` -> ``scheme://user:***@host``)."""
    return re.sub(r"(\w[\w+.-]*://[^:/@\s]+:)[^@\s]+@", r"\1***@", text)


def sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URL (MLflow store or Optuna storage), else None."""
    return Path(url[len("sqlite:///") :]) if url.startswith("sqlite:///") else None


def local_store_dir(tracking_uri: str) -> Path | None:
    """The folder of a local SQLite store (holds the database and the artifacts), else None."""
    database = sqlite_file(tracking_uri)
    return database.parent if database is not None else None


def require_existing(url: str, field: str) -> str:
    """A command that only reads a record (a run, a study) must not create an empty SQLite file by opening it."""
    database = sqlite_file(url)
    if database is not None and not database.is_file():
        raise UsageError(f"{field}: no store at {database}; nothing has been recorded there yet")
    return url


RUN_FILES = ("config.yaml", "checkpoints/best.ckpt")  # what a finished `aevae train` run can be rebuilt from


def fetch_run_files(
    client: Any, run_id: str, field: str, folder: str, checkpoint: bool = True
) -> tuple[Any, Path, Path | None]:
    """The run, its config.yaml and best checkpoint (downloaded to folder; None unless ``checkpoint``); a missing
    run or file is a UsageError naming the field."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise UsageError(f"{field}: no run {run_id!r} in the tracking store") from err
    needed = RUN_FILES if checkpoint else RUN_FILES[:1]
    logged = {item.path for path in ("", "checkpoints") for item in client.list_artifacts(run_id, path)}
    if not set(needed) <= logged:
        hint = " (trained with tracking.log_checkpoints: none?)" if RUN_FILES[0] in logged else "; was it trained by aevae?"
        missing = " or ".join(name for name in needed if name not in logged)
        raise UsageError(f"{field}: run {run_id} has no {missing} artifact{hint}")
    files = [Path(client.download_artifacts(run_id, name, folder)) for name in needed]
    return run, files[0], files[1] if checkpoint else None


def writable_folder(folder: Path, field: str) -> None:
    """Create the folder if needed; a folder we cannot write to is the user's to fix, named by field."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{field}: cannot create {folder} ({err.strerror})") from err
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{field}: {folder} is not writable")


def creatable_folder(folder: Path, field: str) -> None:
    """Like writable_folder, but only checked, not made: it is writable, or its nearest existing parent is."""
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
        return
    if existing == folder and folder.is_dir():
        raise UsageError(f"{field}: {folder} is not writable")
    raise UsageError(f"{field}: cannot create {folder} ({existing} is not a writable folder)")


def validate_tracking_uri(tracking_uri: str) -> str:
    """Check the URI's form (and, for a local store, that its folder can be written) before any run; writes nothing."""
    scheme = urlsplit(tracking_uri).scheme.split("+")[0]
    if scheme not in SUPPORTED_SCHEMES:
        raise UsageError(
            f"tracking.uri: unsupported tracking URI {mask_secrets(tracking_uri)!r}; "
            f"use sqlite:///path/mlflow.db, postgresql://..., or http(s)://server"
        )
    store = local_store_dir(tracking_uri)
    if store is not None:
        if not tracking_uri.endswith(".db"):
            raise UsageError(f"tracking.uri: a SQLite store must name a .db file, got {tracking_uri!r}")
        creatable_folder(store, "tracking.uri")
    else:
        check_reachable(tracking_uri, scheme)
    return tracking_uri


def check_reachable(tracking_uri: str, scheme: str, timeout_s: int = 10) -> None:
    """A remote store answers within timeout_s, or we say so in one line (MLflow would retry for minutes)."""
    try:
        if scheme in ("http", "https"):
            from urllib.request import urlopen

            urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_s).close()
            from aevae.credentials import check_login

            check_login(tracking_uri, mask_secrets(tracking_uri), timeout_s=timeout_s)  # a wrong password: one line
        elif scheme in ("postgresql", "mysql"):
            import sqlalchemy

            engine = sqlalchemy.create_engine(tracking_uri, connect_args={"connect_timeout": timeout_s})
            with engine.connect():
                pass
            engine.dispose()
    except UsageError:  # the server answered, and refused the login
        raise
    except Exception as err:  # refused, unknown host, bad credentials, a missing driver
        reason = mask_secrets(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
        raise UsageError(f"tracking.uri: cannot reach {mask_secrets(tracking_uri)} ({reason[:300]})") from err


def open_store(tracking_uri: str) -> str:
    """Validate the URI; for a local store also hold its lock and point its artifact locations here.

    Every command that reads or writes the record opens it through here.
    """
    validate_tracking_uri(tracking_uri)
    store = local_store_dir(tracking_uri)
    if store is not None and store.resolve() not in _HELD_LOCKS:
        writable_folder(store, "tracking.uri")
        fd = lock_store(store)
        if fd is None:
            raise UsageError(f"tracking.uri: {store} is being snapshotted (aevae snapshot); try again when it is done")
        os.set_inheritable(fd, True)  # `aevae ui` execs the MLflow server, which keeps holding it
        _HELD_LOCKS[store.resolve()] = fd
        create_tables(tracking_uri, store)
        relocate(store)
    return tracking_uri


def create_tables(tracking_uri: str, store: Path) -> None:
    """MLflow makes (or migrates) its tables when a process first opens a store; two processes that do it at once
    on a new store collide ("duplicate column name"). Here one process at a time does it, the others wait. A new
    store starts as a copy of a cached empty one (aevae.empty_store): 20 ms instead of MLflow's 1.2 s."""
    from mlflow import MlflowClient

    with open(store / TABLES_LOCK_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        database = sqlite_file(tracking_uri)
        if database is not None and not database.exists():
            empty_store.seed(database)
        MlflowClient(tracking_uri).search_experiments(max_results=1)


def lock_store(store: Path, exclusive: bool = False) -> int | None:
    """flock the store's lock file, freed when the process exits; None if the other kind is held.

    Commands that write (train, sweeps, ui) share it until they exit; `aevae snapshot` needs it alone.
    """
    fd = os.open(store / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _former_store(location: str) -> Path | None:
    """The store folder that an experiment's location ``file://<store>/artifacts`` was recorded in."""
    parts = urlsplit(location)
    if parts.scheme != "file" or not parts.path.endswith(f"/{ARTIFACTS_DIR}"):
        return None
    return Path(url2pathname(parts.path)).parent


def relocate(store: Path) -> int:
    """Rewrite artifact locations recorded under the store's former folder to its current one.

    MLflow records absolute locations (``file:///old/mlruns/artifacts/<run>/artifacts``); after the
    record is moved, or cloned and pulled with DVC elsewhere, they name a folder that is gone.
    Returns the number of rows rewritten (0 when the store has not moved).
    """
    if not (store / DB_NAME).is_file():
        return 0
    here = store.resolve()
    with closing(sqlite3.connect(store / DB_NAME, timeout=30)) as db, db:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "experiments" not in tables:
            return 0
        locations = [location for (location,) in db.execute("SELECT artifact_location FROM experiments")]
        former = {_former_store(location) for location in locations} - {None, here}
        changed = 0
        for old_dir in former:
            for old, new in ((old_dir.as_uri(), here.as_uri()), (str(old_dir), str(here))):
                for table, column in (pair for pair in LOCATION_COLUMNS if pair[0] in tables):
                    changed += db.execute(
                        f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE substr({column}, 1, ?) = ?",
                        (new, len(old) + 1, len(old) + 1, f"{old}/"),
                    ).rowcount
    return changed


def running_runs(store: Path) -> list[tuple[str, str]]:
    """(name, id) of the store's runs whose status is RUNNING."""
    with closing(sqlite3.connect(store / DB_NAME, timeout=30)) as db:
        return db.execute("SELECT name, run_uuid FROM runs WHERE status = 'RUNNING'").fetchall()


def artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a local store live beside its database, so the whole record is one folder."""
    store = local_store_dir(tracking_uri)
    return (store / ARTIFACTS_DIR).resolve().as_uri() if store is not None else None


# MLflow 3.x's UI reads this experiment tag to choose its view: "custom_model_development" opens on the runs table
# and charts; without it an experiment with no runs yet may be shown as a GenAI (traces) experiment.
EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"


def experiment_id(client: Any, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name`` (marked as model training), created with the store's artifact location if new."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(
                name, artifact_location=artifact_location(tracking_uri), tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}
            )
        except MlflowException:  # another worker or rank created it a moment ago
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # made by an older aevae or by MLflow itself
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return experiment.experiment_id


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> readable params: {"model.class": "VAE", "model.latent_dim": 4, ...}."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if key == "config":  # the path of the YAML it came from, not a setting
            continue
        if key == "class_path":
            flat[f"{prefix}class"] = str(value).rsplit(".", 1)[-1]
        elif key == "init_args":
            flat.update(flatten(value, prefix=prefix))
        elif isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = mask_secrets(value) if isinstance(value, str) else value
    return flat


def git_commit() -> str:
    """The commit of the code that runs (the aevae checkout), or 'unknown' outside git."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def close_run(client: Any, run_id: str, error: BaseException | None) -> str:
    """End a run as FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED with the reason as a tag."""
    if error is None:
        status = "FINISHED"
    elif any(isinstance(cause, (KeyboardInterrupt, SystemExit)) for cause in causes(error)):
        status = "KILLED"  # an interrupt that landed inside torch.save surfaces as the writer's RuntimeError
    else:
        status = "FAILED"
        client.set_tag(run_id, "failure_reason", mask_secrets(f"{type(error).__name__}: {error}")[:4000])
    client.set_terminated(run_id, status=status)
    return status


def wait_out_http_outages(wait_s: float) -> None:
    """Have MLflow's HTTP client retry a server that fails (5xx while its database is away) or does not answer
    for at least wait_s, with its own backoff (MLFLOW_HTTP_REQUEST_MAX_RETRIES/_BACKOFF_FACTOR, set in the
    environment so that worker processes inherit them); values the user set win."""
    from urllib3.util.retry import Retry

    factor = float(os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "2"))
    if "MLFLOW_HTTP_REQUEST_MAX_RETRIES" in os.environ:
        return
    retries, waited, retry = 0, 0.0, Retry(total=10, backoff_factor=factor)
    while waited < wait_s and retries < 10:  # MLflow caps retries at 10
        retry = retry.increment("GET", "/", error=ConnectionError())
        waited += retry.get_backoff_time()
        retries += 1
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(retries)
