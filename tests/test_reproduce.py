"""`aevae reproduce`: DDP on CPU (gloo), determinism, the batch rule, the registry, bad input."""

from __future__ import annotations

from pathlib import Path

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from aevae.cli import main
from aevae.data import ImageDataModule
from aevae.distributed import scale_batch, world_size
from aevae.errors import UsageError
from aevae.models import VAE
from aevae.training import parse_config, run_training
from conftest import REPO, run_aevae

DEMO = str(REPO / "experiments" / "vae_demo.yaml")
TINY = [
    "--model.hidden_dims", "[32]", "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "6",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--analysis.umap", "false",
]  # fmt: skip


def train_source(tracking_uri: str, tmp_path: Path, *extra: str) -> str:
    args = ["--config", DEMO, *TINY, "--tracking.uri", tracking_uri, "--fit.checkpoint_dir", str(tmp_path / "ckpt")]
    return run_training(parse_config([*args, *extra])).run_id


def runs(tracking_uri: str) -> list:
    client = MlflowClient(tracking_uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_ddp_on_two_cpu_processes(tmp_path: Path, tracking_uri: str) -> None:
    source_id = train_source(tracking_uri, tmp_path, "--model.sample_latent", "false")  # val/loss deterministic
    result = run_aevae(
        "reproduce", "--run-id", source_id, "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
        "--tracking-uri", tracking_uri, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    new = [r for r in runs(tracking_uri) if r.info.run_id != source_id]
    assert len(new) == 1  # rank 1 logged nothing of its own
    run = new[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["source_run_id"] == source_id and run.data.tags["reproduction_verdict"]
    metrics = run.data.metrics
    assert run.data.tags["reproduction_verdict"] == "reproduced"
    assert metrics["ddp/world_size"] == 2.0
    assert metrics["ddp/val_loss_rank_spread"] == 0.0  # validation metrics synchronised
    assert metrics["ddp/weight_max_abs_diff"] == 0.0  # same weights on both ranks after training
    assert run.data.params["data.batch_size"] == "64"  # global batch 128 kept: 64 per process
    client = MlflowClient(tracking_uri)
    codes = np.load(client.download_artifacts(run.info.run_id, "latent/codes.npz", str(tmp_path)))
    assert len(codes["labels"]) == 1000  # the whole mnist-5k test split, not one rank's shard
    assert "reproduction/comparison.md" in {a.path for a in client.list_artifacts(run.info.run_id, "reproduction")}

    mlflow.set_tracking_uri(tracking_uri)
    champion = mlflow.pytorch.load_model("models:/aevae-vae@champion")
    checkpoint = client.download_artifacts(run.info.run_id, "checkpoints/best.ckpt", str(tmp_path))
    from_checkpoint = VAE.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True).eval()
    images = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(champion.encode(images), from_checkpoint.encode(images), atol=1e-6)

    # The best checkpoint, evaluated in this one process over the whole validation split (400 images: two
    # ranks of 200, each 64 + 64 + 64 + 8), gives the val/loss the two processes logged for it.
    from test_numbers import epoch_means

    data = ImageDataModule(source="mnist-5k")
    data.setup()
    best_epoch = min(client.get_metric_history(run.info.run_id, "val/loss"), key=lambda m: m.value).step
    for name, value in epoch_means(from_checkpoint, data.splits["val"].images.float() / 255).items():
        (logged,) = [m.value for m in client.get_metric_history(run.info.run_id, f"val/{name}") if m.step == best_epoch]
        assert logged == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_one_device_reproduction_is_exact(tmp_path: Path, tracking_uri: str, capsys) -> None:
    source_id = train_source(tracking_uri, tmp_path, "--analysis.enabled", "false")
    assert main(["reproduce", "--run-id", source_id, "--tracking-uri", tracking_uri, "--register-as", ""]) == 0
    out = capsys.readouterr().out
    assert "verdict: REPRODUCED" in out
    client = MlflowClient(tracking_uri)
    source, reproduction = sorted(runs(tracking_uri), key=lambda r: r.data.tags.get("source_run_id", ""))
    assert reproduction.data.tags["source_run_id"] == source.info.run_id
    for metric in ("val/loss", "test/loss"):
        original = [m.value for m in client.get_metric_history(source.info.run_id, metric)]
        again = [m.value for m in client.get_metric_history(reproduction.info.run_id, metric)]
        assert np.allclose(original, again, rtol=0, atol=1e-6), metric


def test_champion_moves_only_to_a_better_model(tmp_path: Path, tracking_uri: str) -> None:
    good = train_source(tracking_uri, tmp_path, "--analysis.enabled", "false", "--trainer.limit_train_batches", "20")
    worse = train_source(tracking_uri, tmp_path, "--analysis.enabled", "false", "--trainer.max_epochs", "1")
    base = ["--tracking-uri", tracking_uri]
    assert main(["reproduce", "--run-id", good, *base]) == 0
    assert main(["reproduce", "--run-id", worse, *base]) == 0
    client = MlflowClient(tracking_uri)
    versions = client.search_model_versions("name='aevae-vae'")
    assert len(versions) == 2
    champion = client.get_model_version_by_alias("aevae-vae", "champion")
    assert client.get_run(champion.run_id).data.tags["source_run_id"] == good


def test_not_reproduced_exits_1_is_registered_but_never_champion(tmp_path: Path, tracking_uri: str, capsys) -> None:
    from mlflow.exceptions import MlflowException

    source_id = train_source(tracking_uri, tmp_path, "--analysis.enabled", "false")
    base = ["reproduce", "--run-id", source_id, "--tracking-uri", tracking_uri]
    assert main([*base, "--max-epochs", "1", "--tolerance", "0"]) == 1  # one epoch of two: other scores
    assert "verdict: NOT REPRODUCED" in capsys.readouterr().out
    client = MlflowClient(tracking_uri)
    (version,) = client.search_model_versions("name='aevae-vae'")
    assert version.tags["reproduction_verdict"] == "not reproduced"
    with pytest.raises(MlflowException):  # the registry had no champion, and still has none
        client.get_model_version_by_alias("aevae-vae", "champion")
    assert main(base) == 0  # the same training again: reproduced, so it becomes the champion
    champion = client.get_model_version_by_alias("aevae-vae", "champion")
    assert str(champion.version) == "2" and champion.tags["reproduction_verdict"] == "reproduced"
    assert main([*base, "--max-epochs", "1", "--tolerance", "0"]) == 1
    assert str(client.get_model_version_by_alias("aevae-vae", "champion").version) == "2"


def test_champion_is_the_best_reproduced_model_in_any_order(tmp_path: Path, tracking_uri: str) -> None:
    """Worse model first (it is the champion), then a better one (the alias moves), then worse again (it stays)."""
    worse = train_source(tracking_uri, tmp_path, "--analysis.enabled", "false", "--trainer.max_epochs", "1")
    better = train_source(tracking_uri, tmp_path, "--analysis.enabled", "false", "--trainer.limit_train_batches", "20")
    client = MlflowClient(tracking_uri)
    assert client.get_run(better).data.metrics["val/loss"] < client.get_run(worse).data.metrics["val/loss"] - 5

    def champion_source() -> str:
        champion = client.get_model_version_by_alias("aevae-vae", "champion")
        return client.get_run(champion.run_id).data.tags["source_run_id"]

    base = ["--tracking-uri", tracking_uri]
    for source, expected in ((worse, worse), (better, better), (worse, better)):
        assert main(["reproduce", "--run-id", source, *base]) == 0
        assert champion_source() == expected
    assert len(client.search_model_versions("name='aevae-vae'")) == 3


def test_batch_rule() -> None:
    assert scale_batch(128, 1e-3, 1, 8, scale_lr=False) == (16, 1e-3)
    assert scale_batch(128, 1e-3, 1, 8, scale_lr=True) == (128, 8e-3)
    assert scale_batch(64, 1e-3, 2, 1, scale_lr=False) == (128, 1e-3)
    with pytest.raises(UsageError, match="--devices: the global batch 128 does not divide over 3"):
        scale_batch(128, 1e-3, 1, 3, scale_lr=False)
    assert world_size(4, 2) == 8 and world_size([0, 1], None) == 2 and world_size("auto", 1) == 1


def _fails(capsys, *args: str) -> str:
    code = main(["reproduce", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


def test_bad_input_is_one_line_and_changes_nothing(tmp_path: Path, tracking_uri: str, capsys) -> None:
    source_id = train_source(tracking_uri, tmp_path, "--analysis.enabled", "false")
    capsys.readouterr()  # what training printed
    uri = ["--tracking-uri", tracking_uri]
    assert "no run 'nope'" in _fails(capsys, "--run-id", "nope", *uri)
    assert "exactly one of --run-id or --study" in _fails(capsys, *uri)
    assert "does not divide over 3" in _fails(capsys, "--run-id", source_id, "--devices", "3", *uri)
    assert "--storage: no store at" in _fails(capsys, "--study", "nope", *uri)  # no sweep has made one
    client = MlflowClient(tracking_uri)
    bare = client.create_run(client.get_run(source_id).info.experiment_id).info.run_id
    client.set_terminated(bare)
    assert "has no config.yaml artifact" in _fails(capsys, "--run-id", bare, *uri)
    client.create_registered_model("ae-models", tags={"model_kind": "ae"})
    assert "holds ae models, not vae" in _fails(capsys, "--run-id", source_id, "--register-as", "ae-models", *uri)
    assert len(runs(tracking_uri)) == 2  # the source and the bare run: nothing new
    assert not client.search_model_versions("name='ae-models'")
    assert all(r.info.status != "RUNNING" for r in runs(tracking_uri))


def test_reproduce_a_multi_objective_studys_chosen_pareto_trial(tmp_path: Path, monkeypatch, capsys) -> None:
    from test_sweep import TINY, write_sweep

    import optuna

    monkeypatch.chdir(tmp_path)
    objectives = [{"metric": "val/recon", "direction": "minimize"}, {"metric": "val/kl", "direction": "minimize"}]
    assert main(["sweep", "--config", str(write_sweep(tmp_path, objectives=objectives))]) == 0
    capsys.readouterr()
    assert "is multi-objective; pass --pareto-index" in _fails(capsys, "--study", "tiny")

    assert main(["reproduce", "--study", "tiny", "--prefer", "val/recon", "--register-as", ""]) == 0
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}")
    chosen = min(study.best_trials, key=lambda t: t.values[0])
    tracking_uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (reproduction,) = [r for r in runs(tracking_uri) if "source_study" in r.data.tags]
    assert reproduction.data.tags["source_study"] == "tiny"
    assert reproduction.data.tags["source_trial"] == str(chosen.number)
    assert reproduction.data.tags["source_run_id"] == chosen.user_attrs["mlflow_run_id"]
    assert reproduction.data.params["model.latent_dim"] == str(chosen.params["model.latent_dim"])
    assert TINY["n_trials"] == len(study.trials)
