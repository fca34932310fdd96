"""Shared fixtures: a temporary MLflow store, the read-only MNIST copy, and the CLI as users run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("AEVAE_DATA_ROOT", REPO.parent / "shared" / "datasets"))

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    """A fresh SQLite MLflow store in the test's own folder."""
    return f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


@pytest.fixture
def mnist_root() -> Path:
    """The real MNIST IDX files (read-only); the suite needs them, as CI has them."""
    raw = SHARED_DATASETS / "MNIST" / "raw"
    assert (raw / "train-images-idx3-ubyte.gz").is_file(), f"MNIST not found in {raw}; set AEVAE_DATA_ROOT"
    return SHARED_DATASETS


def run_aevae(*args: str, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the `aevae` CLI in a subprocess, as a user would, capturing its output."""
    inherited = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    full_env = {**inherited, "MPLBACKEND": "Agg", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "aevae", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
