"""`aevae reproduce`: DDP on CPU (gloo), determinism, the batch rule, the registry, bad input."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pytorch
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from aevae.checkpoints import read_checkpoint
from aevae.cli import main
from aevae.data import ImageDataModule
from aevae.distributed import scale_batch, world_size
from aevae.errors import UsageError
from aevae.models import VAE
from aevae.training import parse_config, run_training
from conftest import REPO, aevae_here, run_aevae

pytestmark = pytest.mark.xdist_group("test_reproduce")  # `make test`: one worker runs this file, making `ddp_run` once

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


# Uneven DDP shards: digits 0 and 1 of mnist-5k (809 training images, 191 test), 17 held out for validation. Two
# ranks of 8 images a batch: val 9 + 8 (rank 0 runs one batch more), test 96 + 95, train 396 + 396 (short last
# batches). lr 1e-12 holds the weights still (Adam moves each by about lr a step), so every train/* of every epoch
# is the per-image mean of the final weights over the training split, recomputable by hand.
UNEVEN = [
    "--model.hidden_dims", "[16]", "--model.sample_latent", "false", "--model.lr", "1e-12",
    "--data.classes", "[0, 1]", "--data.val_fraction", "0.021", "--data.batch_size", "16",
    "--trainer.limit_train_batches", "1.0",
]  # fmt: skip
SPLIT_SIZES = {"train": 792, "val": 17, "test": 191}


@dataclass
class DDPRun:
    tracking_uri: str
    folder: Path
    source_id: str
    run: Any  # the reproduction's MLflow run


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> DDPRun:
    """A single-device source run, reproduced by `aevae reproduce` on two CPU processes (gloo)."""
    folder = tmp_path_factory.mktemp("ddp")
    tracking_uri = f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"
    source_id = train_source(tracking_uri, folder, *UNEVEN)
    result = run_aevae(
        "reproduce", "--run-id", source_id, "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
        "--tracking-uri", tracking_uri, cwd=folder, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    new = [r for r in runs(tracking_uri) if r.info.run_id != source_id]
    assert len(new) == 1  # rank 1 logged nothing of its own
    return DDPRun(tracking_uri, folder, source_id, new[0])


def by_hand(model: VAE, split: str) -> dict[str, float]:
    """Every `<split>/...` metric as a per-image mean over the split's real images (float64)."""
    from test_numbers import epoch_means

    data = ImageDataModule(source="mnist-5k", classes=[0, 1], val_fraction=0.021)
    data.load()
    images = data.splits[split].images.float() / 255
    assert len(images) == SPLIT_SIZES[split]
    means = epoch_means(model, images)
    means["bpd"] = means["nelbo"] / (28 * 28 * math.log(2))  # Bernoulli: no offset
    return {f"{split}/{name}": value for name, value in means.items()}


def test_ddp_on_two_cpu_processes_with_uneven_shards(ddp_run: DDPRun) -> None:
    run, client = ddp_run.run, MlflowClient(ddp_run.tracking_uri)
    assert run.info.status == "FINISHED"
    assert run.data.tags["source_run_id"] == ddp_run.source_id
    assert run.data.tags["reproduction_verdict"] == "reproduced"
    metrics = run.data.metrics
    assert metrics["ddp/world_size"] == 2.0
    assert metrics["ddp/val_loss_rank_spread"] == 0.0  # validation metrics synchronised
    assert metrics["ddp/weight_max_abs_diff"] == 0.0  # same weights on both ranks after training
    assert run.data.params["data.batch_size"] == "8"  # global batch 16 kept: 8 per process
    codes = np.load(client.download_artifacts(run.info.run_id, "latent/codes.npz", str(ddp_run.folder)))
    assert len(codes["labels"]) == SPLIT_SIZES["test"]  # the whole test split, not one rank's shard
    assert "reproduction/comparison.md" in {a.path for a in client.list_artifacts(run.info.run_id, "reproduction")}

    mlflow.set_tracking_uri(ddp_run.tracking_uri)
    champion = mlflow.pytorch.load_model("models:/aevae-vae@champion")
    checkpoint = client.download_artifacts(run.info.run_id, "checkpoints/best.ckpt", str(ddp_run.folder))
    best = VAE.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True).eval()
    images = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(champion.encode(images), best.encode(images), atol=1e-6)

    # Every train/* and val/* of both epochs, and test/*, recomputed in this one process from the best checkpoint.
    expected = {**by_hand(best, "train"), **by_hand(best, "val"), **by_hand(best, "test")}
    logged = [name for name in metrics if name.split("/")[0] in ("train", "val", "test")]
    assert set(logged) == set(expected)  # no metric left unchecked, none missing
    for name in logged:
        history = client.get_metric_history(run.info.run_id, name)
        assert len(history) == (1 if name.startswith("test/") else 2), name
        for point in history:
            assert point.value == pytest.approx(expected[name], rel=1e-5, abs=1e-6), (name, point.step)
    best_epoch = min(client.get_metric_history(run.info.run_id, "val/loss"), key=lambda m: m.value).step
    assert read_checkpoint(checkpoint)["epoch"] == best_epoch


def test_scale_lr_back_to_one_device_keeps_the_batch_and_scales_the_lr(ddp_run: DDPRun, monkeypatch, capfd) -> None:
    """The DDP run (2 processes x 8 images, lr 1e-12) reproduced on one device with --scale-lr: batch 8 kept, lr
    1e-12 * 1 / 2. Without --scale-lr it would be batch 16 and lr 1e-12. Read back from the run, the checkpoint's
    hyperparameters, its optimizer (the lr Adam used) and its step count (the batch the loader cut)."""
    ddp_id = ddp_run.run.info.run_id
    monkeypatch.chdir(ddp_run.folder)  # one device: in this process
    code, _, err = aevae_here(
        capfd, "reproduce", "--run-id", ddp_id, "--devices", "1", "--scale-lr", "true", "--max-epochs", "1",
        "--register-as", "", "--tracking-uri", ddp_run.tracking_uri,
    )  # fmt: skip
    assert code == 0, err[-3000:]
    client = MlflowClient(ddp_run.tracking_uri)
    (run,) = [r for r in runs(ddp_run.tracking_uri) if r.data.tags.get("source_run_id") == ddp_id]
    lr, batch = 1e-12 * 1 / 2, 8
    assert float(run.data.params["model.lr"]) == lr and run.data.params["data.batch_size"] == str(batch)
    assert run.data.params["trainer.devices"] == "1"
    checkpoint = read_checkpoint(client.download_artifacts(run.info.run_id, "checkpoints/best.ckpt", str(ddp_run.folder)))
    assert checkpoint["hyper_parameters"]["lr"] == lr
    assert checkpoint["datamodule_hyper_parameters"]["batch_size"] == batch
    assert [group["lr"] for group in checkpoint["optimizer_states"][0]["param_groups"]] == [lr]
    assert checkpoint["global_step"] == (checkpoint["epoch"] + 1) * math.ceil(SPLIT_SIZES["train"] / batch)  # 99 an epoch
    assert run.data.tags["reproduction_verdict"] == "reproduced"


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
