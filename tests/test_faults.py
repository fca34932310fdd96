"""Training faults: SIGKILL and resume, divergence, corrupt checkpoints, atomic saves, no room."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from mlflow import MlflowClient

from aevae.checkpoints import AtomicCheckpointIO, load_weights, read_checkpoint
from aevae.data import ImageDataModule
from aevae.errors import TrainingDiverged, UsageError
from aevae.models import VAE
from aevae.training import parse_config, run_training
from conftest import REPO, aevae_here, cli_env, run_aevae

DEMO = str(REPO / "experiments" / "vae_demo.yaml")


def tiny_args(tracking_uri: str, tmp_path: Path, epochs: int = 3) -> list[str]:
    return [
        "--config", DEMO, "--model.hidden_dims", "[32]", "--trainer.max_epochs", str(epochs),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--analysis.enabled", "false", "--tracking.uri", tracking_uri,
        "--fit.checkpoint_dir", str(tmp_path / "checkpoints"),
    ]  # fmt: skip


def all_runs(tracking_uri: str) -> list:
    client = MlflowClient(tracking_uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    reference_uri = f"sqlite:///{tmp_path / 'reference' / 'mlflow.db'}"
    reference = run_training(parse_config(tiny_args(reference_uri, tmp_path / "reference", epochs=4)))

    uri = f"sqlite:///{tmp_path / 'killed' / 'mlflow.db'}"
    args = tiny_args(uri, tmp_path / "killed", epochs=4)
    worker = subprocess.Popen(
        [sys.executable, "-m", "aevae", "train", *args], cwd=tmp_path, env=cli_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not list((tmp_path / "killed" / "checkpoints").rglob("last.ckpt")):  # epoch 0 is done
        assert worker.poll() is None and time.monotonic() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    (killed,) = all_runs(uri)
    assert killed.info.status == "RUNNING"  # SIGKILL leaves no chance to close it

    result = run_aevae("train", *args, "--fit.resume", killed.info.run_id, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (resumed,) = all_runs(uri)  # the same run, not a new one
    assert resumed.info.status == "FINISHED"
    client = MlflowClient(uri)
    history = client.get_metric_history(resumed.info.run_id, "val/loss")
    assert sorted({m.step for m in history}) == [0, 1, 2, 3]
    final = {m.step: m.value for m in history}[3]
    assert math.isclose(final, reference.metrics["val/loss"], rel_tol=0, abs_tol=1e-6)
    assert math.isclose(resumed.data.metrics["test/loss"], reference.metrics["test/loss"], rel_tol=0, abs_tol=1e-6)


class PoisonWeights(pl.Callback):
    """A divergence on demand: NaN weights before the 4th training_step call of epoch 1. Calls take runs of 8
    batches (fit.steps_per_call auto), so the first bad step is epoch 0's 29 steps + 3 runs x 8 = step 53."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 1 and batch_idx == 3:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))


def test_divergence_stops_at_once_fails_the_run_keeps_last_good_checkpoint(tmp_path: Path, tracking_uri: str) -> None:
    with pytest.raises(TrainingDiverged, match=r"training diverged at epoch 1, step 53: loss is nan; last finite loss \d"):
        run_training(parse_config(tiny_args(tracking_uri, tmp_path)), callbacks=[PoisonWeights()])
    (run,) = all_runs(tracking_uri)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"].startswith("TrainingDiverged: training diverged at epoch 1, step 53")
    (last,) = (tmp_path / "checkpoints").rglob("last.ckpt")
    checkpoint = read_checkpoint(last)
    assert checkpoint["epoch"] == 0  # the end of the last good epoch
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())


def test_divergence_found_at_an_epochs_end_still_records_that_epochs_validation(
    tmp_path: Path, tracking_uri: str, monkeypatch
) -> None:
    """Read at the epoch's end (as on an accelerator, between reads): validation ran, and its metrics, held to be
    written with the epoch's train metrics, are written before the run fails."""
    from aevae import steps

    monkeypatch.setattr(steps, "host_read_interval", lambda device: 10**9)
    with pytest.raises(TrainingDiverged, match=r"training diverged at epoch 1, step 53"):
        run_training(parse_config(tiny_args(tracking_uri, tmp_path)), callbacks=[PoisonWeights()])
    (run,) = all_runs(tracking_uri)
    client = MlflowClient(tracking_uri)
    history = {key: [m.step for m in client.get_metric_history(run.info.run_id, key)] for key in ("train/loss", "val/loss")}
    assert history == {"train/loss": [0], "val/loss": [0, 1]}


