"""Cost of the latent-space analysis: seconds per step for 10,000 test codes, and its share of a training run.

For z=4 and z=32, a default-architecture VAE (784-512-256-z, full MNIST) is fitted for ``--epochs``
epochs with the analysis off (that fit times an epoch), then analysed ``--repeats`` times as
`aevae train` analyses it: 10,000 test codes projected and scored, the 54,000 train codes fitting the
probes. The first analysis in a process is "cold" (it pays numba's JIT compilation inside UMAP);
the rest are "warm" (median shown). A default run is experiments/vae_mnist.yaml: 20 epochs.
Run: `python benchmarks/analysis.py` (the machine should be otherwise idle; the numbers are noisy).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from aevae import analysis
from aevae.training import build_trainer, instantiate, parse_config

STEPS = ("encode", "pca", "umap", "silhouette", "probes", "plots")
DEFAULT_RUN_EPOCHS = 20


def fitted(latent_dim: int, epochs: int, root: str, folder: Path):
    """A VAE fitted on full MNIST, and the seconds per epoch of that fit."""
    config = parse_config([
        "--config", str(Path(__file__).resolve().parents[1] / "experiments" / "vae_mnist.yaml"),
        "--model.init_args.latent_dim", str(latent_dim), "--data.root", root, "--trainer.max_epochs", str(epochs),
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--fit.checkpoint_dir", str(folder),
    ])  # fmt: skip
    model, datamodule = instantiate(config)
    trainer = build_trainer(config, logger=False)
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    return model, datamodule, (time.perf_counter() - start) / epochs


def timed_analyses(model, datamodule, repeats: int, folder: Path) -> list[dict[str, float]]:
    timings = []
    for repeat in range(repeats):
        latent = analysis.analyze(model, datamodule, analysis.AnalysisOptions())
        analysis.write_analysis(latent, folder / str(repeat))
        timings.append({**latent.timings, "total": sum(latent.timings.values())})
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4, help="analyses per model (the first is cold)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs fitted per model (times an epoch)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (pinned for comparable numbers)")
    parser.add_argument("--root", default=os.environ.get("AEVAE_DATA_ROOT", "data"), help="data root with MNIST/raw")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    columns, epoch_seconds = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for latent_dim in (4, 32):
            model, datamodule, epoch_seconds[latent_dim] = fitted(latent_dim, args.epochs, args.root, Path(folder))
            runs = timed_analyses(model, datamodule, args.repeats, Path(folder) / f"z{latent_dim}")
            columns[f"z={latent_dim} cold"] = runs[0]
            columns[f"z={latent_dim} warm"] = {key: statistics.median(r[key] for r in runs[1:]) for key in runs[0]}
    print(f"torch threads {args.threads}, {os.cpu_count()} CPUs, {args.repeats - 1} warm repeats (median)\n")
    print("| step (s) | " + " | ".join(columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    for step in (*STEPS, "total"):
        print(f"| {step} | " + " | ".join(f"{column.get(step, 0.0):.2f}" for column in columns.values()) + " |")
    print()
    for latent_dim, seconds in epoch_seconds.items():
        run = DEFAULT_RUN_EPOCHS * seconds
        cold, warm = columns[f"z={latent_dim} cold"]["total"], columns[f"z={latent_dim} warm"]["total"]
        print(f"z={latent_dim}: epoch {seconds:.1f} s, default run ({DEFAULT_RUN_EPOCHS} epochs) ~{run:.0f} s; "
              f"analysis {cold / run:.1%} of it cold, {warm / run:.1%} warm")  # fmt: skip


if __name__ == "__main__":
    main()
