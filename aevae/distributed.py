"""What changes with the number of devices: the batch-size rule and proof that ranks agree."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from aevae.errors import UsageError


def world_size(devices: Any, num_nodes: int | None) -> int:
    """Processes in a run from the trainer's `devices` (int, list or "auto") and `num_nodes`."""
    if isinstance(devices, (list, tuple)):
        per_node = len(devices)
    elif isinstance(devices, str) and devices.isdigit():
        per_node = int(devices)
    elif isinstance(devices, int) and devices > 0:
        per_node = devices
    elif devices in (None, "auto", 1):
        per_node = 1
    else:
        raise UsageError(f"trainer.devices: give a device count or list to scale the batch, got {devices!r}")
    return per_node * (num_nodes or 1)


def scale_batch(
    batch_size: int, lr: float, source_world: int, target_world: int, scale_lr: bool
) -> tuple[int, float]:
    """Per-device batch size and learning rate on target_world processes.

    Default: keep the global batch (batch_size * source_world) and the learning rate, so the
    optimisation is the same problem; the global batch must divide by the new world size.
    scale_lr: keep the per-device batch and scale the learning rate linearly with the global batch
    (Goyal et al. 2017).
    """
    if scale_lr:
        return batch_size, lr * target_world / source_world
    global_batch = batch_size * source_world
    if global_batch % target_world:
        raise UsageError(
            f"--devices: the global batch {global_batch} does not divide over {target_world} processes; "
            "choose a device count that divides it, or pass --scale-lr"
        )
    return global_batch // target_world, lr


def keep_step_records_per_rank(module: torch.nn.Module) -> None:
    """Keep each rank's own step record (the buffers of its StepRecord: the epoch's train sums, skips, divergence)
    out of DDP's buffer broadcast. DDP would copy rank 0's into every rank at each training forward, and the
    train/* epoch means, summed over ranks, would count rank 0's batches on every rank and lose the others'."""
    from torch.nn.parallel import DistributedDataParallel

    from aevae.step_record import StepRecord

    names = [
        f"{prefix}.{buffer}" for prefix, sub in module.named_modules() if isinstance(sub, StepRecord)
        for buffer, _ in sub.named_buffers()
    ]  # fmt: skip
    ignored = list(getattr(module, "_ddp_params_and_buffers_to_ignore", []))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignored + names)


class RankAgreement(pl.Callback):
    """With more than one process, measure at the end of fit that every rank saw the same validation loss each epoch
    and holds the same weights; rank 0 logs both spreads (0 when DDP works) and the world size."""

    def __init__(self) -> None:
        self.val_loss_spread = 0.0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:  # before the strategy wraps the model in DDP
            keep_step_records_per_rank(pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size == 1 or trainer.sanity_checking or "val/loss" not in trainer.callback_metrics:
            return
        losses = pl_module.all_gather(trainer.callback_metrics["val/loss"].detach().float())
        self.val_loss_spread = max(self.val_loss_spread, float(losses.max() - losses.min()))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size == 1:
            return
        weights = torch.cat([p.detach().float().flatten() for p in pl_module.parameters()])
        gathered = pl_module.all_gather(weights).reshape(trainer.world_size, -1)
        weight_spread = float((gathered - gathered[0]).abs().max())
        if trainer.logger is not None:
            trainer.logger.log_metrics(
                {
                    "ddp/world_size": float(trainer.world_size),
                    "ddp/val_loss_rank_spread": self.val_loss_spread,
                    "ddp/weight_max_abs_diff": weight_spread,
                }
            )
