"""Checkpoints that survive a kill: atomic writes, safe and checked reads, RNG state for exact resume."""

from __future__ import annotations

import os
import pickle
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from aevae.errors import UsageError
from aevae.tracking import writable_folder


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load tensors and plain values only (weights_only: nothing in the file is executed)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"checkpoint {path} is truncated or corrupt ({reason[:200]})") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UsageError(f"checkpoint {path} is not a Lightning checkpoint (no state_dict)")
    return checkpoint


def describe(hyper_parameters: dict[str, Any]) -> str:
    kind = "vae" if "kl_weight" in hyper_parameters else "ae"
    return f"{kind} latent_dim {hyper_parameters.get('latent_dim')} hidden_dims {hyper_parameters.get('hidden_dims')}"


def check_compatible(checkpoint: dict[str, Any], model: torch.nn.Module, path: str | Path) -> None:
    """The checkpoint's weights must fit the model the config builds, tensor for tensor."""
    expected = {key: value.shape for key, value in model.state_dict().items()}
    found = {key: value.shape for key, value in checkpoint["state_dict"].items()}
    if expected != found:
        saved = describe(checkpoint.get("hyper_parameters", {}))
        wanted = describe(dict(getattr(model, "hparams", {})))
        raise UsageError(f"checkpoint {path} holds a {saved}; the config builds a {wanted}")


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Put a checkpoint's weights into the model, after checking they belong to it."""
    checkpoint = read_checkpoint(path, map_location=next(model.parameters()).device)
    check_compatible(checkpoint, model, path)
    model.load_state_dict(checkpoint["state_dict"])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file beside the target, fsync, then rename over it: a kill during a save
    leaves the previous checkpoint intact and never a file that looks complete but is not.

    ``storage_options={"also_as": [path, ...]}`` makes those paths the same checkpoint (same_file_as), renamed into
    place before the target itself: a kill between the renames leaves them newer than the target, as when they
    were written first."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            for also in (storage_options or {}).get("also_as", ()):
                same_file_as(partial, Path(also))
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return read_checkpoint(path, map_location=map_location or "cpu")


def same_file_as(source: Path, target: Path) -> None:
    """Make target the same file as source, atomically: a hard link renamed over it (no bytes written), or a synced
    copy where the file system has no hard links. Checkpoints are only ever replaced by a rename, never rewritten in
    place, so the two names part when the next checkpoint of either is written."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    partial.unlink(missing_ok=True)
    try:
        try:
            os.link(source, partial)
        except OSError:
            with open(source, "rb") as read, open(partial, "wb") as write:
                shutil.copyfileobj(read, write)
                write.flush()
                os.fsync(write.fileno())
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


class BestCheckpoint(ModelCheckpoint):
    """Lightning's top-k checkpoint, not written twice in an epoch that improves it when a LastCheckpoint follows it:
    its file is then that epoch's last checkpoint (AtomicCheckpointIO's also_as), dumped after this callback's state
    was updated, so with the same weights, optimizer, RNG and callback state. An epoch-end that writes no last
    checkpoint writes the best one itself."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.paired = False
        self.due: str | None = None  # decided at this epoch-end, written with the last checkpoint

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if not self.paired:
            super()._save_checkpoint(trainer, filepath)
            return
        self.due = filepath  # the parent's bookkeeping, without its write
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath

    def write_due(self, trainer: pl.Trainer) -> None:
        """A best checkpoint still due at the end of an epoch-end (no last checkpoint was written): written now."""
        if self.due is not None:
            path, self.due = self.due, None
            save_and_tell(trainer, self, path)


class LastCheckpoint(ModelCheckpoint):
    """The checkpoint of every epoch (last.ckpt), resumed from by --fit.resume; it runs after ``best`` (Lightning keeps
    checkpoint callbacks in their order) and writes a best checkpoint due at the same step as the same file."""

    def __init__(self, best: BestCheckpoint, **kwargs: Any) -> None:
        super().__init__(filename="last", save_top_k=1, enable_version_counter=False, **kwargs)
        self.best = best
        best.paired = True

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        due, self.best.due = self.best.due, None
        save_and_tell(trainer, self, filepath, also=self.best if due else None, also_as=due or "")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self.best.write_due(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self.best.write_due(trainer)


def save_and_tell(
    trainer: pl.Trainer, callback: ModelCheckpoint, path: str, also: ModelCheckpoint | None = None, also_as: str = ""
) -> None:
    """What ModelCheckpoint._save_checkpoint does (the write, its bookkeeping, the loggers told), for one file that
    may also be ``also``'s checkpoint at ``also_as``."""
    options = {"also_as": [also_as]} if also_as else None
    trainer.save_checkpoint(path, callback.save_weights_only, storage_options=options)
    callback._last_global_step_saved = trainer.global_step
    callback._last_checkpoint_saved = path
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            for saved in (callback, also):
                if saved is not None:
                    logger.after_save_checkpoint(saved)


class RandomState(pl.Callback):
    """Save the global RNGs (torch, numpy, Python) with each checkpoint and restore them on resume,
    so a resumed run draws the same batches and the same VAE noise as an uninterrupted one.
    Stored as tensors and plain values, so checkpoints still load with weights_only=True."""

    def state_dict(self) -> dict[str, Any]:
        kind, keys, position, has_gauss, cached = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
            "python": random.getstate(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        kind, keys, position, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))


def check_room_for_checkpoints(model: torch.nn.Module, folder: Path) -> None:
    """Before training: the folder must be creatable and writable, with room for last, best and one
    in-flight checkpoint (weights and two Adam moments each), so a full disk fails now, not at epoch 30."""
    writable_folder(folder, "fit.checkpoint_dir")
    one = 3 * 4 * sum(p.numel() for p in model.parameters())
    need = 3 * one + 16 * 2**20
    free = shutil.disk_usage(folder).free
    if free < need:
        raise UsageError(
            f"fit.checkpoint_dir: {folder} has {free / 2**20:.0f} MiB free; checkpoints need about {need / 2**20:.0f} MiB"
        )
