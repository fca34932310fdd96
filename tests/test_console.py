"""What a user sees: progress and results without library chatter, --quiet, and the exit code of an interrupt."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import REPO, cli_env, run_aevae

CHATTER = ("Tip:", "GPU available", "TPU available", "Warning", "warn", "deprecated", "log_every_n_steps",
           "transfer_batch_to_device", "Restoring states", "Loaded model weights", "INFO", "Tensorflow")  # fmt: skip
TRAIN = [
    "train", "--config", str(REPO / "experiments" / "vae_demo.yaml"), "--model.hidden_dims", "[32]",
    "--trainer.limit_train_batches", "3", "--analysis.enabled", "false",
]  # fmt: skip


def told(stderr: str, bar: str) -> list[str]:
    """stderr without the progress bar's frames (tqdm redraws one line with carriage returns)."""
    frames = [part for line in stderr.splitlines() for part in line.split("\r")]
    return [line for line in frames if line.strip() and not line.lstrip().startswith(bar)]


def test_compare_shows_progress_and_the_table_and_no_library_chatter(tmp_path: Path) -> None:
    result = run_aevae(
        "compare", "--config", str(REPO / "experiments" / "ae_vs_vae_demo.yaml"), "--model.init_args.hidden_dims",
        "[32]", "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3", "--analysis.sample_size", "300",
        "--analysis.umap", "false", "--compare.seeds", "[0]", "--compare.output_dir", str(tmp_path / "out"),
        cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "| silhouette_pca |" in out and f"figure: {tmp_path / 'out' / 'ae_vs_vae.png'}" in out
    assert "parent run " in out and out.strip().endswith("open it: aevae ui")
    assert not [word for word in CHATTER if word in out + result.stderr], result.stderr[-3000:]
    assert told(result.stderr, "compare:") == [], result.stderr[-3000:]
    final = result.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert "4/4" in final and "run 2/2 vae seed 0 epoch 2/2 val/loss " in final, final


def test_quiet_prints_only_the_result(tmp_path: Path) -> None:
    result = run_aevae(*TRAIN, "--trainer.max_epochs", "1", "--quiet", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == "" and len(result.stdout.splitlines()) == 1
    assert result.stdout.startswith("run ") and " finished: sqlite:///" in result.stdout


@pytest.mark.serial
def test_ctrl_c_is_one_line_and_exit_code_130(tmp_path: Path) -> None:
    train = subprocess.Popen(
        [sys.executable, "-m", "aevae", *TRAIN, "--trainer.max_epochs", "100000"],  # never ends by itself
        cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # As from a terminal: a suite started in the background (`make test &`) ignores SIGINT, and children inherit it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    store = tmp_path / "mlruns" / "mlflow.db"
    deadline, logged = time.monotonic() + 240, 0
    while not logged and time.monotonic() < deadline and train.poll() is None:  # interrupt once an epoch is logged
        time.sleep(0.5)
        try:
            with closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30)) as db:  # no reader left open
                logged = db.execute("select count(*) from metrics where key = 'val/loss'").fetchone()[0]
        except sqlite3.Error:  # not created yet, or its tables not yet
            continue
    train.send_signal(signal.SIGINT)
    out, err = train.communicate(timeout=120)
    assert logged, f"no epoch logged within 240 s: {err[-3000:]}"
    assert train.returncode == 130, err[-3000:]
    headlines = "\n".join(line for line in err.splitlines() if not line.startswith((" ", "\t")))  # no frames
    assert err.strip().splitlines()[-1] == "aevae: interrupted" and "Traceback" not in err, headlines[-3000:]
    client = MlflowClient(f"sqlite:///{store}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "KILLED"
