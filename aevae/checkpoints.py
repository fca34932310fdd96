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
    leaves the previous checkpoint intact and never a file that looks complete but is not."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return read_checkpoint(path, map_location=map_location or "cpu")


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
