"""Several processes on one record at once: two trainings writing one mlruns/, and a two-worker sweep while
`aevae best` reads the study. No lost run, no corrupt database, no "database is locked"."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from aevae import sweep
from conftest import REPO, cli_env, run_aevae

pytestmark = pytest.mark.serial  # their races are real only with the machine to themselves
DEMO = str(REPO / "experiments" / "vae_demo.yaml")
EPOCHS = 2
TINY = ["--model.hidden_dims", "[16]", "--trainer.max_epochs", str(EPOCHS), "--trainer.limit_train_batches", "3",
        "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false", "--analysis.enabled", "false"]  # fmt: skip
LOCKED = "database is locked"


def aevae(*args: str, cwd: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "aevae", *args]
    return subprocess.Popen(command, cwd=cwd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 240) -> str:
    """Wait for a process that must succeed; its stderr."""
    _, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    assert LOCKED not in err
    return err


def intact(database: Path) -> None:
    with closing(sqlite3.connect(database)) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def test_two_trainings_write_one_new_store_at_once(tmp_path: Path) -> None:
    trainings = [aevae("train", "--config", DEMO, *TINY, "--seed", str(seed), cwd=tmp_path) for seed in (0, 1)]
    for training in trainings:
        finish(training)

    store = tmp_path / "mlruns"
    intact(store / "mlflow.db")
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(run.data.tags["seed"] for run in runs) == ["0", "1"]
    assert {run.info.status for run in runs} == {"FINISHED"}
    assert runs[0].data.metrics.keys() == runs[1].data.metrics.keys() >= {"val/loss", "val/nelbo", "test/loss"}
    for run in runs:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == list(range(EPOCHS))
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "checkpoints"}
        assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/best.ckpt"]


SWEEP = {
    "experiment": DEMO,
    "overrides": {
        "model.hidden_dims": [16],
        "trainer.max_epochs": EPOCHS,
        "trainer.limit_train_batches": 3,
        "trainer.limit_val_batches": 2,
        "trainer.enable_progress_bar": False,
        "trainer.enable_model_summary": False,
        "analysis.enabled": False,
    },
    "space": {"model.latent_dim": {"low": 2, "high": 8}},
    "objectives": [{"metric": "val/loss", "direction": "minimize"}],
    "n_trials": 4,
    "heartbeat_interval": 1,
    "grace_period": 10,
}
NOT_YET = ("--storage: no store at", "--study: no study 'tiny'")  # before the sweep has made them


def read_best(cwd: Path) -> tuple[int, str]:
    """`aevae best` while the sweep runs: the study so far (exit 0), or one line saying it is not there yet."""
    result = run_aevae("best", "--study", "tiny", cwd=cwd, timeout=120)
    err = result.stderr.strip()
    assert LOCKED not in err and "Traceback" not in err, err[-3000:]
    if result.returncode == 2:
        assert len(err.splitlines()) == 1 and any(reason in err for reason in NOT_YET), err
    else:
        assert result.returncode == 0 and result.stdout.startswith("study tiny: "), err[-3000:]
    return result.returncode, result.stdout


def test_two_worker_sweep_while_best_reads_the_study(tmp_path: Path) -> None:
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(SWEEP))
    worker = aevae("sweep", "--config", "tiny.yaml", "--workers", "2", cwd=tmp_path)
    reads = []
    while worker.poll() is None:
        reads.append(read_best(tmp_path))
    finish(worker)
    reads.append(read_best(tmp_path))
    assert reads[-1][0] == 0 and "best trial:" in reads[-1][1]
    assert len(reads) >= 3  # it did read while the workers ran
    unfinished = [out for code, out in reads[:-1] if code == 0 and f"({SWEEP['n_trials']} complete)" not in out]
    assert unfinished, reads  # at least one read saw the study mid-sweep

    store = tmp_path / "mlruns"
    intact(store / "mlflow.db")
    intact(store / sweep.STORE_FILE)
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{store / sweep.STORE_FILE}").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * SWEEP["n_trials"]
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    children = [run for run in client.search_runs([client.get_experiment_by_name("demo").experiment_id])
                if "optuna.trial" in run.data.tags]  # fmt: skip
    assert sorted(int(run.data.tags["optuna.trial"]) for run in children) == list(range(SWEEP["n_trials"]))
    assert {run.info.run_id for run in children} == {t.user_attrs[sweep.RUN_ID_ATTR] for t in trials}
    assert {run.info.status for run in children} == {"FINISHED"}
