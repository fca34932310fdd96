"""Training throughput: aevae's trainer vs a hand-written loop vs the tutorial pipeline.

The same MLP VAE (784-512-256-20, batch 128, Adam 1e-3, full MNIST train split, CPU) is trained
five ways, interleaved, `--repeats` times each:

  hand       a plain PyTorch loop over in-memory tensors (index slices), validation each epoch, torch.optim.Adam
  hand-fused the same loop with the fused Adam kernel that aevae uses (Lightning's own cost, like for like)
  aevae      `run_training`, exactly as `aevae train` runs it, MLflow tracking on
  untracked  aevae's module, data and trainer factory with the logger off (the cost of tracking)
  tutorial   Lightning fed by torchvision's MNIST with per-item ToTensor (num_workers=0)

and a conv VAE on 32x32x3 images (10,000 random uint8 images in an .npz; conv 32-64-128, dense 256, latent 32,
discretized logistic likelihood) two ways: `conv-hand` (the hand loop, fused Adam) and `conv-aevae` (`run_training`).

Each is fitted for 1 and for 3 epochs; the marginal epoch time is (t3 - t1) / 2, so start-up
(imports aside) is reported separately. Also times `aevae train` with a one-step budget as a
subprocess: an upper bound on its start-up to the first step. Run: `python benchmarks/throughput.py`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch

from aevae import tracking
from aevae.data import ImageDataModule, to_float
from aevae.models import VAE
from aevae.training import build_trainer, instantiate, parse_config, run_training

REPO = Path(__file__).resolve().parents[1]
STEPS = 422 + 47  # train and validation batches an epoch (54,000 and 6,000 images, batch 128)
MODEL_ARGS = ["--model", "aevae.models.VAE", "--model.latent_dim", "20", "--model.hidden_dims", "[512, 256]"]
CONV_IMAGES = 10_000  # 8,910 train, 990 validation, 100 test (unused)
CONV_ARGS = ["--model.latent_dim", "32", "--model.architecture", "conv", "--model.hidden_dims", "[32, 64, 128, 256]",
             "--model.likelihood", "logistic"]  # fmt: skip


def config_args(root: str, epochs: int, store: Path) -> list[str]:
    return [
        *MODEL_ARGS,
        "--data.source", "mnist", "--data.root", root, "--data.batch_size", "128",
        "--trainer.max_epochs", str(epochs), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.num_sanity_val_steps", "0",
        "--fit.test", "false", "--fit.checkpoint_dir", str(store / "checkpoints"), "--analysis.enabled", "false",
        "--tracking.uri", f"sqlite:///{store / 'mlruns' / 'mlflow.db'}",
    ]  # fmt: skip


def fit_hand(root: str, epochs: int, store: Path, fused: bool = False) -> None:
    pl.seed_everything(0, verbose=False)
    data = ImageDataModule(source="mnist", root=root, batch_size=128)
    data.setup()
    model = VAE(latent_dim=20, hidden_dims=[512, 256])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    train, val = data.splits["train"], data.splits["val"]
    for _ in range(epochs):
        model.train()
        for index in torch.randperm(len(train)).split(128):
            x = to_float(train.images[index])  # as aevae does per batch
            loss = model.loss_terms(x, model(x)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            for x in val.images.split(128):
                x = to_float(x)
                model.loss_terms(x, model(x))


def conv_npz(store: Path) -> Path:
    path = store / "colour.npz"
    if not path.exists():
        rng = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (CONV_IMAGES, 32, 32, 3), dtype=torch.uint8, generator=rng)
        np.savez(path, images=images.numpy())
    return path


def conv_config_args(root: str, epochs: int, store: Path) -> list[str]:
    args = config_args(root, epochs, store)
    args[args.index("mnist")] = f"npz:{conv_npz(store)}"
    return [*args[len(MODEL_ARGS) :], "--model", "aevae.models.VAE", *CONV_ARGS, "--data.test_fraction", "0.01"]


def fit_conv_hand(root: str, epochs: int, store: Path) -> None:
    """The hand loop for the conv VAE: fused Adam, uint8 images made floats per batch, as aevae does."""
    pl.seed_everything(0, verbose=False)
    data = ImageDataModule(source=f"npz:{conv_npz(store)}", test_fraction=0.01, batch_size=128)
    data.setup()
    model = VAE(latent_dim=32, architecture="conv", hidden_dims=[32, 64, 128, 256], likelihood="logistic",
                image_shape=list(data.image_shape))  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    train, val = data.splits["train"], data.splits["val"]
    for _ in range(epochs):
        model.train()
        for index in torch.randperm(len(train)).split(128):
            x = to_float(train.images[index])
            loss = model.loss_terms(x, model(x)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            for x in val.images.split(128):
                x = to_float(x)
                model.loss_terms(x, model(x))


def fit_conv_aevae(root: str, epochs: int, store: Path) -> None:
    run_training(parse_config(conv_config_args(root, epochs, store)))


def fit_aevae(root: str, epochs: int, store: Path) -> None:
    run_training(parse_config(config_args(root, epochs, store)))


def fit_untracked(root: str, epochs: int, store: Path) -> None:
    config = parse_config(config_args(root, epochs, store))
    model, data = instantiate(config)
    build_trainer(config, logger=False).fit(model, datamodule=data)


class TutorialData(pl.LightningDataModule):
    """The tutorial pipeline: torchvision MNIST, PIL images, per-item ToTensor."""

    def __init__(self, root: str) -> None:
        super().__init__()
        self.root = root

    def setup(self, stage: str | None = None) -> None:
        from torchvision import datasets, transforms

        full = datasets.MNIST(self.root, train=True, download=True, transform=transforms.ToTensor())
        generator = torch.Generator().manual_seed(0)
        self.train, self.val = torch.utils.data.random_split(full, [54000, 6000], generator=generator)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.train, batch_size=128, shuffle=True)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.val, batch_size=128)


def fit_tutorial(root: str, epochs: int, store: Path) -> None:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(VAE(latent_dim=20, hidden_dims=[512, 256]), datamodule=TutorialData(str(store / "tv")))


def torchvision_copy(root: str, store: Path) -> None:
    """torchvision extracts next to the .gz files; the shared copy is read-only, so copy it."""
    raw = store / "tv" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in (Path(root) / "MNIST" / "raw").glob("*.gz"):
        shutil.copy(gz, raw / gz.name)


def timed(fit, root: str, epochs: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        store = Path(folder)
        torchvision_copy(root, store)
        # MLflow creates its tables on a store's first use (1-4 s, and it varies): start-up, not training.
        tracking.open_store(f"sqlite:///{store / 'mlruns' / 'mlflow.db'}")
        start = time.perf_counter()
        fit(root, epochs, store)
        return time.perf_counter() - start


def startup_seconds(root: str) -> float:
    """`aevae train` with a one-step budget, process start to exit: an upper bound on start-up."""
    with tempfile.TemporaryDirectory() as folder:
        args = config_args(root, 1, Path(folder)) + ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"]
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "aevae", "train", *args], check=True, capture_output=True, cwd=folder)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=os.environ.get("AEVAE_DATA_ROOT", str(REPO.parent / "shared" / "datasets")))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fits = {
        "hand": fit_hand,
        "hand-fused": partial(fit_hand, fused=True),
        "aevae": fit_aevae,
        "untracked": fit_untracked,
        "tutorial": fit_tutorial,
        "conv-hand": fit_conv_hand,
        "conv-aevae": fit_conv_aevae,
    }
    marginal: dict[str, list[float]] = {name: [] for name in fits}
    overhead: dict[str, list[float]] = {name: [] for name in fits}
    for repeat in range(args.repeats):
        for name, fit in fits.items():  # interleaved: machine noise hits every variant alike
            one, three = timed(fit, args.root, 1), timed(fit, args.root, 3)
            marginal[name].append((three - one) / 2)
            overhead[name].append(one - (three - one) / 2)
            print(f"repeat {repeat} {name:<10} 1 epoch {one:6.1f} s  3 epochs {three:6.1f} s", flush=True)
    startup = statistics.median(startup_seconds(args.root) for _ in range(args.repeats))

    samples = 54000
    hand = statistics.median(marginal["hand"])
    conv_hand = statistics.median(marginal["conv-hand"])  # the conv rows are compared with their own hand loop
    print(f"\nCPU threads: {args.threads}; train split: {samples} images; medians of {args.repeats} repeats\n")
    print("| pipeline | s / epoch | samples / s | vs hand loop | fixed cost (s) |")
    print("|---|---|---|---|---|")
    for name in fits:
        epoch = statistics.median(marginal[name])
        fixed = statistics.median(overhead[name])
        baseline, images = (conv_hand, 8910) if name.startswith("conv") else (hand, samples)
        print(f"| {name} | {epoch:.2f} | {images / epoch:,.0f} | {baseline / epoch:.2f}x | {fixed:.1f} |")
    tracked, untracked = statistics.median(marginal["aevae"]), statistics.median(marginal["untracked"])
    fused = statistics.median(marginal["hand-fused"])
    print(f"\ntracking cost per epoch: {100 * (tracked / untracked - 1):+.1f}%")
    print(f"Lightning's cost per step (aevae untracked - hand-fused): {(untracked - fused) / STEPS * 1000:.2f} ms")
    print(f"`aevae train` start-up to first step (upper bound, 1-step run): {startup:.1f} s")


if __name__ == "__main__":
    main()
