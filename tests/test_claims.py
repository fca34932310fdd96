"""Claims of the README and docs/, each tried on the running program: sockets, signals, stores, sweeps, reproduce."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import lightning.pytorch as pl
import psutil
import pytest
import torch
import yaml
from mlflow import MlflowClient

from aevae import tracking
from aevae.checkpoints import load_weights, read_checkpoint
from aevae.cli import main
from aevae.errors import UsageError
from aevae.models import VAE
from aevae.training import parse_config, run_training
from conftest import REPO, aevae_here, cli_env

DEMO = str(REPO / "experiments" / "vae_demo.yaml")
TINY = [
    "--config", DEMO, "--model.hidden_dims", "[16]", "--trainer.limit_train_batches", "4",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--analysis.enabled", "false",
]  # fmt: skip


def all_runs(tracking_uri: str) -> list:
    client = MlflowClient(tracking_uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_ui_listens_on_loopback_only(tmp_path: Path, serve_ui) -> None:
    tracking.open_store(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")  # the store as aevae makes it
    port = urlparse(serve_ui(tmp_path)).port
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listening and {c.laddr.ip for c in listening} == {"127.0.0.1"}  # not 0.0.0.0, not ::


@pytest.mark.serial
def test_sigterm_ends_a_training_killed_in_the_store_of_mlflow_tracking_uri(tmp_path: Path) -> None:
    """A real SIGTERM to a real `aevae train`; no --tracking.uri: MLFLOW_TRACKING_URI names the store."""
    uri = f"sqlite:///{tmp_path / 'elsewhere' / 'mlflow.db'}"
    work = tmp_path / "work"
    work.mkdir()
    args = [*TINY, "--trainer.max_epochs", "1000", "--fit.checkpoint_dir", str(tmp_path / "ckpt")]
    worker = subprocess.Popen(
        [sys.executable, "-m", "aevae", "train", *args], cwd=work, env=cli_env({"MLFLOW_TRACKING_URI": uri}),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not list((tmp_path / "ckpt").rglob("last.ckpt")):  # an epoch is done: the run is under way
        assert worker.poll() is None and time.monotonic() < deadline, "training ended before the signal"
        time.sleep(0.1)
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=120)
    assert worker.returncode != 0, err[-2000:]
    (run,) = all_runs(uri)
    assert run.info.status == "KILLED", err[-2000:]
    assert len(MlflowClient(uri).get_metric_history(run.info.run_id, "val/loss")) < 1000
    assert not (work / "mlruns").exists()  # nothing went to the default store


class Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoints_with_pickled_code_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": VAE(latent_dim=2, hidden_dims=[8]).state_dict(), "extra": Payload()}, path)
    with pytest.raises(UsageError, match="evil.ckpt"):
        read_checkpoint(path)
    with pytest.raises(UsageError, match="evil.ckpt"):
        load_weights(VAE(latent_dim=2, hidden_dims=[8]), path)
    assert not (tmp_path / "pwned").exists()  # the code in the pickle never ran


class WorseEveryEpoch(pl.Callback):
    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.current_epoch > 0:
            with torch.no_grad():
                module.decoder[-2].bias.add_(6.0)


def test_early_stopping_stops_after_patience_epochs_without_improvement(tmp_path: Path, tracking_uri: str) -> None:
    config = parse_config(
        [*TINY, "--trainer.max_epochs", "8", "--fit.early_stopping_patience", "2", "--fit.test", "false",
         "--tracking.uri", tracking_uri, "--fit.checkpoint_dir", str(tmp_path / "ckpt")]
    )  # fmt: skip
    result = run_training(config, callbacks=[WorseEveryEpoch()])
    history = MlflowClient(tracking_uri).get_metric_history(result.run_id, "val/loss")
    assert sorted(m.step for m in history) == [0, 1, 2]  # best at 0, then two epochs without improvement


def _sweep(folder: Path, **changes) -> Path:
    config = {
        "experiment": DEMO,
        "overrides": {"model.hidden_dims": [16], "trainer.max_epochs": 2, "trainer.limit_train_batches": 3,
                      "trainer.enable_progress_bar": False, "trainer.enable_model_summary": False,
                      "analysis.enabled": False},
        "space": {"model.latent_dim": {"low": 2, "high": 8}},
        "objectives": [{"metric": "val/loss", "direction": "minimize"}],
        "pruner": {"name": "hyperband", "min_resource": 1, "max_resource": 2},
        "n_trials": 500,
        **changes,
    }  # fmt: skip
    path = folder / "claims.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_hyperband_sweep_stops_at_timeout_and_refuses_another_space_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    import optuna

    path = _sweep(tmp_path)
    monkeypatch.chdir(tmp_path)  # in this process (capfd: all it writes to the terminal)
    started = time.monotonic()
    code, _, err = aevae_here(capfd, "sweep", "--config", str(path), "--timeout", "2")
    assert code == 0, err[-3000:]
    storage = f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"
    study = optuna.load_study(study_name="claims", storage=storage)
    trials = study.get_trials()
    assert 1 <= len(trials) < 500 and time.monotonic() - started < 300  # no trial started after 2 s
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    parent = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}").get_run(study.user_attrs["mlflow_parent_run_id"])
    assert "hyperband" in parent.data.params["pruner"]

    _sweep(tmp_path, space={"model.latent_dim": {"low": 2, "high": 16}})
    code, _, err = aevae_here(capfd, "sweep", "--config", str(path), "--n-trials", "1")
    assert code == 2, err
    assert "with another space or objectives" in err and len(err.strip().splitlines()) == 1, err
    assert len(optuna.load_study(study_name="claims", storage=storage).get_trials()) == len(trials)


def test_pareto_index_and_champion_metric_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`reproduce --pareto-index i` takes the i-th Pareto trial by number; `--champion-metric val/kl` decides the
    alias by val/kl: the front's highest-KL end first, then its lowest-KL end, which takes the alias."""
    import optuna
    from test_sweep import write_sweep

    monkeypatch.chdir(tmp_path)
    objectives = [{"metric": "val/recon", "direction": "minimize"}, {"metric": "val/kl", "direction": "minimize"}]
    assert main(["sweep", "--config", str(write_sweep(tmp_path, objectives=objectives, n_trials=4))]) == 0
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}")
    front = sorted(study.best_trials, key=lambda t: t.number)
    assert len(front) >= 2
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(uri)
    by_kl = sorted(range(len(front)), key=lambda i: front[i].values[1])
    kl_of = {}
    for index in (by_kl[-1], by_kl[0]):  # the highest-KL end first: the alias must then move to the lowest
        assert main(["reproduce", "--study", "tiny", "--pareto-index", str(index), "--champion-metric", "val/kl"]) == 0
        (run,) = [r for r in all_runs(uri) if r.data.tags.get("source_trial") == str(front[index].number)]
        kl_of[run.info.run_id] = run.data.metrics["val/kl"]
        champion = client.get_model_version_by_alias("aevae-vae", "champion")
        assert champion.run_id == min(kl_of, key=kl_of.get)
