"""The training step's machinery: batches without a DataLoader, data placement, no per-step host reads, divergence
named from the device record, and the compiled step training the same model as the eager one."""

from __future__ import annotations

import math
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from mlflow import MlflowClient
from torch.utils.data import DataLoader

import aevae
from aevae import steps
from aevae.batches import InMemoryImages, IndexBatches, device_placement, keep_batch
from aevae.data import ImageDataModule
from aevae.errors import UsageError
from aevae.models import LatentAutoencoder
from aevae.training import build_trainer, instantiate, parse_config, run_training
from conftest import REPO

DEMO = str(REPO / "experiments" / "vae_demo.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def small_config(tmp_path: Path, *extra: str):
    return parse_config([
        "--config", DEMO, "--model.hidden_dims", "[32]", "--model.latent_dim", "2", "--data.batch_size", "32",
        *QUIET, "--analysis.enabled", "false", "--fit.test", "false",
        "--tracking.uri", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}",
        "--fit.checkpoint_dir", str(tmp_path / "ckpt"), *extra,
    ])  # fmt: skip


# --- batches -----------------------------------------------------------------------------------


def numbered(n: int) -> InMemoryImages:
    return InMemoryImages(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), torch.arange(n))


def test_index_batches_are_the_dataloaders_batches() -> None:
    """Shuffled or not, the same batches as DataLoader(RandomSampler) from the same global RNG, epoch after epoch,
    the last short batch included: CPU runs train on exactly the batches they did before."""
    data = numbered(103)
    for shuffle in (True, False):
        torch.manual_seed(7)
        loader = DataLoader(data, batch_size=10, shuffle=shuffle, collate_fn=keep_batch)
        expected = [[labels.tolist() for _, labels in loader] for _epoch in range(3)]
        torch.manual_seed(7)
        batches = IndexBatches(data, batch_size=10, shuffle=shuffle)
        got = [[labels.tolist() for _, labels in batches] for _epoch in range(3)]
        assert got == expected and len(batches) == len(loader) == 11
        for images, labels in [*batches, *loader]:  # each image with its own label (image i holds the number i)
            assert images.flatten().tolist() == labels.float().tolist()
    assert expected[0] != expected[1] or not shuffle


@pytest.mark.parametrize(
    "setting,device,world,need,free,expected",
    [
        ("auto", "cpu", 1, 10, None, False),  # the CPU keeps its host tensors
        ("true", "cpu", 1, 10, None, False),
        ("false", "cuda:0", 1, 10, 100, False),
        ("auto", "cuda:0", 1, 50, 100, True),  # at most half the free memory
        ("auto", "cuda:0", 1, 51, 100, False),
        ("auto", "cuda:0", 2, 10, 100, False),  # DDP over host data unless asked
        ("true", "cuda:0", 2, 10, 100, True),  # each rank its shard
        ("true", "cuda:0", 1, 100, 100, True),
    ],
)
def test_device_placement(setting: str, device: str, world: int, need: int, free: int | None, expected: bool) -> None:
    assert device_placement(setting, torch.device(device), world, need, free) is expected


def test_device_placement_that_cannot_fit_is_one_line_with_the_sizes() -> None:
    with pytest.raises(UsageError, match=r"data.on_device: the splits take 3.00 GiB and cuda:0 has 2.00 GiB free"):
        device_placement("true", torch.device("cuda:0"), 1, 3 * 2**30, 2 * 2**30)


def test_on_device_takes_auto_true_false(tmp_path: Path) -> None:
    assert small_config(tmp_path, "--data.on_device", "true").data.on_device is True
    with pytest.raises(UsageError, match="data.on_device"):
        small_config(tmp_path, "--data.on_device", "maybe")


def test_ddp_shards_on_the_device_are_disjoint_and_cover_each_split() -> None:
    data = ImageDataModule(source="mnist-5k", split_seed=3)
    data.setup()
    for name, split in data.splits.items():
        shards = [data._shard(split, name, 3, rank).labels for rank in range(3)]
        assert sum(len(s) for s in shards) == len(split)
        images = torch.cat([data._shard(split, name, 3, rank).images for rank in range(3)])
        assert sorted(images.flatten(1).sum(1).tolist()) == sorted(split.images.flatten(1).sum(1).tolist())


