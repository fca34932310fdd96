"""A new SQLite store starts as a copy of a cached empty store: the same tables, schema version and Default
experiment as a store MLflow makes itself, without MLflow's migrations; and MLflow's own way where there is no cache."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import mlflow.store.db.utils
import pytest
from mlflow import MlflowClient

from aevae import empty_store, tracking


def schema(database: Path) -> tuple[dict[str, list[str]], list[tuple[str]]]:
    """Every table and index with the lines of its SQL as a sorted list (MLflow's migrations write a table's CHECK
    constraints in an order that differs from one process to another), and the schema version."""
    with closing(sqlite3.connect(database)) as db:
        objects = db.execute("SELECT name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'").fetchall()
        version = db.execute("SELECT version_num FROM alembic_version").fetchall()
    return {name: sorted(line.strip().rstrip(",") for line in (sql or "").splitlines()) for name, sql in objects}, version


def experiments(uri: str) -> list[tuple[str, str, str]]:
    client = MlflowClient(uri)
    client.create_experiment("mine")
    return sorted((e.experiment_id, e.name, e.artifact_location) for e in client.search_experiments())


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # MLflow puts the Default experiment's artifacts under the working directory
    return tmp_path / "cache"


def test_a_new_store_is_the_store_mlflow_makes_without_its_migrations(tmp_path: Path, cache: Path, monkeypatch) -> None:
    by_mlflow = tmp_path / "mlflow" / "mlflow.db"
    by_mlflow.parent.mkdir()
    MlflowClient(f"sqlite:///{by_mlflow}").search_experiments(max_results=1)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the cached store is made from another folder than the copies below
    first = tmp_path / "first" / "mlflow.db"
    tracking.open_store(f"sqlite:///{first}")  # makes the cached empty store, then copies it
    assert experiments(f"sqlite:///{first}")[0] == ("0", "Default", str(elsewhere / "mlruns" / "0"))
    monkeypatch.chdir(tmp_path)
    assert (empty_store.cache_folder() / "empty.db").is_file() and str(cache) in str(empty_store.cache_folder())

    def no_migrations(*args, **kwargs):
        raise AssertionError("MLflow migrated a new store that should have been a copy")

    monkeypatch.setattr(mlflow.store.db.utils, "_initialize_tables", no_migrations)
    second = tmp_path / "second" / "mlflow.db"
    tracking.open_store(f"sqlite:///{second}")
    made_by_mlflow = experiments(f"sqlite:///{by_mlflow}")
    assert made_by_mlflow == [("0", "Default", str(tmp_path / "mlruns" / "0")), ("1", "mine", str(tmp_path / "mlruns" / "1"))]
    assert schema(first) == schema(second) == schema(by_mlflow)
    assert experiments(f"sqlite:///{second}") == made_by_mlflow
    assert not list(second.parent.glob("*.partial"))


def test_without_a_writable_cache_mlflow_makes_the_store(tmp_path: Path, cache: Path) -> None:
    cache.write_text("a file where the cache folder would be")
    store = tmp_path / "store" / "mlflow.db"
    tracking.open_store(f"sqlite:///{store}")
    assert empty_store.template() is None
    assert experiments(f"sqlite:///{store}")[0][:2] == ("0", "Default")
