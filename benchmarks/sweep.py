"""What pruning saves in `aevae sweep`, and what tracking (MLflow + Optuna storage) costs a trial.

The same sweep (VAE on the embedded 5k MNIST digits, latent_dim 2..64 and kl_weight 1e-3..10 log-scaled,
objective val/nelbo, TPE seed 0) runs in fresh stores without a pruner, with the median pruner and with
Hyperband. Reported: wall time, trials completed/pruned, best objective. Then some completed trials of the
unpruned study are trained again three ways, interleaved: untracked (Trainer without logger, no Optuna), as
an MLflow run (run_training) and as a sweep trial (MLflow and Optuna): the differences are what tracking costs.
With --server, the same trials are also trained as MLflow runs through a local `mlflow server` (SQLite backend,
proxied artifacts, on 127.0.0.1), interleaved with the rest: tracking through a server against the local store.

Torch is pinned to --threads threads (the machine is shared). Run: `python benchmarks/sweep.py`; only the
tracking costs, server included: `python benchmarks/sweep.py --overhead-only --server --trials 7 --overhead-trials 7`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Iterator
from urllib.request import urlopen

import torch
import yaml
from optuna.trial import TrialState

from aevae import sweep, training

REPO = Path(__file__).resolve().parents[1]
PRUNERS = {
    "none": "none",
    "median": {"name": "median", "n_startup_trials": 5, "n_warmup_steps": 1},
    "hyperband": {"name": "hyperband", "min_resource": 1, "reduction_factor": 3},
}


def write_config(folder: Path, pruner: object, trials: int, epochs: int) -> Path:
    config = {
        "study": "bench",
        "experiment": str(REPO / "experiments" / "vae_demo.yaml"),
        "overrides": {
            "trainer.max_epochs": epochs,
            "trainer.enable_progress_bar": False,
            "trainer.enable_model_summary": False,
            "trainer.num_sanity_val_steps": 0,
            "analysis.enabled": False,
        },
        "space": {
            "model.latent_dim": {"low": 2, "high": 64, "log": True},
            "model.kl_weight": {"low": 1e-3, "high": 10.0, "log": True},
        },
        "objectives": [{"metric": "val/nelbo", "direction": "minimize"}],
        "n_trials": trials,
        "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 5},
        "pruner": pruner,
    }
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def seconds(run: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU seconds of run() in this process (CPU time barely moves with other users of the machine)."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def run_sweep(folder: Path, pruner: object, trials: int, epochs: int) -> tuple[sweep.Sweep, object, tuple]:
    os.chdir(folder)  # fresh mlruns/ (MLflow and Optuna) and checkpoints/
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # MLflow sets it to the last store it logged to
    config = sweep.load_sweep(str(write_config(folder, pruner, trials, epochs)))
    studies = []
    times = seconds(lambda: studies.append(sweep.run_sweep(config)))
    return config, studies[0], times


def train_untracked(config: sweep.Sweep, params: dict) -> None:
    """The trial's training as run_training does it (fit, then test the best checkpoint), without MLflow."""
    parsed = training.parse_config([*config.base_args, *sweep.cli_args(params)])
    model, data = training.instantiate(parsed)
    trainer = training.build_trainer(parsed, logger=False)
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data, ckpt_path="best", verbose=False)


@contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """A plain `mlflow server` on a free loopback port over a SQLite store in folder; its URL once it answers."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
               "--serve-artifacts", "--artifacts-destination", str(folder / "server-artifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urlopen(f"{url}/health", timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def overhead(config: sweep.Sweep, trials: list, server: str | None = None) -> dict[str, tuple[float, float]]:
    """Median wall and CPU seconds of the same trials trained untracked, as an MLflow run, and as a sweep trial
    (MLflow and Optuna: storage, per-epoch reports, heartbeat, tags), interleaved so load hits all alike."""
    study = sweep.load_study(config)
    parent = study.user_attrs[sweep.PARENT_ATTR]
    times: dict[str, list[tuple[float, float]]] = {"untracked": [], "MLflow": [], "MLflow + Optuna": []}
    if server:
        times["MLflow via server"] = []
    for trial in trials:
        tracked = [*config.base_args, *sweep.cli_args(trial.params), "--tracking.uri", config.tracking_uri]
        times["untracked"].append(seconds(lambda: train_untracked(config, trial.params)))
        times["MLflow"].append(seconds(lambda: training.run_training(training.parse_config(tracked))))
        if server:
            remote = [*tracked, "--tracking.uri", server]  # the last --tracking.uri wins
            times["MLflow via server"].append(seconds(lambda: training.run_training(training.parse_config(remote))))
        study.enqueue_trial(trial.params)
        objective = partial(sweep.objective, sweep=config, parent_run_id=parent)
        times["MLflow + Optuna"].append(seconds(lambda: study.optimize(objective, n_trials=1)))
    medians = {name: tuple(statistics.median(column) for column in zip(*values)) for name, values in times.items()}
    if server:  # paired: each trial through the server against the same trial in the local store, run beside it
        pairs = list(zip(times["MLflow via server"], times["MLflow"]))
        medians["server - local store"] = tuple(statistics.median(s[i] - l[i] for s, l in pairs) for i in (0, 1))
    print("wall, CPU seconds per trial, in order:", {name: [f"{w:.2f}, {c:.2f}" for w, c in v] for name, v in times.items()})
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--overhead-trials", type=int, default=5, help="completed trials trained again three ways")
    parser.add_argument("--server", action="store_true", help="also train them as runs through a local MLflow server")
    parser.add_argument("--overhead-only", action="store_true", help="skip the pruner comparison (one unpruned sweep)")
    args = parser.parse_args()
    pruners = {"none": PRUNERS["none"]} if args.overhead_only else PRUNERS
    torch.set_num_threads(args.threads)
    rows, unpruned = [], None
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "warm-up").mkdir()
        run_sweep(Path(tmp) / "warm-up", "none", 1, 1)  # first data load, store creation, plot imports
        for name, pruner in pruners.items():
            folder = Path(tmp) / name
            folder.mkdir()
            config, study, (wall, cpu) = run_sweep(folder, pruner, args.trials, args.epochs)
            states = [t.state for t in study.trials]
            done, pruned = states.count(TrialState.COMPLETE), states.count(TrialState.PRUNED)
            rows.append((name, wall, cpu, done, pruned, study.best_value))
            if name == "none":
                unpruned = (config, study, folder)
        config, study, folder = unpruned
        os.chdir(folder)
        complete = [t for t in study.trials if t.state == TrialState.COMPLETE][: args.overhead_trials]
        if args.server:
            with mlflow_server(Path(tmp)) as url:
                medians = overhead(config, complete, url)
        else:
            medians = overhead(config, complete)
    _, base_wall, base_cpu, _, _, base_best = rows[0]
    print(f"{args.trials} trials x {args.epochs} epochs, TPE seed 0, torch threads {args.threads}\n")
    print("| pruner | wall (s) | CPU (s) | completed | pruned | best val/nelbo | wall | CPU | best |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, wall, cpu, done, pruned, best in rows:
        change = f"{wall / base_wall - 1:+.0%} | {cpu / base_cpu - 1:+.0%} | {best / base_best - 1:+.2%}"
        print(f"| {name} | {wall:.0f} | {cpu:.0f} | {done} | {pruned} | {best:.2f} | {change} |")
    print(f"\nper-trial cost of tracking (medians over {len(complete)} trials of the unpruned study, interleaved):\n")
    print("| trial trained as | wall (s) | CPU (s) | overhead: wall | overhead: CPU |")
    print("|---|---:|---:|---:|---:|")
    wall0, cpu0 = medians["untracked"]
    difference = medians.pop("server - local store", None)
    for name, (wall, cpu) in medians.items():
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | {(wall - wall0) / wall:.1%} | {(cpu - cpu0) / cpu:.1%} |")
    if difference:
        local_wall, local_cpu = medians["MLflow"]
        print(f"\nthrough the server instead of the local SQLite store (median of paired differences): "
              f"{difference[0]:+.2f} s wall ({difference[0] / local_wall:+.1%} of a trial), "
              f"{difference[1]:+.2f} s CPU ({difference[1] / local_cpu:+.1%}); target < 5% of wall")


if __name__ == "__main__":
    main()
