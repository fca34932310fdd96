"""Training throughput on the CPU: aevae's trainer against hand-written loops, each fit in a fresh process.

The same VAE (`--model mlp`: 784-512-256-20; `--model tiny`: 784-16-2, where the arithmetic is negligible and the
per-step overhead is all that is left), batch 128, Adam 1e-3, the full MNIST train split (54,000 images) with a
validation pass each epoch; or `--model conv32`: a conv VAE (stride-2 stages 32-64-128, dense 256, latent 64,
discretized logistic likelihood) on 24,000 32x32 RGB images from an .npz (MNIST digits padded and tinted, written
by this script: 19,440 train, 2,160 validation, 2,400 held out as test). Trained these ways, interleaved,
`--repeats` times each:

  hand        a plain PyTorch loop over aevae's VAE class: in-memory tensors, index slices, torch.optim.Adam
  hand-fused  the same loop with the fused Adam kernel that aevae uses: the baseline (1.00x)
  hand-kept   hand-fused with the allocator setting aevae makes (aevae.host_memory): what that setting alone gives
  aevae       `run_training`, exactly as `aevae train` runs it, MLflow tracking on
  one-call    the same with `--fit.steps_per_call 1`: Lightning's per-batch work on every batch (as before runs)
  untracked   aevae's module, data and trainer factory with the logger off (the cost of tracking)
  compiled    `aevae train --fit.compile compile` (torch.compile of forward, loss and backward)
  tutorial    Lightning fed by torchvision's MNIST with per-item ToTensor (num_workers=0)
  before      `aevae` from another checkout (`--before DIR`, e.g. a worktree of an older commit): before/after

Each fit runs in its own process (so one variant's imports and caches do not help or hurt another) for N epochs
(`--epochs`, default 5) and clocks every epoch there: from one epoch's start to the next one's (training,
validation, checkpoints, logging: everything a fit does per epoch), the last one to the end of fit. The first epoch
(warm-up) is left out; the epoch time of a variant is the median of the other epochs over all repeats, which a
noisy moment on a shared machine shifts far less than a difference of two whole fits. The fixed cost of a fit is
reported apart: its time (imports and MLflow's table creation excluded) less N epoch times. The hand loops run with the environment
aevae trains in (Lightning's NVML-based CUDA check undone, see aevae.steps.plain_cuda_checks), so the
comparison is of the loops, not of that check. Also times `aevae train` with a one-step budget as a
subprocess: an upper bound on its start-up to the first step.
Run: `python benchmarks/throughput.py [--model tiny] [--before DIR]`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BATCH = 128
PRINTED = ("FIT_SECONDS ", "EPOCH_SECONDS ")  # what a child prints for its parent


@dataclass(frozen=True)
class Bench:
    """A benchmark model and the images it trains on."""

    latent: int
    hidden: list[int]
    architecture: str = "mlp"
    likelihood: str = "bernoulli"
    npz_images: int = 0  # 0: full MNIST (54,000 train, 6,000 val); else an .npz of this many 32x32 RGB images

    def split_sizes(self) -> tuple[int, int]:
        """Train and validation images, as aevae.data splits them (npz: 10% test off, then 10% validation)."""
        if not self.npz_images:
            return 54000, 6000
        rest = self.npz_images - round(0.1 * self.npz_images)
        return rest - round(0.1 * rest), round(0.1 * rest)

    def steps(self) -> int:
        train, val = self.split_sizes()
        return math.ceil(train / BATCH) + math.ceil(val / BATCH)


MODELS = {
    "mlp": Bench(20, [512, 256]),
    "tiny": Bench(2, [16]),
    "conv32": Bench(64, [32, 64, 128, 256], "conv", "logistic", npz_images=24000),
}
DEFAULT_VARIANTS = ["hand", "hand-fused", "aevae", "untracked", "compiled", "tutorial"]


def source(root: str, model: str) -> str:
    return f"npz:{npz_path(MODELS[model])}" if MODELS[model].npz_images else "mnist"


def npz_path(bench: Bench) -> Path:
    return Path(tempfile.gettempdir()) / f"aevae-bench-rgb32-{bench.npz_images}.npz"


def write_npz(root: str, bench: Bench) -> None:
    """MNIST digits padded to 32x32 and tinted with a seeded colour each: 32x32 RGB images with structure."""
    import numpy as np

    from aevae.data import ImageDataModule

    data = ImageDataModule(source="mnist", root=root)
    data.setup()
    digits = data.splits["train"].images[: bench.npz_images, 0].numpy()  # uint8 [N, 28, 28]
    padded = np.pad(digits, ((0, 0), (2, 2), (2, 2))).astype(np.float32)
    tint = np.random.default_rng(0).uniform(0.3, 1.0, size=(len(padded), 1, 1, 3))
    images = (padded[..., None] * tint).round().astype(np.uint8)
    np.savez(npz_path(bench), images=images, labels=data.splits["train"].labels[: bench.npz_images].numpy())


def model_args(model: str) -> list[str]:
    bench = MODELS[model]
    return [
        "--model.latent_dim", str(bench.latent), "--model.hidden_dims", json.dumps(bench.hidden),
        "--model.architecture", bench.architecture, "--model.likelihood", bench.likelihood,
    ]  # fmt: skip


def config_args(root: str, epochs: int, store: Path, model: str) -> list[str]:
    return [
        "--model", "aevae.models.VAE", *model_args(model),
        "--data.source", source(root, model), "--data.root", root, "--data.batch_size", str(BATCH),
        "--trainer.max_epochs", str(epochs), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.num_sanity_val_steps", "0",
        "--fit.test", "false", "--fit.checkpoint_dir", str(store / "checkpoints"), "--analysis.enabled", "false",
        "--tracking.uri", f"sqlite:///{store / 'mlruns' / 'mlflow.db'}",
    ]  # fmt: skip


# --- the fits, each run inside a child process ------------------------------------------------------------


def fit_hand(
    root: str, epochs: int, store: Path, model_name: str, clock: list[float], fused: bool, keep_freed_memory: bool = False
) -> None:
    import lightning.pytorch as pl
    import torch

    if keep_freed_memory:
        from aevae.host_memory import keep_freed_memory as keep

        keep()

    from aevae.batches import to_float
    from aevae.data import ImageDataModule

    os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)  # as aevae trains: see the module docstring
    pl.seed_everything(0, verbose=False)
    data = ImageDataModule(source=source(root, model_name), root=root, batch_size=BATCH)
    data.setup()
    model = new_vae(model_name, list(data.image_shape))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    train, val = data.splits["train"], data.splits["val"]
    for _ in range(epochs):
        clock.append(time.perf_counter())
        model.train()
        for index in torch.randperm(len(train)).split(128):
            x = to_float(train.images[index])  # uint8 in memory, floats per batch, as aevae does
            loss = model.loss_terms(x, model(x)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            for x in val.images.split(128):
                x = to_float(x)
                model.loss_terms(x, model(x))
    clock.append(time.perf_counter())


def new_vae(model_name: str, image_shape: list[int]):
    from aevae.models import VAE

    bench = MODELS[model_name]
    return VAE(
        latent_dim=bench.latent, hidden_dims=bench.hidden, architecture=bench.architecture,
        likelihood=bench.likelihood, image_shape=image_shape,
    )  # fmt: skip


def epoch_clock(clock: list[float]):
    """A Lightning callback that appends to clock the time each training epoch starts, and the end of training."""
    import lightning.pytorch as pl

    class EpochClock(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            clock.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module) -> None:  # after the last epoch's checkpoint
            clock.append(time.perf_counter())

    return EpochClock()


def fit_aevae(root: str, epochs: int, store: Path, model_name: str, clock: list[float], *extra: str) -> None:
    from aevae.training import parse_config, run_training

    config = parse_config([*config_args(root, epochs, store, model_name), *extra])
    run_training(config, callbacks=[epoch_clock(clock)])


def fit_untracked(root: str, epochs: int, store: Path, model_name: str, clock: list[float]) -> None:
    from aevae.training import build_trainer, instantiate, parse_config

    config = parse_config(config_args(root, epochs, store, model_name))
    model, data = instantiate(config)
    build_trainer(config, logger=False, callbacks=[epoch_clock(clock)]).fit(model, datamodule=data)


def fit_tutorial(root: str, epochs: int, store: Path, model_name: str, clock: list[float]) -> None:
    """The tutorial pipeline: torchvision MNIST, PIL images, per-item ToTensor."""
    import lightning.pytorch as pl
    import torch
    from torchvision import datasets, transforms

    class TutorialData(pl.LightningDataModule):
        def setup(self, stage: str | None = None) -> None:
            full = datasets.MNIST(str(store / "tv"), train=True, download=True, transform=transforms.ToTensor())
            generator = torch.Generator().manual_seed(0)
            self.train, self.val = torch.utils.data.random_split(full, [54000, 6000], generator=generator)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(self.train, batch_size=128, shuffle=True)

        def val_dataloader(self):
            return torch.utils.data.DataLoader(self.val, batch_size=128)

    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[epoch_clock(clock)],
    )  # fmt: skip
    trainer.fit(new_vae(model_name, [1, 28, 28]), datamodule=TutorialData())


def child(variant: str, root: str, epochs: int, model_name: str, threads: int) -> None:
    """One fit in this process; prints its wall time in seconds (imports and store creation excluded) and the
    duration of each epoch."""
    import torch

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as folder:
        store = Path(folder)
        raw = store / "tv" / "MNIST" / "raw"  # torchvision extracts next to the .gz files: copy the read-only ones
        raw.mkdir(parents=True)
        for gz in (Path(root) / "MNIST" / "raw").glob("*.gz"):
            shutil.copy(gz, raw / gz.name)
        if variant in ("aevae", "compiled", "before", "one-call"):
            from aevae import tracking

            tracking.open_store(f"sqlite:///{store / 'mlruns' / 'mlflow.db'}")  # 1-4 s, varying: start-up
        clock: list[float] = []
        fit = (root, epochs, store, model_name, clock)
        fits = {
            "hand": lambda: fit_hand(*fit, fused=False),
            "hand-fused": lambda: fit_hand(*fit, fused=True),
            "hand-kept": lambda: fit_hand(*fit, fused=True, keep_freed_memory=True),
            "aevae": lambda: fit_aevae(*fit),
            "before": lambda: fit_aevae(*fit),
            "one-call": lambda: fit_aevae(*fit, "--fit.steps_per_call", "1"),
            "compiled": lambda: fit_aevae(*fit, "--fit.compile", "compile"),
            "untracked": lambda: fit_untracked(*fit),
            "tutorial": lambda: fit_tutorial(*fit),
        }
        start = time.perf_counter()
        fits[variant]()
        end = time.perf_counter()
        epoch_seconds = [later - earlier for earlier, later in zip(clock, clock[1:])]
        print(f"FIT_SECONDS {end - start:.4f}", flush=True)
        print("EPOCH_SECONDS " + " ".join(f"{seconds:.4f}" for seconds in epoch_seconds), flush=True)


# --- the parent: interleaved children, medians ----------------------------------------------------------------


def timed(variant: str, epochs: int, args: argparse.Namespace) -> tuple[float, list[float]]:
    """One fit of variant in a child process: its wall time and each epoch's."""
    source = args.before if variant == "before" else str(REPO)
    env = {**os.environ, "PYTHONPATH": source, "MPLBACKEND": "Agg"}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--epochs", str(epochs),
               "--root", args.root, "--model", args.model, "--threads", str(args.threads)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=source)
    printed = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.startswith(PRINTED)}
    if result.returncode != 0 or "FIT_SECONDS" not in printed or len(printed.get("EPOCH_SECONDS", [])) != epochs:
        raise SystemExit(f"{variant} failed:\n{result.stderr[-3000:]}")
    return float(printed["FIT_SECONDS"][0]), [float(seconds) for seconds in printed["EPOCH_SECONDS"]]


