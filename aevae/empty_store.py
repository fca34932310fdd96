"""A new SQLite tracking store starts as a copy of an empty one made once per MLflow version and cached.

MLflow makes a new store's tables by running its schema migrations one by one, about 1.2 s on a 2-core machine,
in every new store (each test, each fresh folder); copying the result takes about 20 ms. The cached store has
MLflow's tables at this version's schema and no experiment: MLflow itself adds its Default experiment when it first
opens the copy, with the artifact location and time it would have given a store it made. Where the cache cannot be
written, MLflow makes the tables itself, as before.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from contextlib import closing
from pathlib import Path


def cache_folder() -> Path:
    """``$XDG_CACHE_HOME/aevae`` (default ``~/.cache/aevae``), one template a version of MLflow."""
    import mlflow

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "aevae" / f"mlflow-{mlflow.__version__}"


def template() -> Path | None:
    """The cached empty store, made now if missing (atomically: concurrent makers each finish their own and the
    last rename wins); None where the cache cannot be written."""
    folder = cache_folder()
    path = folder / "empty.db"
    if path.is_file():
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            made = Path(scratch) / "empty.db"
            from mlflow import MlflowClient

            MlflowClient(f"sqlite:///{made}").search_experiments(max_results=1)  # MLflow runs its migrations
            with closing(sqlite3.connect(made)) as db, db:
                db.execute("DELETE FROM experiments")  # its Default experiment: remade by MLflow in each copy
            os.replace(made, path)
    except OSError:
        return None
    return path


def seed(database: Path) -> bool:
    """Make a new store's database a copy of the empty store (atomically: no half-copied store is ever seen).
    False, and nothing written, where there is no template."""
    source = template()
    if source is None:
        return False
    partial = database.with_name(f".{database.name}.partial")
    shutil.copyfile(source, partial)
    os.replace(partial, database)
    return True