# --- the step ------------------------------------------------------------------------------------


def test_the_record_on_the_host_keeps_what_the_device_record_keeps() -> None:
    """The same steps (finite, nan, finite, inf, finite) into both records: the same float64 sums bit for bit,
    checked against sums by hand, the same first bad step, its loss, the last finite loss before it, the skips."""
    from aevae.step_record import StepRecord

    steps_in = [([1.5, 0.25, 1 / 3], 128, 1.5), ([2.0, 1.0, 0.1], 128, math.nan), ([0.7, 0.2, 1e-7], 16, 0.7),
                ([9.0, 9.0, 9.0], 128, math.inf), ([0.3, 0.1, 0.2], 128, 0.3)]  # fmt: skip
    read = {}
    for on_host in (True, False):
        record = StepRecord(3)
        record.start(global_step=40, on_host=on_host)
        flags = [bool(record.update(torch.tensor(summary), n, torch.tensor(loss))) for summary, n, loss in steps_in]
        record.count_skip(torch.tensor(True))  # a step skipped for its gradients
        read[on_host] = (record.take_sums().tolist(), record.take_sums().tolist(), flags, record.first_bad_step(),
                         record.bad_loss(), record.last_finite_loss(), record.skipped())  # fmt: skip
    finite = [step for step in steps_in if math.isfinite(step[2])]
    by_hand = [sum(float(torch.tensor(summary)[i]) * n for summary, n, _ in finite) for i in range(3)]
    assert repr(read[True]) == repr(read[False])  # repr: a float's exact value, and nan equal to nan
    sums, next_epoch, flags, first_bad, bad_loss, last_finite, skipped = read[True]
    assert sums == [*by_hand, 272.0] and next_epoch == [0.0] * 4  # taken, then a fresh epoch
    assert flags == [False, True, False, True, False] and first_bad == 41 and math.isnan(bad_loss)
    assert last_finite == 1.5 and skipped == 3


