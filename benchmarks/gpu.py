"""Training throughput on one GPU: aevae against a hand-written loop on the same GPU, and sweep throughput.

One table, every figure from this run (MLP VAE 784-512-256-20, batch 128, fused Adam, full MNIST train split of
54,000 images with a validation pass each epoch; samples/s over the marginal epoch, start-up apart):

  (a) hand          a hand-written eager loop, data on the GPU, fp32: the baseline, 1.00x
  (b) hand-graph    that loop's step captured in one CUDA graph and replayed: the practical limit
  (c) aevae         `aevae train` as users run it (MLflow tracking on), eager
  (d) aevae-compile / aevae-cudagraph   the same with `--fit.compile compile` / `cudagraph`
  (e) aevae-bf16    eager under `--trainer.precision bf16-mixed`
  (f) sweep         trials per minute for 8 short cells of the latent x beta map at 1, 4 and 8 workers

Each fit runs --epochs epochs; its first epoch (compilation, capture, warm-up) is start-up, and the marginal epoch
is the median of the later ones, timed between epoch starts with the device synchronised there (one sync an
epoch). Variants are interleaved over --repeats. aevae's eager fit also counts the host synchronisations its
training steps make (torch.cuda.set_sync_debug_mode). Under 6 minutes on one H100 with the defaults.
Run: `AEVAE_DATA_ROOT=/folder/with/MNIST python benchmarks/gpu.py` (`--device cpu --epochs 2 --repeats 1
--sweep-workers 1 --limit-batches 5` checks the script itself on a machine without a GPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import lightning.pytorch as pl
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from aevae import tracking  # noqa: E402
from aevae.batches import to_float  # noqa: E402
from aevae.data import ImageDataModule  # noqa: E402
from aevae.models import VAE  # noqa: E402
from aevae.training import parse_config, run_training  # noqa: E402

TRAIN_IMAGES = 54000
SYNC_WARNING = "synchronizing"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- (a), (b): hand-written loops --------------------------------------------------------------------------


def hand_setup(root: str, device: torch.device, capturable: bool) -> tuple[VAE, torch.optim.Optimizer, dict]:
    pl.seed_everything(0, verbose=False)
    data = ImageDataModule(source="mnist", root=root, batch_size=128)
    data.setup()
    model = VAE(latent_dim=20, hidden_dims=[512, 256]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True, capturable=capturable)
    splits = {name: to_float(split.images.to(device)) for name, split in data.splits.items()}  # uint8 on the host
    return model, optimizer, splits


LIMIT: int | None = None  # --limit-batches: a check of the script itself, not a measurement


def hand_epoch(model: VAE, optimizer: torch.optim.Optimizer, splits: dict, step: Callable) -> None:
    train = splits["train"]
    model.train()
    for index in torch.randperm(len(train), device=train.device).split(128)[:LIMIT]:
        step(train[index])
    model.eval()
    with torch.no_grad():
        for x in splits["val"].split(128)[:LIMIT]:
            model.loss_terms(x, model(x))


def fit_hand(root: str, device: torch.device, epochs: int) -> list[float]:
    model, optimizer, splits = hand_setup(root, device, capturable=False)

    def step(x: torch.Tensor) -> None:
        loss = model.loss_terms(x, model(x)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return epoch_times(lambda: hand_epoch(model, optimizer, splits, step), epochs, device)


def fit_hand_graph(root: str, device: torch.device, epochs: int) -> list[float]:
    """PyTorch's whole-network capture recipe: warm up on a side stream, capture forward, backward and the
    capturable fused Adam step, replay with each batch copied into the static input (short batches run eagerly)."""
    model, optimizer, splits = hand_setup(root, device, capturable=True)
    static_x = splits["train"][:128].clone()

    def eager(x: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=False)
        model.loss_terms(x, model(x)).loss.backward()
        optimizer.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            model.loss_terms(static_x, model(static_x)).loss.backward()
            optimizer.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        model.loss_terms(static_x, model(static_x)).loss.backward()
        optimizer.step()

    def step(x: torch.Tensor) -> None:
        if x.shape != static_x.shape:
            return eager(x)
        static_x.copy_(x)
        graph.replay()

    return epoch_times(lambda: hand_epoch(model, optimizer, splits, step), epochs, device)


def epoch_times(run_epoch: Callable[[], None], epochs: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(epochs):
        sync(device)
        start = time.perf_counter()
        run_epoch()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


# --- (c), (d), (e): aevae train ---------------------------------------------------------------------------


class EpochClock(pl.Callback):
    """Seconds between epoch starts (the device synchronised there: one sync an epoch), and the fit's end."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stamps = device, []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def epochs(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def fit_aevae(root: str, device: torch.device, epochs: int, store: Path, *extra: str) -> tuple[list[float], float]:
    """`aevae train`'s own code path with tracking on; returns epoch times and host syncs per training step."""
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    config = parse_config([
        "--config", str(REPO / "experiments" / "vae_mnist.yaml"), "--data.root", root,
        "--model.latent_dim", "20", "--model.hidden_dims", "[512, 256]", "--trainer.max_epochs", str(epochs),
        "--trainer.accelerator", accelerator, "--trainer.devices", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--fit.test", "false", "--analysis.enabled", "false",
        "--tracking.uri", f"sqlite:///{store / 'mlflow.db'}", "--fit.checkpoint_dir", str(store / "ckpt"),
        *(["--trainer.limit_train_batches", str(LIMIT), "--trainer.limit_val_batches", str(LIMIT)] if LIMIT else []),
        *extra,
    ])  # fmt: skip
    clock = SyncCounter(device)
    run_training(config, callbacks=[clock])
    return clock.epochs(), clock.syncs_per_step()