def test_divergence_from_the_cli_is_one_line_exit_1(tmp_path: Path, tracking_uri: str, monkeypatch, capfd) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = aevae_here(capfd, "train", *tiny_args(tracking_uri, tmp_path), "--model.lr", "1e8")
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("aevae train: training diverged at epoch 0, step ")
    assert all_runs(tracking_uri)[0].info.status == "FAILED"


def poison_training_batch(monkeypatch, index: int) -> None:
    """A NaN pixel in the index-th training batch of the first epoch, put in as the batch is prepared for its
    step (inside a run of batches too: their pixels stay uint8 until each step reaches them)."""
    prepare, prepared = ImageDataModule.prepare, []

    def poisoned(data, batch):
        images, labels = prepare(data, batch)
        if data.trainer.training and data.trainer.current_epoch == 0:
            if len(prepared) == index:
                images = images.clone()
                images[0, 0, 0, 0] = float("nan")
            prepared.append(1)
        return images, labels

    monkeypatch.setattr(ImageDataModule, "prepare", poisoned)


def test_skip_policy_skips_and_counts_bad_batches(tmp_path: Path, tracking_uri: str, monkeypatch) -> None:
    poison_training_batch(monkeypatch, index=10)  # the 3rd batch of the 2nd run of 8
    config = parse_config([*tiny_args(tracking_uri, tmp_path, epochs=1), "--fit.on_nonfinite", "skip"])
    result = run_training(config)
    assert result.datamodule.steps_per_call == 8
    assert result.model.skipped_batches == 1
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    (run,) = all_runs(tracking_uri)
    assert run.info.status == "FINISHED" and run.data.metrics["train/skipped_batches"] == 1.0