def startup_seconds(args: argparse.Namespace) -> float:
    """`aevae train` with a one-step budget, process start to exit: an upper bound on start-up."""
    with tempfile.TemporaryDirectory() as folder:
        extra = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"]
        train_args = config_args(args.root, 1, Path(folder), args.model) + extra
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "aevae", "train", *train_args], check=True, capture_output=True, cwd=folder)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=os.environ.get("AEVAE_DATA_ROOT", str(REPO.parent / "shared" / "datasets")))
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
    parser.add_argument("--variants", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_VARIANTS)}")
    parser.add_argument("--before", default=None, help="a checkout of another commit, timed as variant 'before'")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5, help="epochs a fit; the first is warm-up, the rest measured")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.root, args.epochs, args.model, args.threads)
    if args.epochs < 2:
        parser.error("--epochs: at least 2 (the first is warm-up)")
    bench = MODELS[args.model]
    if bench.npz_images:
        write_npz(args.root, bench)
    variants = args.variants or DEFAULT_VARIANTS + (["before"] if args.before else [])
    if bench.npz_images and "tutorial" in variants:
        variants.remove("tutorial")  # torchvision's MNIST pipeline: 28x28 grey only
    epochs: dict[str, list[float]] = {name: [] for name in variants}  # every measured epoch of every repeat
    fits: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name in variants:  # interleaved: machine noise hits every variant alike
            fit, epoch_seconds = timed(name, args.epochs, args)
            epochs[name] += epoch_seconds[1:]
            fits[name].append(fit)
            shown = " ".join(f"{seconds:.3f}" for seconds in epoch_seconds)
            print(f"repeat {repeat} {name:<10} fit {fit:6.1f} s; epochs (s) {shown}", flush=True)
    marginal = {name: statistics.median(seconds) for name, seconds in epochs.items()}
    fixed = {name: statistics.median(fits[name]) - args.epochs * marginal[name] for name in variants}
    baseline = "hand-fused" if "hand-fused" in variants else variants[0]
    base = marginal[baseline]
    train_images, steps = bench.split_sizes()[0], bench.steps()
    print(f"\nmodel {args.model}; CPU threads: {args.threads}; train split: {train_images} images; medians of "
          f"{args.repeats} interleaved repeats x {args.epochs - 1} epochs after the first; baseline {baseline}\n")  # fmt: skip
    print(f"| pipeline | s / epoch | ms / step | samples / s | vs {baseline} | fixed cost (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in variants:
        epoch = marginal[name]
        print(f"| {name} | {epoch:.3f} | {epoch / steps * 1000:.2f} | {train_images / epoch:,.0f} | "
              f"{base / epoch:.2f}x | {fixed[name]:.1f} |")  # fmt: skip
    if {"aevae", "untracked"} <= set(variants):
        tracked, untracked = marginal["aevae"], marginal["untracked"]
        print(f"\ntracking cost per epoch: {100 * (tracked / untracked - 1):+.1f}%")
        print(f"aevae's cost per step (untracked - {baseline}): {(untracked - base) / steps * 1000:+.2f} ms")
    print(f"`aevae train` start-up to first step (upper bound, 1-step run): {startup_seconds(args):.1f} s")


if __name__ == "__main__":
    main()
