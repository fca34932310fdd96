"""How a training step runs under Lightning: what it leaves on the device (epoch sums, divergence, skips), runs of
batches a call, and which step runner (aevae.step_runners) it uses. A tensor is read back to the host only where
this module says so: every step on a CPU, at intervals on an accelerator."""

from __future__ import annotations

import math
import os
import shutil
from typing import Any

import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from torch import Tensor

from aevae.batches import BatchRun, IndexBatches, whole_epochs
from aevae.errors import TrainingDiverged, UsageError
from aevae.step_runners import CompiledStep, CudaGraphStep, EagerStep

COMPILE_MODES = ("none", "compile", "reduce-overhead", "cudagraph")
CUDA_ONLY_MODES = ("reduce-overhead", "cudagraph")  # both replay CUDA graphs
DEVICE_CHECK_EVERY = 100  # on an accelerator, steps between host reads of the divergence record (CPU: every step)
BAR_EVERY = 50  # on an accelerator, steps between progress-bar loss updates (each one a host read)
AUTO_STEPS_PER_CALL = 8  # fit.steps_per_call=auto: training batches a training_step takes where runs fit


CAPTURABLE_PRECISIONS = ("32-true", "32", "bf16-mixed")


def host_read_interval(device: torch.device) -> int:
    """Steps between host reads of the step record: every step on a CPU, where a read costs nothing; on an
    accelerator every DEVICE_CHECK_EVERY steps, since each read waits for the device to finish its queue."""
    return 1 if device.type == "cpu" else DEVICE_CHECK_EVERY


def check_compile(mode: str, precision: str, trainer: Any) -> None:
    """Refuse, before any run exists, a compiled or captured step where it cannot train the same model as eager."""
    if mode == "none":
        return
    field, device = f"fit.compile={mode}", trainer.strategy.root_device
    if trainer.world_size > 1:
        processes = trainer.world_size
        raise UsageError(f"{field}: runs on one device; this trainer has {processes} processes (use none under DDP)")
    if precision not in CAPTURABLE_PRECISIONS:
        raise UsageError(f"{field}: takes trainer.precision 32-true or bf16-mixed, got {precision}")
    if trainer.accumulate_grad_batches != 1 or trainer.gradient_clip_val:
        raise UsageError(
            f"{field}: optimizes manually, without trainer.accumulate_grad_batches or trainer.gradient_clip_val"
        )
    if mode in CUDA_ONLY_MODES and device.type != "cuda":
        raise UsageError(f"{field}: needs a CUDA device; this trainer runs on {device.type} (use compile there)")
    if mode == "compile" and device.type == "cpu" and shutil.which("c++") is None:
        raise UsageError(f"{field}: torch.compile on the CPU needs a C++ compiler (c++) on the PATH")


def manual_eager_fits(precision: str, trainer: Any) -> bool:
    """Whether the eager step can optimize manually: one process, no clipping or accumulation (Lightning's
    automatic loop does those), and no fp16 loss scaler (it decides steps on the host)."""
    return (
        trainer.world_size == 1
        and precision in CAPTURABLE_PRECISIONS
        and trainer.accumulate_grad_batches == 1
        and not trainer.gradient_clip_val
    )


def steps_per_call(setting: int | str, manual: bool, trainer: Any, cut_in_memory: bool) -> int:
    """fit.steps_per_call resolved: training batches one training_step takes, one optimizer step each.

    Runs of several batches need what Lightning counts in batches to count the same in runs: a manual step
    (Lightning's automatic loop steps once a call), batches cut from memory, and no batch-counted limit or
    validation interval. ``auto`` takes AUTO_STEPS_PER_CALL where all of that holds and 1 elsewhere; a number
    above 1 where it does not hold is refused, naming the setting in the way.
    """
    in_the_way = []
    if not manual:
        in_the_way.append("a step under Lightning's automatic optimization (DDP, gradient clipping or accumulation, fp16)")
    if not cut_in_memory:
        in_the_way.append("data.num_workers > 0 (batches from a DataLoader)")
    if not whole_epochs(trainer.limit_train_batches):
        in_the_way.append(f"trainer.limit_train_batches={trainer.limit_train_batches} (counts Lightning's batches)")
    if not whole_epochs(trainer.val_check_interval):
        in_the_way.append(f"trainer.val_check_interval={trainer.val_check_interval} (counts Lightning's batches)")
    if setting == "auto":
        return 1 if in_the_way else AUTO_STEPS_PER_CALL
    if setting > 1 and in_the_way:
        raise UsageError(f"fit.steps_per_call={setting}: runs one batch a call with {in_the_way[0]}; set 1 or auto")
    return int(setting)


