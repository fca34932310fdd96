"""What training steps leave behind between host reads: the epoch's running sums, the first non-finite step with its
loss, the last finite loss before it, and the count of skipped batches; on the device, or in Python numbers."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class StepRecord(nn.Module):
    """The record of an epoch's training steps, kept one of two ways (chosen by ``start``):

    - on the device (accelerators, compiled and captured steps): buffers updated in place by tensor operations, so
      a step never waits for a read, and a captured CUDA graph updates the same memory on each replay. Buffers, not
      persistent: they follow the model to its device and stay out of checkpoints.
    - on the host (an eager step whose record is read every step, as on a CPU): one read of the step's loss terms,
      then Python arithmetic, instead of about twenty small tensor operations (0.1 ms of a tiny model's 1.5 ms step).

    Both add the same float64 products in the same order, so their sums are equal bit for bit (tests/test_steps.py).
    Read it through first_bad_step, bad_loss, last_finite_loss, skipped and take_sums.
    """

    def __init__(self, terms: int) -> None:
        super().__init__()
        self.register_buffer("sums", torch.zeros(terms + 1, dtype=torch.float64), persistent=False)  # terms*n, n
        self.register_buffer("step", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("first_bad", torch.full((), -1, dtype=torch.int64), persistent=False)
        self.register_buffer("bad", torch.zeros(()), persistent=False)
        self.register_buffer("last_finite", torch.full((), math.nan), persistent=False)
        self.register_buffer("skips", torch.zeros((), dtype=torch.int64), persistent=False)
        self.on_host = False
        self._host = HostNumbers(terms, 0)
        self._host_flags = (torch.tensor(False), torch.tensor(True))  # update's 'bad' flags on the host, never written

    def start(self, global_step: int, on_host: bool = False) -> None:
        """At the start of fit: count steps from the trainer's global step, on the host or on the device."""
        self.on_host = on_host
        if on_host:
            self._host = HostNumbers(len(self.sums) - 1, global_step)
        else:
            self.step.fill_(global_step)  # one host-to-device copy

    def update(self, summary: Tensor, n: int, loss: Tensor) -> Tensor:
        """Add one step: summary (per-image means of the loss terms) weighted by n images, unless the loss is not
        finite; then record the step instead. Returns the flag 'this step is bad' (a tensor on loss's device)."""
        if self.on_host:
            return self._host_flags[self._host.update(summary, n, float(loss.detach()))]
        loss = loss.detach().float()
        finite = torch.isfinite(loss)
        bad = ~finite
        clean = torch.where(finite, summary.detach().double(), 0.0)  # where, not a product: nan * 0 is nan
        weight = finite.double() * n
        self.sums[:-1].add_(clean * weight)
        self.sums[-1:].add_(weight)
        no_bad_yet = self.first_bad < 0
        self.last_finite.copy_(torch.where(finite & no_bad_yet, loss, self.last_finite))
        self.bad.copy_(torch.where(bad & no_bad_yet, loss, self.bad))
        self.first_bad.copy_(torch.where(bad & no_bad_yet, self.step, self.first_bad))
        self.skips.add_(bad.long())
        self.step.add_(1)
        return bad

    def count_skip(self, skipped: Tensor) -> None:
        """A step skipped after its loss was recorded (its gradients were not finite)."""
        if self.on_host:
            self._host.skips += int(skipped)
        else:
            self.skips.add_(skipped.long())

    def take_sums(self) -> Tensor:
        """The epoch's sums (float64, on the record's device), and a fresh start for the next epoch."""
        if self.on_host:
            sums, self._host.sums = self._host.sums, [0.0] * len(self._host.sums)
            return torch.tensor(sums, dtype=torch.float64)
        sums = self.sums.clone()
        self.sums.zero_()
        return sums

    # --- reads (each a host read on the device record) ---
    def first_bad_step(self) -> int:
        """The global step of the first non-finite loss since fit started; -1 if none."""
        return self._host.first_bad if self.on_host else int(self.first_bad)

    def bad_loss(self) -> float:
        return self._host.bad if self.on_host else float(self.bad)

    def last_finite_loss(self) -> float:
        """The last finite loss before the first non-finite one (nan before any finite loss)."""
        return self._host.last_finite if self.on_host else float(self.last_finite)

    def skipped(self) -> int:
        return self._host.skips if self.on_host else int(self.skips)


class HostNumbers:
    """The record as Python numbers (floats are float64, as the device record's sums)."""

    def __init__(self, terms: int, step: int) -> None:
        self.sums = [0.0] * (terms + 1)
        self.step, self.first_bad, self.bad, self.last_finite, self.skips = step, -1, 0.0, math.nan, 0

    def update(self, summary: Tensor, n: int, loss: float) -> bool:
        bad = not math.isfinite(loss)
        if bad:
            self.skips += 1
            if self.first_bad < 0:
                self.first_bad, self.bad = self.step, loss
        else:
            sums = self.sums
            for i, value in enumerate(summary.tolist()):
                sums[i] += value * n
            sums[-1] += n
            if self.first_bad < 0:
                self.last_finite = loss
        self.step += 1
        return bad
