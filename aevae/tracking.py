"""The MLflow record: where it lives, how runs are named, flattened, tagged and closed."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from aevae.errors import UsageError

DEFAULT_STORE = Path("mlruns")
DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
SUPPORTED_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


def default_tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI`, else a SQLite database inside ./mlruns (the folder DVC versions)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(DEFAULT_STORE / DB_NAME).resolve()}"


def mask_secrets(text: str) -> str:
    """Hide passwords in URLs (``scheme://user:secret@host`` -> ``scheme://user:***@host``)."""
    return re.sub(r"(\w[\w+.-]*://[^:/@\s]+:)[^@\s]+@", r"\1***@", text)


def local_store_dir(tracking_uri: str) -> Path | None:
    """The folder of a local SQLite store (holds the database and the artifacts), else None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///") :]).parent


def validate_tracking_uri(tracking_uri: str) -> str:
    """Check the URI's form (and, for a local store, that its folder is writable) before any run."""
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
        try:
            store.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"tracking.uri: cannot create the store folder {store} ({err.strerror})") from err
        if not os.access(store, os.W_OK):
            raise UsageError(f"tracking.uri: the store folder {store} is not writable")
    return tracking_uri


def artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a local store live beside its database, so the whole record is one folder."""
    store = local_store_dir(tracking_uri)
    return (store / ARTIFACTS_DIR).resolve().as_uri() if store is not None else None


def experiment_id(client: Any, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name``, created with the store's artifact location if new."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(tracking_uri))


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
    elif isinstance(error, (KeyboardInterrupt, SystemExit)):
        status = "KILLED"
    else:
        status = "FAILED"
        client.set_tag(run_id, "failure_reason", mask_secrets(f"{type(error).__name__}: {error}")[:4000])
    client.set_terminated(run_id, status=status)
    return status
