"""The record versioned with DVC: snapshot, push to a local remote, clone to another path, pull, serve."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.request import urlopen

from conftest import LATENT_PLOT, REPO, cli_env, free_port, run_aevae, wait_until_healthy
from mlflow import MlflowClient

from aevae import tracking
from aevae.cli import main


TINY = ("--model.hidden_dims", "[32]", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4",
        "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false", "--analysis.umap", "false")  # fmt: skip


def sh(*command: str, cwd: Path) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(command)}: {result.stderr}"
    return result.stdout


def dvc(*args: str, cwd: Path) -> str:
    return sh(sys.executable, "-m", "dvc", *args, cwd=cwd)


def git(*args: str, cwd: Path) -> str:
    return sh("git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args, cwd=cwd)


@contextmanager
def one_machine_server(cwd: Path) -> Iterator[str]:
    """`aevae server` with its defaults (the SQLite store ./mlruns, artifacts proxied into ./mlruns/artifacts)."""
    port, log = free_port(), cwd.parent / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen([sys.executable, "-m", "aevae", "server", "--port", str(port), "--workers", "1"],
                                  cwd=cwd, env=cli_env(), stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # fmt: skip
    try:
        yield wait_until_healthy(f"http://127.0.0.1:{port}", server, log, seconds=90)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_a_trained_record_survives_a_clone_through_the_default_remote(tmp_path, serve_ui):
    """Two runs, one written to the local store, one through a one-machine `aevae server` on it: both, with their
    artifacts, reach a clone through `aevae snapshot` and `dvc pull`."""
    origin, clone = tmp_path / "origin", tmp_path / "clone"  # clones side by side share the default remote
    origin.mkdir()
    git("init", "-q", cwd=origin)
    dvc("init", "-q", cwd=origin)
    for name in (".dvcignore", ".dvc/config"):  # the project's: the lock files left out; the default remote
        shutil.copy(REPO / name, origin / name)
    trained = run_aevae("train", "--config", str(REPO / "experiments" / "vae_demo.yaml"), *TINY, cwd=origin)
    assert trained.returncode == 0, trained.stderr[-2000:]
    with one_machine_server(origin) as server_url:
        served = run_aevae("train", "--config", str(REPO / "experiments" / "vae_demo.yaml"), *TINY,
                           "--tracking.uri", server_url, "--tracking.experiment", "served", cwd=origin)  # fmt: skip
        assert served.returncode == 0, served.stderr[-2000:]

    snapshot = run_aevae("snapshot", cwd=origin)
    assert snapshot.returncode == 0, snapshot.stderr
    assert "pushed to DVC remote 'beside'" in snapshot.stdout
    assert (tmp_path / "aevae-dvc-remote").is_dir()  # beside the checkout, not in it
    git("add", "mlruns.dvc", ".gitignore", ".dvcignore", ".dvc/config", cwd=origin)
    git("commit", "-q", "-m", "snapshot", cwd=origin)
    git("clone", "-q", str(origin), str(clone), cwd=tmp_path)
    shutil.rmtree(origin)  # nothing may still point at the old folder
    dvc("pull", "-q", cwd=clone)
    assert not (clone / "mlruns" / tracking.LOCK_NAME).exists()

    url = serve_ui(clone)
    client = MlflowClient(url)
    (run,) = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    (through_server,) = client.search_runs([client.get_experiment_by_name("served").experiment_id])
    assert through_server.info.status == "FINISHED"
    assert through_server.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied: the server wrote them
    with urlopen(f"{url}/get-artifact?path={LATENT_PLOT}&run_uuid={through_server.info.run_id}", timeout=30) as plot:
        assert plot.status == 200 and plot.read().startswith(b"\x89PNG\r\n\x1a\n")
    assert [a.path for a in client.list_artifacts(through_server.info.run_id, "checkpoints")] == ["checkpoints/best.ckpt"]
    assert run.info.run_name == "vae-z4-b1-s0" and run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((clone / "mlruns" / "artifacts").resolve().as_uri())
    with urlopen(f"{url}/get-artifact?path={LATENT_PLOT}&run_uuid={run.info.run_id}", timeout=30) as plot:
        assert plot.status == 200 and plot.read().startswith(b"\x89PNG\r\n\x1a\n")
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/best.ckpt"]

    busy = run_aevae("snapshot", cwd=clone)  # the UI server holds the record
    assert busy.returncode == 2 and "mlruns: a training, sweep or `aevae ui` is using it" in busy.stderr


def test_snapshot_refuses_while_a_writer_or_a_run_is_active(demo_store, tmp_path, monkeypatch, capsys):
    shutil.copytree(demo_store / "mlruns", tmp_path / "mlruns")
    (tmp_path / ".dvc").mkdir()  # refused before dvc runs
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    opened = "import sys; from aevae import tracking; tracking.open_store(sys.argv[1]); print('open', flush=True); input()"
    with subprocess.Popen([sys.executable, "-c", opened, uri], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as writer:
        assert writer.stdout.readline() == b"open\n"  # as `aevae train` holds it until it exits
        assert main(["snapshot"]) == 2
        writer.stdin.close()
    assert "mlruns: a training, sweep or `aevae ui` is using it" in capsys.readouterr().err

    client = MlflowClient(uri)
    run = client.create_run(client.get_experiment_by_name("demo").experiment_id, run_name="vae-z2-b1-s0")
    assert main(["snapshot"]) == 2
    assert f"mlruns: 1 run(s) still RUNNING, e.g. vae-z2-b1-s0 ({run.info.run_id})" in capsys.readouterr().err