def test_corrupt_checkpoint_on_resume_is_one_line_and_untouched(
    tmp_path: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    args = tiny_args(tracking_uri, tmp_path, epochs=1)
    first = run_training(parse_config(args))
    client = MlflowClient(tracking_uri)
    client.set_terminated(first.run_id, "KILLED")  # as if it had been interrupted
    (last,) = (tmp_path / "checkpoints").rglob("last.ckpt")
    last.write_bytes(last.read_bytes()[:5000])  # truncated
    before = last.read_bytes()
    monkeypatch.chdir(tmp_path)
    code, _, err = aevae_here(capfd, "train", *args, "--fit.resume", first.run_id)
    assert code == 2
    line = err.strip()
    assert line.startswith(f"aevae train: error: checkpoint {last} is truncated or corrupt (") and "\n" not in line
    assert last.read_bytes() == before
    assert client.get_run(first.run_id).info.status == "KILLED"


def test_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vae4.ckpt"
    AtomicCheckpointIO().save_checkpoint(
        {"state_dict": VAE(latent_dim=4, hidden_dims=[16]).state_dict(), "hyper_parameters": {"latent_dim": 4, "kl_weight": 1.0, "hidden_dims": [16]}},
        path,
    )
    other = VAE(latent_dim=8, hidden_dims=[16])
    with pytest.raises(UsageError, match="holds a vae latent_dim 4 hidden_dims \\[16\\]; the config builds a vae latent_dim 8"):
        load_weights(other, path)
    load_weights(VAE(latent_dim=4, hidden_dims=[16]), path)  # the right model loads
    with pytest.raises(UsageError, match="is truncated or corrupt"):
        path.write_bytes(b"\x00" * 100)
        load_weights(other, path)


SAVE_AND_STALL = """
import sys, time, torch
from aevae.checkpoints import AtomicCheckpointIO

class Stalling:  # once 4 KiB are written it says so and blocks: the kill lands inside torch.save
    def __init__(self, file):
        self.file, self.written = file, 0
    def write(self, data):
        count = self.file.write(data)
        self.written += count
        if self.written > 4096:
            self.file.flush()
            print("stalled", flush=True)
            time.sleep(600)
        return count
    def __getattr__(self, name):
        return getattr(self.file, name)

real_save = torch.save
torch.save = lambda obj, f, *args, **kwargs: real_save(obj, Stalling(f), *args, **kwargs)
AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(100_000)}}, sys.argv[1])
"""


def test_kill_during_save_leaves_previous_checkpoint_intact(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    saver = subprocess.Popen([sys.executable, "-c", SAVE_AND_STALL, str(path)], stdout=subprocess.PIPE, text=True, env=cli_env())
    assert saver.stdout.readline().strip() == "stalled"  # the new checkpoint is half written
    saver.send_signal(signal.SIGKILL)
    saver.wait()
    (partial,) = [p for p in tmp_path.iterdir() if p.name != "last.ckpt"]  # the half-written new one, beside it
    assert partial.name.endswith(".partial") and partial.stat().st_size > 4096
    assert torch.equal(read_checkpoint(path)["state_dict"]["w"], torch.zeros(3))  # the previous one, whole


class ScriptedValLoss(pl.LightningModule):
    """One weight, trained a step an epoch; its val/loss each epoch is scripted."""

    def __init__(self, val_losses: list[float]) -> None:
        super().__init__()
        self.w, self.val_losses = torch.nn.Parameter(torch.zeros(1)), val_losses

    def training_step(self, batch, batch_idx):
        return (self.w - 1).pow(2).sum()

    def validation_step(self, batch, batch_idx) -> None:
        self.log("val/loss", self.val_losses[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_with_checkpoints(folder: Path, val_losses: list[float], paired: bool) -> tuple[list, int]:
    """Fit 1 step an epoch; per epoch-end, the best checkpoint's epoch and whether best and last are one file."""
    from aevae.checkpoints import BestCheckpoint, LastCheckpoint

    best = BestCheckpoint(monitor="val/loss", mode="min", save_top_k=1, filename="best",
                          enable_version_counter=False, save_on_train_epoch_end=True)  # fmt: skip
    last = [LastCheckpoint(best, save_on_train_epoch_end=True)] if paired else []
    seen, dumps = [], []

    class Watch(pl.Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
            dumps.append(trainer.current_epoch)

        def on_train_epoch_start(self, trainer, pl_module) -> None:  # the previous epoch's checkpoints are written
            if trainer.current_epoch:
                seen.append(epoch_end(folder, paired))

    data = torch.utils.data.DataLoader(torch.zeros(1, 1))
    trainer = pl.Trainer(max_epochs=len(val_losses), callbacks=[best, *last, Watch()], plugins=[AtomicCheckpointIO()],
                         default_root_dir=folder, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(ScriptedValLoss(val_losses), train_dataloaders=data, val_dataloaders=data)
    return [*seen, epoch_end(folder, paired)], len(dumps)


def epoch_end(folder: Path, paired: bool) -> tuple[int, bool]:
    best, last = folder / "checkpoints" / "best.ckpt", folder / "checkpoints" / "last.ckpt"
    return read_checkpoint(best)["epoch"], paired and best.samefile(last)


def test_an_improving_epoch_writes_one_checkpoint_that_is_both_best_and_last(tmp_path: Path) -> None:
    """val/loss 3, 1, 2, 0.5: epochs 0, 1 and 3 improve. Each epoch dumps one checkpoint (last.ckpt), and in an
    improving one best.ckpt is that same file; epoch 2's last leaves epoch 1's best as it was."""
    seen, dumps = fit_with_checkpoints(tmp_path / "paired", [3.0, 1.0, 2.0, 0.5], paired=True)
    assert seen == [(0, True), (1, True), (1, False), (3, True)] and dumps == 4
    seen, dumps = fit_with_checkpoints(tmp_path / "alone", [3.0, 1.0, 2.0, 0.5], paired=False)
    assert seen == [(0, False), (1, False), (1, False), (3, False)] and dumps == 3  # without a last: written itself


def test_checkpoints_are_written_while_training_goes_on_and_a_failed_write_fails_the_run(
    tmp_path: Path, tracking_uri: str, monkeypatch
) -> None:
    """A save that takes 1.5 s does not hold the next epoch back, and every file is there when fit returns; a save
    that fails fails the run (FAILED, with the reason), as a write on the training thread would."""
    import time as clock

    save, starts = AtomicCheckpointIO.save_checkpoint, []

    def slow(io, checkpoint, path, storage_options=None):
        clock.sleep(1.5)
        save(io, checkpoint, path, storage_options)

    class Starts(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            starts.append(clock.perf_counter())

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            starts.append(clock.perf_counter())

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", slow)
    args = [*tiny_args(tracking_uri, tmp_path, epochs=2), "--fit.test", "false", "--trainer.limit_train_batches", "3"]
    result = run_training(parse_config(args), callbacks=[Starts()])
    assert starts[2] - starts[1] < 1.0  # epoch 0's end to epoch 1's start, its checkpoint still being written
    assert read_checkpoint(result.best_checkpoint)["epoch"] in (0, 1)  # written whole, whichever epoch was best
    (last,) = (tmp_path / "checkpoints").rglob("last.ckpt")
    assert read_checkpoint(last)["epoch"] == 1

    def full(io, checkpoint, path, storage_options=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", full)
    with pytest.raises(OSError, match="No space left on device"):
        run_training(parse_config([*args, "--fit.checkpoint_dir", str(tmp_path / "full")]))
    failed = [run for run in all_runs(tracking_uri) if run.info.run_id != result.run_id]
    assert [run.info.status for run in failed] == ["FAILED"]
    assert "No space left on device" in failed[0].data.tags["failure_reason"]


def test_a_checkpoint_saved_under_two_names_renames_the_extra_one_first(tmp_path: Path, monkeypatch) -> None:
    """A kill between the renames then leaves best newer than last, as when best was written first (a resume redoes
    the epoch and writes it again), never an older best.ckpt under a newer record of it."""
    import os

    renamed, rename = [], os.replace
    monkeypatch.setattr("os.replace", lambda source, target: renamed.append(Path(target).name) or rename(source, target))
    AtomicCheckpointIO().save_checkpoint({"epoch": 4}, tmp_path / "last.ckpt", {"also_as": [str(tmp_path / "best.ckpt")]})
    assert renamed == ["best.ckpt", "last.ckpt"] and (tmp_path / "best.ckpt").samefile(tmp_path / "last.ckpt")


def test_a_file_system_without_hard_links_gets_a_copy(tmp_path: Path, monkeypatch) -> None:
    from aevae.checkpoints import same_file_as

    source, target = tmp_path / "last.ckpt", tmp_path / "best.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.arange(5.0)}}, source)
    target.write_bytes(b"older")

    def no_links(*args):
        raise OSError("Operation not permitted")

    monkeypatch.setattr("os.link", no_links)
    same_file_as(source, target)
    assert target.read_bytes() == source.read_bytes() and not target.samefile(source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]  # no partial file left


def test_unwritable_or_full_folders_fail_before_any_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    def train(*args: str) -> str:  # `aevae train` in this process: its exit code must be 2, its stderr one line
        code, _, err = aevae_here(capfd, "train", *args)
        assert code == 2, err
        assert len(err.strip().splitlines()) == 1, err
        return err

    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    err = train(*tiny_args(uri, tmp_path), "--fit.checkpoint_dir", str(blocker / "ckpt"))
    assert f"fit.checkpoint_dir: cannot create {blocker / 'ckpt'}" in err
    assert not all_runs(uri)

    err = train(*tiny_args(f"sqlite:///{blocker / 'mlflow.db'}", tmp_path))
    assert f"tracking.uri: cannot create {blocker}" in err

    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)]).returncode:
        pytest.fail("mounting a 1 MiB tmpfs needs root, as in CI")
    try:
        err = train(*tiny_args(uri, small))
        assert f"fit.checkpoint_dir: {small / 'checkpoints'} has 1 MiB free; checkpoints need about" in err
        assert not all_runs(uri)
    finally:
        subprocess.run(["umount", str(small)])