class TrainingSteps:
    """The training step of every aevae model, mixed into its LightningModule: eager under Lightning's automatic
    optimization, or compiled/captured under manual optimization. Divergence, skips and the epoch's sums go to a
    StepRecord, read every step on a CPU (where an eager step keeps it on the host), every DEVICE_CHECK_EVERY steps
    and at each epoch's end on an accelerator.

    The model provides loss_terms, _summary, beta, record (a StepRecord) and the buffers beta_now and found_inf.
    """

    # Lightning sets _current_fx_name around every hook it calls, about 40 times a step, and nn.Module.__setattr__
    # checks each value against parameters, buffers and modules (~3 us); these names are none of them.
    _PLAIN_ATTRIBUTES = frozenset(
        {"_current_fx_name", "_found_bad", "_batch_in_epoch", "_batches_per_epoch", "bar_loss", "_bar_shown"}
    )

    def __setattr__(self, name: str, value: object) -> None:
        if name in TrainingSteps._PLAIN_ATTRIBUTES:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def configure_step(self, compile_mode: str, manual: bool) -> None:
        """fit.compile: ``none`` (eager), ``compile`` (torch.compile of forward, loss and backward),
        ``reduce-overhead`` (the same, replayed through inductor's CUDA graphs) or ``cudagraph`` (the whole step
        captured in one CUDA graph), optimizing manually or under Lightning's automatic optimization as ``manual``
        says (aevae.training.optimizes_manually: all but eager always manually)."""
        self.compile_mode = compile_mode
        runners = {
            "none": EagerStep,
            "compile": lambda step: CompiledStep(step),
            "reduce-overhead": lambda step: CompiledStep(step, mode="reduce-overhead"),
            "cudagraph": CudaGraphStep,
        }
        self.automatic_optimization = not manual
        self.step_runner = runners[compile_mode](self._forward_backward) if manual else None

    def on_train_start(self) -> None:
        self.check_every = host_read_interval(self.device)
        # Read every step, and not traced by torch.compile: the record can live on the host.
        self.record.start(self.global_step, on_host=self.check_every == 1 and self.compile_mode == "none")
        self._bar_shown = self.trainer.progress_bar_callback is not None

    def training_step(self, batch: tuple[Tensor, Tensor] | BatchRun, batch_idx: int) -> Tensor | None:
        if not isinstance(batch, BatchRun):
            return self._train_on(batch[0])
        loss, self._batches_per_epoch = None, batch.per_epoch
        try:
            for self._batch_in_epoch, (x, _) in batch:  # fit.steps_per_call: one optimizer step a batch
                if 0 <= self.trainer.max_steps <= self.global_step:
                    break  # trainer.max_steps falls inside this run
                loss = self._train_on(x)
        finally:
            self._batch_in_epoch = None
        return loss

    def epochs_done(self) -> float:
        """Epochs trained before this step, counting batches (the clock of the beta warm-up)."""
        if self._batch_in_epoch is not None:
            return self.current_epoch + self._batch_in_epoch / self._batches_per_epoch
        batches_done = self.trainer.fit_loop.epoch_loop.batch_progress.current.completed
        return self.current_epoch + batches_done / max(1, int(self.trainer.num_training_batches))

    def _train_on(self, x: Tensor) -> Tensor | None:
        beta = self.beta()
        if beta != self._beta_filled:  # a device write, read inside the (captured) step: never frozen there
            self.beta_now.fill_(beta)
            self._beta_filled = beta
        if self.step_runner is not None:  # manual optimization: eager, compiled or captured
            loss = self._run_captured(x)  # detached, for callbacks' outputs; None from a CUDA graph
        else:
            terms = self.loss_terms(x, self(x))
            self._found_bad = self.record.update(self._summary(terms), len(x), terms.loss)
            loss = terms.loss
        self._after_step()
        return loss

    def _forward_backward(self, x: Tensor) -> Tensor:
        """The compiled or captured part of a step: forward, loss, its record, backward, the skip flag."""
        terms = self.loss_terms(x, self(x))
        bad = self.record.update(self._summary(terms), len(x), terms.loss)
        terms.loss.backward()
        if self.nonfinite_policy == "skip":
            self.found_inf.copy_(self._skip_flag(bad).float())
        return terms.loss.detach()

    def _run_captured(self, x: Tensor) -> Tensor | None:
        # The raw optimizer steps, and Lightning counts the step (global_step, its progress) as its own
        # LightningOptimizer.step would. That wrapper's other work, about 0.1 ms a step on a CPU, is the
        # on_before_optimizer_step hooks (none of aevae's callbacks has one; the model's does nothing under a
        # manual step) and gradient clipping (refused under a manual step).
        lightning_optimizer = self.optimizers()
        optimizer = lightning_optimizer.optimizer
        if self.nonfinite_policy == "skip":
            optimizer.found_inf = self.found_inf  # the fused kernel skips on the device
        lightning_optimizer._on_before_step()
        loss = self.step_runner(x, optimizer)
        lightning_optimizer._on_after_step()
        return loss

    def _skip_flag(self, loss_bad: Tensor) -> Tensor:
        """fit.on_nonfinite=skip: this step is skipped when its loss or its gradients are not finite (device flag);
        a step skipped for its gradients alone is counted here (its loss was counted by the record)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        grads_bad = ~torch.isfinite(torch.nn.utils.get_total_norm(grads)) if grads else torch.zeros_like(loss_bad)
        self.record.count_skip(grads_bad & ~loss_bad)
        return loss_bad | grads_bad

    def _after_step(self) -> None:
        every = self.check_every
        step = 0 if every == 1 else self.global_step  # read every step (a CPU): no need to ask Lightning's count
        if self.nonfinite_policy == "stop" and (step + 1) % every == 0:
            self.check_divergence()
        if self._bar_shown and step % (1 if every == 1 else BAR_EVERY) == 0:
            self.bar_loss = self.record.last_finite_loss()  # on an accelerator, the one host read a bar update costs

    def check_divergence(self) -> None:
        """Under fit.on_nonfinite=stop, fail at the first non-finite loss the record holds, naming its step. The run
        fails with this message and its last good checkpoint stays: this also runs before each epoch's checkpoint."""
        if self.nonfinite_policy != "stop":
            return
        first = self.record.first_bad_step()
        if first < 0:
            return
        last = self.record.last_finite_loss()
        last_text = "none" if math.isnan(last) else f"{last:.6g}"
        raise TrainingDiverged(
            f"training diverged at epoch {self.current_epoch}, step {first}: loss is {self.record.bad_loss()}; "
            f"last finite loss {last_text}"
        )

    @property
    def skipped_batches(self) -> int:
        return self.record.skipped() if self.nonfinite_policy == "skip" else 0

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Only the skip policy needs finite gradients before the step. Under "stop", a non-finite gradient makes
        # the next loss non-finite, which stops training; and fp16 loss scaling, which skips steps with inf
        # gradients by design, is left to do its job.
        if self.nonfinite_policy != "skip" or self.step_runner is not None:
            return
        skip = self._skip_flag(self._found_bad)
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            self.found_inf.copy_(skip.float())
            optimizer.found_inf = self.found_inf  # the fused kernel skips on the device: no host sync
        elif bool(skip):  # an optimizer without that: decide on the host
            optimizer.zero_grad(set_to_none=True)  # skipping: the optimizer leaves grad-less weights alone


