"""Training throughput on one GPU: aevae against a hand-written loop on the same GPU, captured-step parity, and
sweep throughput.

One table, every figure from this run (MLP VAE 784-512-256-20, batch 128, fused Adam, full MNIST train split of
54,000 images with a validation pass each epoch; samples/s over the marginal epoch, start-up apart):

  (a) hand          a hand-written eager loop, data on the GPU, fp32: the baseline, 1.00x
  (b) hand-graph    that loop's step captured in one CUDA graph and replayed: the practical limit
  (c) aevae         `aevae train` as users run it (MLflow tracking on), eager; aevae-one-call the same with
                    `--fit.steps_per_call 1` (Lightning's per-batch work on every batch, as before runs of batches)
  (d) aevae-compile / aevae-reduce-overhead / aevae-cudagraph   `--fit.compile compile|reduce-overhead|cudagraph`
  (e) aevae-bf16    eager under `--trainer.precision bf16-mixed`
  (f) sweep         trials per minute for 8 short cells of the latent x beta map at 1, 4 and 8 workers

Before the table, parity: 200 seeded fp32 steps (on the 5,000 embedded digits, so each epoch ends on a short batch,
with a beta warm-up that moves every step) under each compiled or captured mode, every loss within 1e-3 relative
of the eager step's.

Each fit runs in its own process (one variant's failure, caches or CUDA context cannot touch another); its first
epoch (compilation, capture, warm-up) is start-up, and the marginal epoch is the median of the later ones, timed
between epoch starts with the device synchronised there (one sync an epoch). Variants are interleaved over
--repeats. aevae's fits also count the host synchronisations their training steps make
(torch.cuda.set_sync_debug_mode). Work left when --budget-s runs out is skipped, and the table says so.
Run: `AEVAE_DATA_ROOT=/folder/with/MNIST python benchmarks/gpu.py` (`--device cpu --epochs 2 --repeats 1
--sweep-workers 1 --limit-batches 5 --parity-steps 20` checks the script itself on a machine without a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
TRAIN_IMAGES = 54000
SYNC_WARNING = "synchronizing"
RESULT = "RESULT "
CAPTURED_MODES = {"cuda": ["compile", "reduce-overhead", "cudagraph"], "cpu": ["compile"]}
PARITY_TOLERANCE = 1e-3


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- (a), (b): hand-written loops (in a child process) -----------------------------------------------------


def hand_setup(args: argparse.Namespace, capturable: bool):
    import lightning.pytorch as pl
    import torch

    from aevae.batches import to_float
    from aevae.data import ImageDataModule
    from aevae.models import VAE

    pl.seed_everything(0, verbose=False)
    data = ImageDataModule(source="mnist", root=args.root, batch_size=128)
    data.setup()
    model = VAE(latent_dim=20, hidden_dims=[512, 256]).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True, capturable=capturable)
    splits = {name: to_float(split.images.to(args.device)) for name, split in data.splits.items()}  # uint8 on host
    return model, optimizer, splits


def hand_epoch(model, splits: dict, step: Callable, limit: int | None) -> None:
    import torch

    train = splits["train"]
    model.train()
    for index in torch.randperm(len(train), device=train.device).split(128)[:limit]:
        step(train[index])
    model.eval()
    with torch.no_grad():
        for x in splits["val"].split(128)[:limit]:
            model.loss_terms(x, model(x))


def fit_hand(args: argparse.Namespace) -> dict:
    model, optimizer, splits = hand_setup(args, capturable=False)

    def step(x) -> None:
        loss = model.loss_terms(x, model(x)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return {"epochs": epoch_times(lambda: hand_epoch(model, splits, step, args.limit_batches), args)}


def fit_hand_graph(args: argparse.Namespace) -> dict:
    """PyTorch's whole-network capture recipe: warm up on a side stream, capture forward, backward and the
    capturable fused Adam step, replay with each batch copied into the static input (short batches run eagerly)."""
    import torch

    model, optimizer, splits = hand_setup(args, capturable=True)
    static_x = splits["train"][:128].clone()

    def eager(x) -> None:
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

    def step(x) -> None:
        if x.shape != static_x.shape:
            return eager(x)
        static_x.copy_(x)
        graph.replay()

    return {"epochs": epoch_times(lambda: hand_epoch(model, splits, step, args.limit_batches), args)}


def epoch_times(run_epoch: Callable[[], None], args: argparse.Namespace) -> list[float]:
    times = []
    for _ in range(args.epochs):
        sync(args.device)
        start = time.perf_counter()
        run_epoch()
        sync(args.device)
        times.append(time.perf_counter() - start)
    return times


# --- (c), (d), (e): aevae train, and parity (in a child process) ------------------------------------------


def aevae_config(args: argparse.Namespace, store: Path, config: str, *extra: str):
    from aevae.training import parse_config

    accelerator = "gpu" if args.device.type == "cuda" else "cpu"
    limits = ["--trainer.limit_train_batches", str(args.limit_batches)] if args.limit_batches else []
    return parse_config([
        "--config", str(REPO / "experiments" / config), "--data.root", args.root,
        "--model.latent_dim", "20", "--model.hidden_dims", "[512, 256]", "--data.batch_size", "128",
        "--trainer.accelerator", accelerator, "--trainer.devices", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--fit.test", "false", "--analysis.enabled", "false",
        "--tracking.uri", f"sqlite:///{store / 'mlflow.db'}", "--fit.checkpoint_dir", str(store / "ckpt"),
        *limits, *extra,
    ])  # fmt: skip


def fit_aevae(args: argparse.Namespace, *extra: str) -> dict:
    """`aevae train`'s own code path with tracking on; epoch times and host syncs per training step."""
    from aevae.training import run_training

    store = Path(tempfile.mkdtemp(prefix="aevae-gpu-fit-"))
    limits = ["--trainer.limit_val_batches", str(args.limit_batches)] if args.limit_batches else []
    config = aevae_config(args, store, "vae_mnist.yaml", "--trainer.max_epochs", str(args.epochs), *limits, *extra)
    clock = SyncCounter(args.device)
    run_training(config, callbacks=[clock])
    return {"epochs": clock.epochs(), "syncs": clock.syncs_per_step()}


