"""A 20-trial sweep from two worker groups ("machines") into one `aevae server`, one worker SIGKILLed: all landed?

Starts a throwaway PostgreSQL cluster (the server's store and the Optuna study), `aevae server` with basic auth
on loopback, and two `aevae sweep --workers 2` in separate process groups, as two machines would run them. Once
trials run, one worker of the first group is SIGKILLed. Then it checks, through the server over HTTP: the study
counts 20 COMPLETE trials, every COMPLETE trial's run is FINISHED with its config, checkpoint and latent plot,
the killed trial's run is KILLED, and no run is RUNNING. Run: `python benchmarks/team_sweep.py` (a few minutes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.request import urlopen

import yaml

REPO = Path(__file__).resolve().parents[1]
LOGIN = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "team-sweep-benchmark-only"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def postgres(folder: Path) -> tuple[str, list[str]]:
    """A PostgreSQL cluster on a free loopback port (as the postgres user when we are root); URL, stop command."""
    pg_ctl = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))[-1]
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(folder, "postgres")
    port, data = free_port(), folder / "data"
    subprocess.run([*as_postgres, pg_ctl.with_name("initdb"), "-D", data, "-U", "postgres", "-A", "trust", "-N"],
                   check=True, capture_output=True)  # fmt: skip
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
    subprocess.run([*as_postgres, pg_ctl, "-D", data, "-l", folder / "log", "-o", options, "-w", "start"],
                   check=True, capture_output=True)  # fmt: skip
    url = f"postgresql://postgres@127.0.0.1:{port}"
    for name in ("mlflow", "optuna"):
        subprocess.run([*as_postgres, pg_ctl.with_name("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", name],
                       check=True, capture_output=True)  # fmt: skip
    return url, [*as_postgres, str(pg_ctl), "-D", str(data), "-m", "fast", "stop"]


def start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """An `aevae` command in its own process group (a "machine"), its output in log."""
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "aevae", *args], cwd=log.parent, env={**os.environ, **env},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def wait_for(url: str, process: subprocess.Popen, log: Path) -> None:
    for _ in range(240):
        if process.poll() is not None:
            sys.exit(f"server exited:\n{log.read_text()[-2000:]}")
        try:
            urlopen(f"{url}/health", timeout=2).close()
            return
        except OSError:
            time.sleep(0.5)
    sys.exit("server did not answer in 120 s")


def sweep_config(folder: Path, url: str, trials: int) -> Path:
    overrides = {"model.hidden_dims": [64], "trainer.max_epochs": 2, "trainer.limit_train_batches": 5,
                 "trainer.enable_progress_bar": False, "trainer.enable_model_summary": False,
                 "analysis.sample_size": 300, "analysis.umap": False, "tracking.uri": url, "tracking.experiment": "team"}  # fmt: skip
    config = {"study": "team", "experiment": str(REPO / "experiments" / "vae_demo.yaml"), "overrides": overrides,
              "space": {"model.latent_dim": {"low": 2, "high": 16, "log": True}},
              "objectives": [{"metric": "val/nelbo", "direction": "minimize"}], "n_trials": trials,
              "sampler": {"name": "tpe", "seed": 0}, "heartbeat_interval": 2, "grace_period": 8}  # fmt: skip
    path = folder / "team.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def kill_a_worker(client, deadline_s: float = 600) -> tuple[str, int]:
    """SIGKILL the worker of the first trial run that is RUNNING; its run id and pid."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        experiment = client.get_experiment_by_name("team")
        runs = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'") if experiment else []
        trial_runs = [run for run in runs if "optuna.trial" in run.data.tags]
        if trial_runs:
            pid = int(trial_runs[0].data.tags["optuna.worker"].rsplit(":", 1)[1])
            os.kill(pid, signal.SIGKILL)
            return trial_runs[0].info.run_id, pid
        time.sleep(0.5)
    sys.exit("no trial started")


def check(client, storage: str, killed_run: str, trials: int) -> bool:
    """Print each check and whether it holds; True when all do."""
    import optuna
    from optuna.trial import TrialState

    from aevae.sweep.study import counted

    study = optuna.load_study(study_name="team", storage=storage)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    experiment = client.get_experiment_by_name("team")
    runs = {run.info.run_id: run for run in client.search_runs([experiment.experiment_id], max_results=1000)}
    missing = []
    for trial in complete:
        run_id = trial.user_attrs["mlflow_run_id"]
        files = {a.path for path in ("", "checkpoints", "latent") for a in client.list_artifacts(run_id, path)}
        missing += [f"trial {trial.number}: {name}" for name in ("config.yaml", "checkpoints/best.ckpt", "latent/pca.png")
                    if name not in files]  # fmt: skip
    workers = {run.data.tags.get("optuna.worker") for run in runs.values() if "optuna.trial" in run.data.tags}
    checks = {
        f"study counts {trials} trials, all COMPLETE ({len(study.trials)} in all, re-queued ones included)":
            counted(study.trials) == trials == len(complete),
        "every COMPLETE trial's run is FINISHED": all(runs[t.user_attrs["mlflow_run_id"]].info.status == "FINISHED" for t in complete),
        f"every COMPLETE trial's run has config.yaml, best.ckpt and latent/pca.png ({len(missing)} missing)": not missing,
        f"the killed worker's run is KILLED ({runs[killed_run].data.tags.get('failure_reason', '')})":
            runs[killed_run].info.status == "KILLED",
        "no run RUNNING": not [run for run in runs.values() if run.info.status == "RUNNING"],
        f"trials ran on {len(workers)} worker processes of two groups": len(workers) >= 3,
    }  # fmt: skip
    for name, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    return all(checks.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="aevae-team-"))
    cluster = Path(tempfile.mkdtemp(prefix="aevae-team-pg-"))  # its own folder: the postgres user owns it
    database, stop_database = postgres(cluster)
    port, processes = free_port(), []
    try:
        url = f"http://127.0.0.1:{port}"
        server = start(["server", "--backend-store-uri", f"{database}/mlflow", "--artifacts-destination",
                        str(folder / "artifacts"), "--port", str(port), "--auth"], folder / "server.log", LOGIN)  # fmt: skip
        processes.append(server)
        wait_for(url, server, folder / "server.log")
        os.environ.update(LOGIN)
        from mlflow import MlflowClient

        client, storage, began = MlflowClient(url), f"{database}/optuna", time.monotonic()
        config = sweep_config(folder, url, args.trials)
        for group in ("a", "b"):
            (folder / group).mkdir()
            processes.append(start(["sweep", "--config", str(config), "--workers", "2", "--storage", storage],
                                   folder / group / "sweep.log", {}))  # fmt: skip
            time.sleep(5)  # the second "machine" joins a study that exists
        killed_run, pid = kill_a_worker(client)
        print(f"SIGKILLed worker {pid} (run {killed_run}) at {time.monotonic() - began:.0f} s")
        codes = [process.wait(timeout=1800) for process in processes[1:]]
        print(f"{args.trials} trials from two groups of 2 workers into {url} in {time.monotonic() - began:.0f} s;"
              f" exit codes {codes} (1: a group whose worker was killed)")
        ok = check(client, storage, killed_run, args.trials)
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=60)
        subprocess.run(stop_database, capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(cluster, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