class StepLossBar(TQDMProgressBar):
    """Lightning's progress bar, counting batches (not runs of them, under fit.steps_per_call; runs in the sanity
    check, which evaluates one batch a run) and showing the loss the model last read back (every step on a CPU,
    every BAR_EVERY steps on an accelerator) instead of a logged tensor, which the bar would read back, and sync on,
    every step."""

    @property
    def total_train_batches(self) -> int | float:
        return batches_in(self.trainer.train_dataloader) or super().total_train_batches

    @property
    def total_val_batches_current_dataloader(self) -> int | float:
        in_runs = not self.trainer.sanity_checking and batches_in(self.trainer.val_dataloaders)
        return in_runs or super().total_val_batches_current_dataloader

    @property
    def total_test_batches_current_dataloader(self) -> int | float:
        return batches_in(self.trainer.test_dataloaders) or super().total_test_batches_current_dataloader

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, last_batch_index(batch, batch_idx))

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:  # fmt: skip
        if not trainer.sanity_checking:
            batch_idx = last_batch_index(batch, batch_idx)
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_test_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                          dataloader_idx: int = 0) -> None:  # fmt: skip
        super().on_test_batch_end(trainer, pl_module, outputs, batch, last_batch_index(batch, batch_idx), dataloader_idx)

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        if getattr(pl_module, "bar_loss", None) is not None:
            items["loss"] = f"{pl_module.bar_loss:.4g}"
        return items


def batches_in(loader: Any) -> int | None:
    """The batches of a loader that yields runs of them (None for any other loader)."""
    if isinstance(loader, IndexBatches) and loader.steps_per_call > 1:
        return loader.batch_count()
    return None


def last_batch_index(batch: Any, batch_idx: int) -> int:
    """Lightning's index of a batch, or of a run's last batch in its epoch."""
    return batch.first + len(batch) - 1 if isinstance(batch, BatchRun) else batch_idx


NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"


def plain_cuda_checks(user_value: str | None, strategy: str) -> None:
    """Undo `import lightning`'s PYTORCH_NVML_BASED_CUDA_CHECK=1 unless the user set it or the strategy forks.

    With it, every `torch.cuda.is_available()` dlopens NVML, and Adam's step asks once a step: about 0.5 ms a step
    on a CPU machine. It guards forks after CUDA is initialised; aevae forks only DataLoader workers, which never
    touch CUDA, so only the fork-based strategies keep it.
    """
    if user_value is None and "fork" not in strategy and "notebook" not in strategy:
        os.environ.pop(NVML_CHECK, None)