def parity_losses(args: argparse.Namespace, mode: str) -> dict:
    """args.parity_steps seeded fp32 steps on the embedded digits (4,500 training images: every 36th batch is
    short) with a beta warm-up over 2 epochs, so beta moves every step; the loss of each step, read after it."""
    import lightning.pytorch as pl

    from aevae.training import run_training

    losses: list[float] = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *rest) -> None:
            losses.append(pl_module.record.last_finite_loss())  # a sync a step: a check, not a timing

    store = Path(tempfile.mkdtemp(prefix="aevae-gpu-parity-"))
    config = aevae_config(
        args, store, "vae_demo.yaml", "--trainer.max_steps", str(args.parity_steps),
        "--trainer.limit_val_batches", "2", "--model.kl_warmup_epochs", "2", "--fit.compile", mode,
        "--fit.steps_per_call", "1",  # the callback reads after each training_step: one batch a call, every step
    )  # fmt: skip
    run_training(config, callbacks=[Losses()])
    return {"losses": losses}


def epoch_clock(device):
    import lightning.pytorch as pl

    class EpochClock(pl.Callback):
        """Seconds between epoch starts (the device synchronised there: one sync an epoch), and the fit's end."""

        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            sync(device)
            self.stamps.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module) -> None:
            sync(device)
            self.stamps.append(time.perf_counter())

        def epochs(self) -> list[float]:
            return [b - a for a, b in zip(self.stamps, self.stamps[1:])]

    return EpochClock


def SyncCounter(device):  # noqa: N802 - a class made once Lightning is imported, in the child only
    import torch

    class Counter(epoch_clock(device)):
        """Also counts the host synchronisations made inside training steps after the first epoch."""

        def __init__(self) -> None:
            super().__init__()
            self.syncs = self.steps = 0
            self.catcher: warnings.catch_warnings | None = None
            self.caught: list = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if device.type == "cuda" and trainer.current_epoch >= 1:
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

    return Counter()