class HostReads:
    """Counts tensor-to-host reads (item, bool, int, float) made inside training_step."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count, self.inside = 0, False
        for name in ("item", "__bool__", "__int__", "__float__"):
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self.count += self.inside
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_accelerator_steps_read_the_host_only_every_check_interval(tmp_path: Path, monkeypatch) -> None:
    """On an accelerator, steps leave the non-finite check and the epoch sums on the device: 100 steps with the
    record read every 25 steps make 4 reads (the CPU reads every step, where a read costs nothing)."""
    config = small_config(tmp_path, "--trainer.max_steps", "100", "--trainer.limit_val_batches", "0")
    model, data = instantiate(config)
    reads = HostReads(monkeypatch)
    step = model.training_step

    def watched(*args):
        reads.inside = True
        try:
            return step(*args)
        finally:
            reads.inside = False

    model.training_step = watched
    monkeypatch.setattr(steps, "host_read_interval", lambda device: 25)  # as on an accelerator
    build_trainer(config, logger=False).fit(model, datamodule=data)
    assert model.global_step == 100
    assert reads.count == 4


class PoisonAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            batch[0][0, 0, 0, 0] = float("nan")


def test_divergence_read_late_still_names_its_step(tmp_path: Path, monkeypatch) -> None:
    """The record keeps the first bad step and the last finite loss: a check 20 steps later names step 7."""
    config = small_config(tmp_path, "--trainer.max_steps", "40", "--trainer.limit_val_batches", "0")
    model, data = instantiate(config)
    monkeypatch.setattr(steps, "host_read_interval", lambda device: 20)
    losses: list[float] = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            losses.append(pl_module.record.last_finite_loss())

    trainer = build_trainer(config, logger=False, callbacks=[PoisonAt(7), Losses()])
    with pytest.raises(steps.TrainingDiverged, match=r"at epoch 0, step 7: loss is nan; last finite loss (\S+)") as err:
        trainer.fit(model, datamodule=data)
    assert model.global_step == 19  # read in the 20th step (before its update), not before
    assert f"last finite loss {losses[6]:.6g}" in str(err.value)


def test_lightning_nvml_check_is_undone_unless_the_user_set_it(tmp_path: Path, monkeypatch) -> None:
    config = small_config(tmp_path)
    monkeypatch.setenv(steps.NVML_CHECK, "1")  # as `import lightning` leaves it
    monkeypatch.setattr(aevae, "USER_NVML_CUDA_CHECK", None)
    build_trainer(config, logger=False)
    assert steps.NVML_CHECK not in os.environ
    monkeypatch.setenv(steps.NVML_CHECK, "1")
    monkeypatch.setattr(aevae, "USER_NVML_CUDA_CHECK", "1")
    build_trainer(config, logger=False)
    assert os.environ[steps.NVML_CHECK] == "1"


# --- compiled and captured steps -------------------------------------------------------------------


def step_losses(config) -> tuple[list[float], dict[str, float], object]:
    """Each step's loss, read by a callback after each training_step: configs here take one batch a call
    (fit.steps_per_call 1), so that is after every step."""
    losses: list[float] = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            losses.append(pl_module.record.last_finite_loss())

    result = run_training(config, callbacks=[Losses()])
    return losses, result.metrics, result


def test_compiled_step_trains_the_same_model_as_eager(tmp_path: Path) -> None:
    """200 seeded fp32 steps (a short last batch, and a beta warm-up that moves every step, included): the
    compiled step's losses within 1e-3 relative of eager's, the same per-epoch metrics, the same checkpoint keys."""
    args = ["--trainer.max_steps", "200", "--trainer.limit_val_batches", "4", "--model.kl_warmup_epochs", "2",
            "--fit.steps_per_call", "1"]  # fmt: skip
    eager_losses, eager_metrics, eager = step_losses(small_config(tmp_path / "eager", *args))
    compiled_losses, compiled_metrics, compiled = step_losses(
        small_config(tmp_path / "compiled", *args, "--fit.compile", "compile")
    )
    assert len(eager_losses) == len(compiled_losses) == 200
    assert eager.model.record.on_host and not compiled.model.record.on_host  # torch.compile traces the device record
    assert eager.trainer.num_training_batches * 32 > 3600  # 113 batches: the last is short
    worst = max(abs(a - b) / abs(a) for a, b in zip(eager_losses, compiled_losses))
    assert worst < 1e-3, worst
    assert eager_losses[-1] < eager_losses[0] - 100  # it trained
    for key in ("train/loss", "train/kl", "val/loss"):
        assert compiled_metrics[key] == pytest.approx(eager_metrics[key], rel=1e-3)
    assert torch.load(compiled.best_checkpoint, weights_only=True)["state_dict"].keys() == (
        torch.load(eager.best_checkpoint, weights_only=True)["state_dict"].keys()
    )
    client = MlflowClient(compiled.tracking_uri)
    assert client.get_run(compiled.run_id).data.params["fit.compile"] == "compile"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--fit.compile", "cudagraph"], "fit.compile=cudagraph: needs a CUDA device; this trainer runs on cpu"),
        (["--fit.compile", "reduce-overhead"], "fit.compile=reduce-overhead: needs a CUDA device; this trainer runs"),
        (["--fit.compile", "compile", "--trainer.precision", "16-mixed"], "takes trainer.precision 32-true or bf16"),
        (["--fit.compile", "compile", "--trainer.gradient_clip_val", "1.0"], "optimizes manually"),
        (["--fit.compile", "compile", "--trainer.devices", "2", "--trainer.strategy", "ddp"], "runs on one device"),
        (["--fit.steps_per_call", "4", "--trainer.limit_train_batches", "5"], "fit.steps_per_call=4: runs one batch a"),
    ],
)
def test_a_step_that_cannot_be_compiled_is_refused_before_any_run(tmp_path: Path, extra: list[str], message: str) -> None:
    config = small_config(tmp_path, *extra)
    with pytest.raises(UsageError, match=message):
        run_training(config)
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").rglob("*.ckpt"))
    db = tmp_path / "mlruns" / "mlflow.db"
    if db.exists():
        client = MlflowClient(f"sqlite:///{db}")
        assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_eager_step_optimizes_manually_and_trains_the_same_model_as_lightnings_loop(tmp_path: Path) -> None:
    """Where nothing needs Lightning's automatic loop, the eager step optimizes manually (fewer host calls a step);
    a gradient clip it cannot do keeps the automatic loop. A clip far above any gradient norm changes no step, so
    the two loops must give the same losses, step for step, and the same weights."""
    args = ["--trainer.max_steps", "60", "--trainer.limit_val_batches", "2", "--model.kl_warmup_epochs", "1",
            "--fit.steps_per_call", "1"]  # fmt: skip
    manual_losses, _, manual = step_losses(small_config(tmp_path / "manual", *args))
    auto_losses, _, auto = step_losses(small_config(tmp_path / "auto", *args, "--trainer.gradient_clip_val", "1e9"))
    assert not manual.model.automatic_optimization and auto.model.automatic_optimization
    assert manual.trainer.global_step == auto.trainer.global_step == 60
    assert manual_losses == pytest.approx(auto_losses, rel=1e-5)
    assert manual_losses[-1] < manual_losses[0] - 50  # it trained
    for name, weight in manual.model.state_dict().items():
        torch.testing.assert_close(weight, auto.model.state_dict()[name], rtol=1e-4, atol=1e-6)


# --- runs of batches a call (fit.steps_per_call) ---------------------------------------------------------


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(weight, b.state_dict()[name]) for name, weight in a.state_dict().items())


def test_runs_of_batches_train_the_same_model_as_one_batch_a_call(tmp_path: Path) -> None:
    """113 batches an epoch in runs of 7 (the last run one short batch): the same batches, optimizer steps and
    random draws in the same order as one batch a call (binarized pixels and a beta warm-up moving every step
    included), so the same weights bit for bit and the same logged metrics, validation and test (13 and 32
    batches, in runs of 7) included; a max_steps inside a run stops there."""
    args = ["--trainer.max_epochs", "2", "--model.kl_warmup_epochs", "2", "--data.binarize", "true", "--fit.test", "true"]
    one = run_training(small_config(tmp_path / "one", *args, "--fit.steps_per_call", "1"))
    runs = run_training(small_config(tmp_path / "runs", *args, "--fit.steps_per_call", "7"))
    assert one.trainer.num_training_batches == 113 and runs.trainer.num_training_batches == 17  # ceil(113 / 7)
    assert one.trainer.num_val_batches == [13] and runs.trainer.num_val_batches == [2]
    assert one.trainer.num_test_batches == [32] and runs.trainer.num_test_batches == [5]
    assert {"val/loss", "test/loss"} <= one.metrics.keys()
    assert one.trainer.global_step == runs.trainer.global_step == 226
    assert same_weights(one.model, runs.model)
    assert one.metrics == runs.metrics
    stopped = run_training(small_config(tmp_path / "stop", *args, "--fit.steps_per_call", "7", "--trainer.max_steps", "150"))
    one_stopped = run_training(small_config(tmp_path / "stop1", *args, "--fit.steps_per_call", "1", "--trainer.max_steps", "150"))
    assert stopped.trainer.global_step == one_stopped.trainer.global_step == 150
    assert same_weights(stopped.model, one_stopped.model)


class Limits:
    def __init__(self, limit_train_batches: object = 1.0, val_check_interval: object = 1.0) -> None:
        self.limit_train_batches, self.val_check_interval = limit_train_batches, val_check_interval


@pytest.mark.parametrize(
    "manual,limits,in_memory,auto,in_the_way",
    [
        (True, Limits(), True, steps.AUTO_STEPS_PER_CALL, None),
        (False, Limits(), True, 1, "automatic optimization"),
        (True, Limits(), False, 1, "data.num_workers > 0"),
        (True, Limits(limit_train_batches=5), True, 1, "trainer.limit_train_batches=5"),
        (True, Limits(limit_train_batches=1), True, 1, "trainer.limit_train_batches=1 "),  # an int 1 is one batch
        (True, Limits(limit_train_batches=0.5), True, 1, "trainer.limit_train_batches=0.5"),
        (True, Limits(val_check_interval=20), True, 1, "trainer.val_check_interval=20"),
        (True, Limits(val_check_interval=0.25), True, 1, "trainer.val_check_interval=0.25"),
    ],
)
def test_steps_per_call_resolves_auto_and_refuses_a_run_where_lightning_counts_batches(
    manual: bool, limits: Limits, in_memory: bool, auto: int, in_the_way: str | None
) -> None:
    assert steps.steps_per_call("auto", manual, limits, in_memory) == auto
    assert steps.steps_per_call(1, manual, limits, in_memory) == 1
    if in_the_way is None:
        assert steps.steps_per_call(5, manual, limits, in_memory) == 5
    else:
        with pytest.raises(UsageError, match=f"fit.steps_per_call=5: runs one batch a call with .*{in_the_way}"):
            steps.steps_per_call(5, manual, limits, in_memory)


def test_the_progress_bar_counts_batches_not_runs(tmp_path: Path) -> None:
    counts: list[tuple[str, int, float]] = []

    class Watch(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            bar = trainer.progress_bar_callback.train_progress_bar
            counts.append(("train", bar.n, bar.total))

        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            bar = trainer.progress_bar_callback.val_progress_bar
            counts.append(("sanity" if trainer.sanity_checking else "val", bar.n, bar.total))

    config = small_config(tmp_path, "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "true")
    result = run_training(config, callbacks=[Watch()])
    assert result.trainer.num_training_batches == 15 and result.trainer.num_val_batches == [2]  # ceil(113 / 8), ceil(13 / 8)
    assert counts == [("sanity", 2, 2), ("val", 13, 13), ("train", 113, 113)]  # the sanity check: a batch a run


def test_validation_in_runs_keeps_lightnings_counts_of_batches(tmp_path: Path, monkeypatch) -> None:
    """The sanity check evaluates num_sanity_val_steps batches (a run's first), and an int limit_val_batches, which
    Lightning counts in its steps, makes validation take one batch a step: 3 batches, not 3 runs."""
    evaluated: list[tuple[bool, int]] = []
    accumulate = LatentAutoencoder._accumulate

    def counted(model, stage, terms, n):
        evaluated.append((model.trainer.sanity_checking, n))
        accumulate(model, stage, terms, n)

    monkeypatch.setattr(LatentAutoencoder, "_accumulate", counted)
    run_training(small_config(tmp_path / "sane", "--trainer.max_epochs", "1", "--trainer.num_sanity_val_steps", "2"))
    assert [n for sanity, n in evaluated if sanity] == [32, 32]
    assert len([n for sanity, n in evaluated if not sanity]) == 13  # 400 images in batches of 32: all of them
    evaluated.clear()
    limited = run_training(small_config(tmp_path / "limited", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "3"))
    assert limited.datamodule.steps_per_call == 8 and limited.trainer.num_val_batches == [3]
    assert [sanity for sanity, _ in evaluated] == [True, True, False, False, False]  # Lightning's default 2, then 3


# --- host memory ---------------------------------------------------------------------------------------------


PROBE = """
import sys, torch
from aevae import host_memory
kept = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else False
address = torch.empty(20_000_000).data_ptr()  # 80 MB: a batch's conv buffers can be this large
heap = next(line for line in open("/proc/self/maps") if line.rstrip().endswith("[heap]"))
start, end = (int(bound, 16) for bound in heap.split()[0].split("-"))
print(kept, start <= address < end)
"""


def block_source(mode: str, **env: str) -> list[str]:
    """[whether keep_freed_memory set the allocator, whether an 80 MB tensor lies in the process's heap]"""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                          env={**os.environ, **env}).stdout.split()  # fmt: skip


def test_training_processes_keep_large_tensor_blocks_in_the_heap_for_reuse() -> None:
    """glibc gives a block above 32 MB a mapping of its own and unmaps it when freed, so the next step faults the
    same memory in again, page by page; kept, it comes from the heap, where a freed block stays for the next
    step. A user's own allocator setting wins."""
    assert block_source("plain") == ["False", "False"]
    assert block_source("keep") == ["True", "True"]
    assert block_source("keep", MALLOC_TRIM_THRESHOLD_="65536") == ["False", "False"]


def test_run_training_keeps_freed_memory(tmp_path: Path) -> None:
    from aevae import host_memory

    run_training(small_config(tmp_path, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"))
    assert host_memory._done