class SyncCounter(EpochClock):
    """EpochClock that also counts the host synchronisations made inside training steps after the first epoch."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.syncs = self.steps = 0
        self.caught: list = []
        self.catcher: warnings.catch_warnings | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.device.type == "cuda" and trainer.current_epoch >= 1:
            self.catcher = warnings.catch_warnings(record=True)
            self.caught = self.catcher.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.catcher is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        self.catcher.__exit__(None, None, None)
        self.syncs += sum(SYNC_WARNING in str(w.message) for w in self.caught)
        self.steps += 1
        self.catcher = None

    def syncs_per_step(self) -> float:
        return self.syncs / self.steps if self.steps else float("nan")


# --- (f): sweeps ------------------------------------------------------------------------------------------

SWEEP_YAML = """\
experiment: {experiment}
overrides:
  trainer.max_epochs: {epochs}
  trainer.accelerator: {accelerator}
  trainer.enable_progress_bar: false
  trainer.enable_model_summary: false
  data.root: {root}
  analysis.umap: false
space:
  model.latent_dim: [4, 16]
  model.kl_weight: [0.1, 1.0, 3.0, 10.0]
objectives:
  - {{metric: val/nelbo, direction: minimize}}
n_trials: 8
sampler: {{name: grid, seed: 0}}
pruner: none
"""


def sweep_minutes(root: str, device: torch.device, workers: int, epochs: int, folder: Path) -> float:
    """Wall minutes of `aevae sweep` over the 8 cells with N workers (process start to exit, all included)."""
    config = folder / f"sweep-{workers}.yaml"
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    experiment = REPO / "experiments" / "vae_mnist.yaml"
    text = SWEEP_YAML.format(experiment=experiment, epochs=epochs, accelerator=accelerator, root=root)
    if LIMIT:
        limits = f"  trainer.limit_train_batches: {LIMIT}\n  trainer.limit_val_batches: {LIMIT}\n"
        text = text.replace("space:\n", limits + "space:\n")
    config.write_text(text)
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "aevae", "sweep", "--config", str(config), "--workers", str(workers),
         "--study", f"gpu-bench-{workers}"],
        cwd=folder, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"sweep with {workers} workers failed:\n{result.stderr[-3000:]}")
    return (time.perf_counter() - start) / 60


# --- the table -------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=os.environ.get("AEVAE_DATA_ROOT", str(REPO.parent / "shared" / "datasets")))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--epochs", type=int, default=4, help="epochs a fit; the first is start-up")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sweep-workers", type=int, nargs="*", default=[1, 4, 8])
    parser.add_argument("--sweep-epochs", type=int, default=2)
    parser.add_argument("--limit-batches", type=int, default=None, help="check the script on few batches")
    args = parser.parse_args()
    global LIMIT
    LIMIT = args.limit_batches
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if on_gpu:
        props = torch.cuda.get_device_properties(device)
        print(f"{torch.cuda.get_device_name(device)}, {props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}")
    folder = Path(tempfile.mkdtemp(prefix="aevae-gpu-"))
    tracking.open_store(f"sqlite:///{folder / 'mlflow.db'}")  # table creation: start-up, not training
    variants: dict[str, Callable[[], tuple[list[float], float]]] = {
        "hand": lambda: (fit_hand(args.root, device, args.epochs), float("nan")),
        "aevae": lambda: fit_aevae(args.root, device, args.epochs, folder),
        "aevae-compile": lambda: fit_aevae(args.root, device, args.epochs, folder, "--fit.compile", "compile"),
        "aevae-bf16": lambda: fit_aevae(args.root, device, args.epochs, folder, "--trainer.precision", "bf16-mixed"),
    }
    if on_gpu:
        variants["hand-graph"] = lambda: (fit_hand_graph(args.root, device, args.epochs), float("nan"))
        variants["aevae-cudagraph"] = lambda: fit_aevae(args.root, device, args.epochs, folder, "--fit.compile", "cudagraph")
    marginal: dict[str, list[float]] = {name: [] for name in variants}
    first: dict[str, list[float]] = {name: [] for name in variants}
    syncs: dict[str, float] = {}
    for repeat in range(args.repeats):
        for name, fit in variants.items():  # interleaved
            times, per_step = fit()
            first[name].append(times[0])
            marginal[name].append(statistics.median(times[1:]))
            syncs[name] = per_step
            print(f"repeat {repeat} {name:<16} epochs {' '.join(f'{t:.2f}' for t in times)} s", flush=True)
    sweeps = {n: sweep_minutes(args.root, device, n, args.sweep_epochs, folder) for n in args.sweep_workers}

    base = statistics.median(marginal["hand"])
    print("\n| variant | s / epoch | samples / s | vs hand | first epoch (s) | host syncs / step |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in variants:
        epoch = statistics.median(marginal[name])
        print(f"| {name} | {epoch:.3f} | {TRAIN_IMAGES / epoch:,.0f} | {base / epoch:.2f}x | "
              f"{statistics.median(first[name]):.1f} | {syncs.get(name, float('nan')):.2f} |")  # fmt: skip
    print("\n| sweep workers | wall (min) | trials / min | vs 1 worker |")
    print("|---:|---:|---:|---:|")
    one = sweeps.get(min(sweeps)) if sweeps else None
    for workers, minutes in sweeps.items():
        print(f"| {workers} | {minutes:.2f} | {8 / minutes:.1f} | {one / minutes:.2f}x |")


if __name__ == "__main__":
    main()