def fits() -> dict[str, Callable[[argparse.Namespace], dict]]:
    """The variants of the table, by name; each runs in a child process."""
    table = {
        "hand": fit_hand,
        "hand-graph": fit_hand_graph,
        "aevae": lambda args: fit_aevae(args),
        "aevae-one-call": lambda args: fit_aevae(args, "--fit.steps_per_call", "1"),
        "aevae-compile": lambda args: fit_aevae(args, "--fit.compile", "compile"),
        "aevae-reduce-overhead": lambda args: fit_aevae(args, "--fit.compile", "reduce-overhead"),
        "aevae-cudagraph": lambda args: fit_aevae(args, "--fit.compile", "cudagraph"),
        "aevae-bf16": lambda args: fit_aevae(args, "--trainer.precision", "bf16-mixed"),
    }
    for mode in ("none", *CAPTURED_MODES["cuda"]):
        table[f"parity-{mode}"] = lambda args, mode=mode: parity_losses(args, mode)
    return table


def run_child(args: argparse.Namespace) -> None:
    import torch

    args.device = torch.device(args.device)
    result = fits()[args.child](args)
    print(RESULT + json.dumps(result), flush=True)


# --- the parent: children, sweeps, the table ---------------------------------------------------------------


class Budget:
    """Wall seconds left for this run; work that would start after they are spent is skipped and reported."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.skipped: list[str] = []

    def allows(self, what: str) -> bool:
        if time.monotonic() < self.end:
            return True
        self.skipped.append(what)
        return False


def child(name: str, args: argparse.Namespace, budget: Budget) -> dict | None:
    """Runs one variant in a fresh process; None (with the error's tail printed) if it failed or ran out of time."""
    if not budget.allows(name):
        return None
    command = [sys.executable, __file__, "--child", name, "--root", args.root, "--device", args.device,
               "--epochs", str(args.epochs), "--parity-steps", str(args.parity_steps),
               *(["--limit-batches", str(args.limit_batches)] if args.limit_batches else [])]  # fmt: skip
    timeout = max(10.0, budget.end - time.monotonic() + 60)
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=child_env(), timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{name}: timed out after {timeout:.0f} s", flush=True)
        return None
    for line in done.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT) :])
    print(f"{name}: failed (exit {done.returncode})\n{done.stderr[-2500:]}", flush=True)
    return None


def child_env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "MPLBACKEND": "Agg"}


def check_parity(args: argparse.Namespace, budget: Budget) -> list[str]:
    """Table rows: each captured mode's worst relative loss difference from eager over the same seeded steps."""
    eager = child("parity-none", args, budget)
    rows = []
    for mode in CAPTURED_MODES[args.device]:
        other = child(f"parity-{mode}", args, budget) if eager else None
        if other is None:
            rows.append(f"| {mode} | - | - | not run or failed |")
            continue
        a, b = eager["losses"], other["losses"]
        worst = max(abs(x - y) / abs(x) for x, y in zip(a, b)) if len(a) == len(b) else float("inf")
        verdict = "same model" if worst < PARITY_TOLERANCE else "DIFFERS"
        rows.append(f"| {mode} | {len(b)} | {worst:.2e} | {verdict} (eager {a[0]:.1f} -> {a[-1]:.1f}) |")
        print(rows[-1], flush=True)
    return rows


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


def sweep_minutes(args: argparse.Namespace, workers: int, folder: Path, budget: Budget) -> float | None:
    """Wall minutes of `aevae sweep` over the 8 cells with N workers (process start to exit, all included)."""
    if not budget.allows(f"sweep x{workers}"):
        return None
    config = folder / f"sweep-{workers}.yaml"
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    experiment = REPO / "experiments" / "vae_mnist.yaml"
    text = SWEEP_YAML.format(experiment=experiment, epochs=args.sweep_epochs, accelerator=accelerator, root=args.root)
    if args.limit_batches:
        limits = "".join(f"  trainer.limit_{split}_batches: {args.limit_batches}\n" for split in ("train", "val"))
        text = text.replace("space:\n", limits + "space:\n")
    config.write_text(text)
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "aevae", "sweep", "--config", str(config), "--workers", str(workers),
             "--study", f"gpu-bench-{workers}"],
            cwd=folder, capture_output=True, text=True, env=child_env(),
            timeout=max(30.0, budget.end - time.monotonic() + 60),
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        print(f"sweep with {workers} workers: timed out", flush=True)
        return None
    if done.returncode != 0:
        print(f"sweep with {workers} workers failed (exit {done.returncode}):\n{done.stderr[-2500:]}", flush=True)
        return None
    minutes = (time.perf_counter() - start) / 60
    print(f"sweep x{workers}: {minutes:.2f} min", flush=True)
    return minutes


