"""What an epoch reports: exact per-image means of the loss terms over the train, val and test splits, logged once
an epoch for Lightning's callbacks and written to the run, one store write an epoch."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from aevae.batches import BatchRun
from aevae.errors import TrainingDiverged
from aevae.likelihoods import bits_per_dim

if TYPE_CHECKING:
    from aevae.models import LossTerms

ACTIVE_UNIT_KL = 0.01  # nats: a latent dimension with more average KL than this is "active"


class EpochMetrics:
    """Evaluation steps and per-epoch metrics, mixed into every aevae LightningModule.

    The model provides loss_terms, _summary, kind, image_shape, observation, nonfinite_policy, record (a StepRecord),
    check_divergence, and the attributes _epoch_sums (val and test running sums) and _held_val.
    """

    def _accumulate(self, stage: str, terms: LossTerms, n: int) -> None:
        """Running sums for exact per-image epoch means of val/test (no per-step sync or logging)."""
        summary = self._summary(terms).detach().double()
        increment = torch.cat([summary * n, summary.new_tensor([float(n)])])
        running = self._epoch_sums.get(stage)
        self._epoch_sums[stage] = increment if running is None else running + increment

    def _step(self, batch: tuple[Tensor, Tensor] | BatchRun, stage: str) -> None:
        """Evaluate a batch, or a run of them (fit.steps_per_call). Lightning's sanity check takes its
        num_sanity_val_steps batches as a count of runs: there, a run's first batch only, as one batch a call."""
        for _, (x, _) in batch if isinstance(batch, BatchRun) else [(0, batch)]:
            self._accumulate(stage, self.loss_terms(x, self(x)), len(x))
            if self._trainer is not None and self.trainer.sanity_checking:
                break

    def validation_step(self, batch: tuple[Tensor, Tensor] | BatchRun, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor] | BatchRun, batch_idx: int) -> None:
        self._step(batch, "test")

    def _log_epoch(self, stage: str) -> None:
        """Exact per-image means over the epoch, summed across ranks, logged once per epoch."""
        if stage == "train":
            try:
                self.check_divergence()  # before the epoch's checkpoint is written
            except TrainingDiverged:
                self._write_held_val()
                raise
        sums = self.record.take_sums() if stage == "train" else self._epoch_sums.pop(stage, None)
        if sums is None:
            return
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        if float(sums[-1]) == 0:  # every batch skipped, or none run
            return
        means = sums[:-1] / sums[-1]
        loss, reconstruction, kl, kl_per_dim = means[0], means[1], means[2], means[3:]
        # "step" makes the epoch, not the optimizer step, the x-axis of every aevae metric in MLflow.
        metrics = {"step": float(self.current_epoch), f"{stage}/loss": loss, f"{stage}/recon": reconstruction}
        if stage == "train" and self.nonfinite_policy == "skip":
            metrics["train/skipped_batches"] = float(self.record.skipped())
        if self.kind == "vae":
            metrics[f"{stage}/kl"] = kl
            metrics[f"{stage}/nelbo"] = reconstruction + kl
            metrics[f"{stage}/bpd"] = bits_per_dim(reconstruction + kl, math.prod(self.image_shape), self.observation)
            metrics[f"{stage}/active_units"] = (kl_per_dim > ACTIVE_UNIT_KL).sum().float()
            metrics.update({f"{stage}/kl_dim_{i}": value for i, value in enumerate(kl_per_dim)})
        # Already summed over ranks, so identical everywhere; sync_dist=True only tells Lightning so. For callbacks
        # (checkpoints, early stopping, pruning) and results; the run's record is written by _write_epoch.
        self.log_dict(metrics, prog_bar=False, logger=False, sync_dist=True)
        if stage == "val":
            self.log("val_loss", loss, prog_bar=True, logger=False, sync_dist=True)
        values = {key: float(value) for key, value in metrics.items() if key != "step"}
        self._write_epoch(stage, int(self.current_epoch), values)

    def _write_epoch(self, stage: str, epoch: int, metrics: dict[str, float]) -> None:
        """Write an epoch's metrics to the run, at step = epoch. val's wait for train's, which come at the end of the
        same epoch, before its checkpoints are written: one store write an epoch, and a checkpoint of an epoch
        never exists without that epoch's metrics in the run. Lightning's sanity check is not recorded."""
        if self._trainer is None or self.trainer.sanity_checking:
            return
        held, self._held_val = self._held_val, None
        if stage == "val":
            self._held_val = (epoch, metrics)  # a held one from earlier (trainer.val_check_interval) goes out below
        elif held is not None and held[0] == epoch:
            held, metrics = None, {**held[1], **metrics}
        if held is not None:
            self._write_to_run(*held)
        if stage != "val":
            self._write_to_run(epoch, metrics)

    def _write_held_val(self) -> None:
        held, self._held_val = self._held_val, None
        if held is not None:
            self._write_to_run(*held)

    def _write_to_run(self, epoch: int, metrics: dict[str, float]) -> None:
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=epoch)

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_train_end(self) -> None:
        self._write_held_val()  # a validation that no training epoch end followed

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")