def print_table(args: argparse.Namespace, results: dict[str, list[dict]]) -> None:
    base = statistics.median(statistics.median(r["epochs"][1:]) for r in results["hand"]) if results["hand"] else None
    print("\n| variant | s / epoch | samples / s | vs hand | first epoch (s) | host syncs / step | fits |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, runs in results.items():
        if not runs:
            print(f"| {name} | - | - | - | - | - | 0 (failed or skipped) |")
            continue
        epoch = statistics.median(statistics.median(r["epochs"][1:]) for r in runs)
        first = statistics.median(r["epochs"][0] for r in runs)
        syncs = runs[-1].get("syncs", float("nan"))
        ratio = f"{base / epoch:.2f}x" if base else "-"
        print(f"| {name} | {epoch:.3f} | {TRAIN_IMAGES / epoch:,.0f} | {ratio} | {first:.1f} | {syncs:.2f} "
              f"| {len(runs)} |")  # fmt: skip


def print_sweeps(sweeps: dict[int, float | None]) -> None:
    print("\n| sweep workers | wall (min) | trials / min | vs 1 worker |")
    print("|---:|---:|---:|---:|")
    one = sweeps.get(1)
    for workers, minutes in sweeps.items():
        if minutes is None:
            print(f"| {workers} | - | - | - |")
            continue
        ratio = f"{one / minutes:.2f}x" if one else "-"
        print(f"| {workers} | {minutes:.2f} | {8 / minutes:.1f} | {ratio} |")


def describe_device(device: str) -> None:
    import torch

    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        print(f"{torch.cuda.get_device_name(0)}, {props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}")
    else:
        print(f"{device}; torch {torch.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=os.environ.get("AEVAE_DATA_ROOT", str(REPO.parent / "shared" / "datasets")))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--epochs", type=int, default=5, help="epochs a fit; the first is start-up")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--parity-steps", type=int, default=200)
    parser.add_argument("--sweep-workers", type=int, nargs="*", default=[1, 4, 8])
    parser.add_argument("--sweep-epochs", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=330, help="wall seconds; later work is skipped")
    parser.add_argument("--limit-batches", type=int, default=None, help="check the script on few batches")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(REPO))
        return run_child(args)
    budget = Budget(args.budget_s)
    describe_device(args.device)
    print("\nparity: | mode | steps | worst relative loss difference from eager | verdict |", flush=True)
    parity = check_parity(args, budget)
    variants = [n for n in fits() if not n.startswith("parity-")]
    if args.device != "cuda":
        variants = [n for n in variants if n not in ("hand-graph", "aevae-reduce-overhead", "aevae-cudagraph")]
    results: dict[str, list[dict]] = {name: [] for name in variants}
    folder = Path(tempfile.mkdtemp(prefix="aevae-gpu-"))
    sweeps: dict[int, float | None] = {}
    for repeat in range(args.repeats):
        for name in variants:  # interleaved
            result = child(name, args, budget)
            if result:
                results[name].append(result)
                epochs = " ".join(f"{t:.3f}" for t in result["epochs"])
                print(f"repeat {repeat} {name:<22} epochs {epochs} s", flush=True)
        if repeat == 0:  # the sweeps before further repeats, so a short budget still measures them
            sweeps = {n: sweep_minutes(args, n, folder, budget) for n in args.sweep_workers}
    print("\n| mode | steps | worst relative loss difference from eager | verdict |\n|---|---:|---:|---|")
    print("\n".join(parity))
    print_table(args, results)
    print_sweeps(sweeps)
    if budget.skipped:
        print(f"\nskipped (budget of {args.budget_s:.0f} s spent): {', '.join(budget.skipped)}")


if __name__ == "__main__":
    main()
