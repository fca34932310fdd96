"""aevae sweep / aevae best: validation, the MLflow record, resume after SIGKILL, workers on SQLite and PostgreSQL."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import sqlalchemy
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from aevae import cli, sweep
from aevae.sweep import grid_map as sweep_map
from aevae.sweep import placement
from aevae.errors import UsageError
from conftest import REPO, cli_env, run_aevae, small_mnist

# A sweep that trains in about a second a trial: 5k embedded digits, one hidden layer, a few batches.
TINY: dict[str, Any] = {
    "experiment": str(REPO / "experiments" / "vae_demo.yaml"),
    "overrides": {
        "model.hidden_dims": [32],
        "trainer.max_epochs": 2,
        "trainer.limit_train_batches": 4,
        "trainer.enable_progress_bar": False,
        "trainer.enable_model_summary": False,
        "analysis.enabled": False,
    },
    "space": {
        "model.latent_dim": {"low": 2, "high": 8, "log": True},
        "model.kl_weight": {"low": 0.01, "high": 10.0, "log": True},
    },
    "objectives": [{"metric": "val/nelbo", "direction": "minimize"}],
    "n_trials": 3,
    "heartbeat_interval": 1,
    "grace_period": 30,  # a trial is stale only if its worker died; the kill test shortens it
}


def write_sweep(folder: Path, **changes: Any) -> Path:
    """TINY with top-level keys replaced (None removes one), as folder/tiny.yaml (study "tiny")."""
    config = {key: value for key, value in {**TINY, **changes}.items() if value is not None}
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def local_storage(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlruns' / sweep.STORE_FILE}"


def trials(storage: str, study: str = "tiny") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study, storage=storage).get_trials()


def child_runs(folder: Path) -> list[Any]:
    client = MlflowClient(f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs(client.get_experiment_by_name("demo").experiment_id)  # vae_demo.yaml's
    return [run for run in runs if "optuna.trial" in run.data.tags]


def check_one_run_per_trial(folder: Path, storage: str, n_trials: int) -> list[optuna.trial.FrozenTrial]:
    """Exactly n_trials finished, numbers unique, each with exactly one MLflow child run (its user attr)."""
    finished = [t for t in trials(storage) if t.state == TrialState.COMPLETE]
    assert len(finished) == n_trials
    assert sorted(t.number for t in finished) == list(range(n_trials))
    runs = child_runs(folder)
    assert sorted(int(run.data.tags["optuna.trial"]) for run in runs) == list(range(n_trials))
    assert {run.info.run_id for run in runs} == {t.user_attrs[sweep.RUN_ID_ATTR] for t in finished}
    return finished


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


BAD_CONFIGS = [
    ({"space": {"model.latnt_dim": {"low": 2, "high": 8}}}, "space.model.latnt_dim: no such key"),
    ({"space": {"model.latent_dim": {"low": 4, "high": 4}}}, "empty range"),
    ({"space": {"model.latent_dim": []}}, "empty list of choices"),
    ({"space": {"model.latent_dim": {"low": 8, "high": 2}}}, "low (8) > high (2)"),
    ({"space": {"model.kl_weight": {"low": 0.0, "high": 1.0, "log": True}}}, "log scale needs low > 0"),
    ({"space": {"model.latent_dim": {"low": 0, "high": 8}}}, "model.latent_dim must be in 1..4096"),
    ({"objectives": [{"metric": "val/elbo"}]}, "unknown metric 'val/elbo'"),
    ({"objectives": [{"metric": "test/recon"}], "pruner": "median"}, "must be a val/ metric"),
    ({"objectives": [{"metric": "silhouette_latent"}]}, "needs the latent analysis"),
    ({"overrides": {**TINY["overrides"], "trainer.devices": 2}}, "one device"),
    ({"storage": "postgresql://nobody@127.0.0.1:1/none"}, "storage: cannot open postgresql://nobody@127.0.0.1:1/none"),
    ({"n_trials": None}, "set n_trials or timeout"),
    ({"budget": 3}, "unknown key 'budget'"),
    ({"sampler": "grid"}, "sampler: grid needs a list of choices for every key; space.model.kl_weight is a range"),
]


@pytest.mark.parametrize("changes, message", BAD_CONFIGS, ids=[message for _, message in BAD_CONFIGS])
def test_bad_sweep_config_is_one_line_and_creates_nothing(in_tmp: Path, capsys, changes: dict, message: str) -> None:
    code = cli.main(["sweep", "--config", str(write_sweep(in_tmp, **changes))])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (in_tmp / "mlruns" / sweep.STORE_FILE).exists() and not (in_tmp / "mlruns" / "mlflow.db").exists()


def test_shipped_sweeps_are_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small_mnist(tmp_path)  # the sweeps check their data: MNIST-format files written here, no copy needed
    monkeypatch.setenv("AEVAE_DATA_ROOT", str(tmp_path))
    for path in sorted((REPO / "sweeps").glob("*.yaml")):
        assert sweep.load_sweep(str(path)).study == path.stem
    assert {"vae_latent_beta", "ae_latent"} <= {path.stem for path in (REPO / "sweeps").glob("*.yaml")}


def test_model_kind_search_samples_kl_weight_for_vaes_only(tmp_path: Path) -> None:
    space = {"model.class": ["AE", "VAE"], "model.kl_weight": {"low": 0.01, "high": 1.0, "log": True}}
    config = sweep.load_sweep(str(write_sweep(tmp_path, space=space, objectives=[{"metric": "val/recon"}])))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(6):
        params = sweep.sample(study.ask(), config)
        assert ("model.kl_weight" in params) == (params["model.class"] == "VAE"), params
    with pytest.raises(UsageError, match="only logged for VAE models"):
        sweep.load_sweep(str(write_sweep(tmp_path, space=space)))  # val/nelbo


def test_multi_objective_sweep_records_parent_children_and_pareto_front(in_tmp: Path, capsys) -> None:
    objectives = [
        {"metric": "val/recon", "direction": "minimize"},
        {"metric": "silhouette_latent", "direction": "maximize"},
    ]
    overrides = {**TINY["overrides"], "analysis.enabled": True, "analysis.umap": False, "analysis.sample_size": 200}
    path = write_sweep(in_tmp, objectives=objectives, overrides=overrides)
    assert cli.main(["sweep", "--config", str(path)]) == 0
    finished = check_one_run_per_trial(in_tmp, local_storage(in_tmp), 3)

    client = MlflowClient(f"sqlite:///{in_tmp / 'mlruns' / 'mlflow.db'}")
    (parent,) = [
        run
        for run in client.search_runs(child_runs(in_tmp)[0].info.experiment_id)
        if "optuna.trial" not in run.data.tags
    ]
    assert parent.info.status == "FINISHED" and parent.data.params["storage_kind"] == "sqlite"
    assert {"space.model.latent_dim", "space.model.kl_weight", "sampler", "pruner"} <= set(parent.data.params)
    plots = {f.path for f in client.list_artifacts(parent.info.run_id, "optuna")}
    assert {
        "optuna/pareto_front.png",
        "optuna/pareto_front.json",
        "optuna/contour_val_recon.png",
        "optuna/trials.csv",
    } <= plots
    for run, trial in zip(sorted(child_runs(in_tmp), key=lambda r: int(r.data.tags["optuna.trial"])), finished):
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.data.tags["optuna.state"] == "COMPLETE"
        assert int(run.data.params["model.latent_dim"]) == trial.params["model.latent_dim"]
        assert run.data.metrics["silhouette_latent"] == pytest.approx(trial.values[1])
        assert len(client.get_metric_history(run.info.run_id, "val/recon")) == 2  # one value per epoch
        assert any(f.path.startswith("latent/") for f in client.list_artifacts(run.info.run_id, "latent"))

    capsys.readouterr()
    assert cli.main(["best", "--study", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "3 trials (3 complete)" in out and "Pareto front" in out and parent.info.run_id in out
    pareto = optuna.load_study(study_name="tiny", storage=local_storage(in_tmp)).best_trials
    assert pareto and all(t.user_attrs[sweep.RUN_ID_ATTR] in out for t in pareto)

    assert cli.main(["sweep", "--config", str(path)]) == 0  # the same command again: nothing more to run
    check_one_run_per_trial(in_tmp, local_storage(in_tmp), 3)


def test_grid_sweep_visits_every_cell_once_and_draws_the_map(in_tmp: Path) -> None:
    space = {"model.latent_dim": [2, 4], "model.kl_weight": [0.1, 1.0]}
    overrides = {**TINY["overrides"], "analysis.enabled": True, "analysis.umap": False, "analysis.sample_size": 200}
    path = write_sweep(in_tmp, space=space, overrides=overrides, sampler="grid", n_trials=4)
    assert cli.main(["sweep", "--config", str(path), "--workers", "2"]) == 0
    finished = check_one_run_per_trial(in_tmp, local_storage(in_tmp), 4)
    cells = sorted((t.params["model.latent_dim"], t.params["model.kl_weight"]) for t in finished)
    assert cells == [(2, 0.1), (2, 1.0), (4, 0.1), (4, 1.0)]
    for trial in finished:
        scores = trial.user_attrs[sweep_map.SCORES_ATTR]
        assert scores["val/nelbo"] == pytest.approx(trial.value)
        assert -1 <= scores["silhouette_latent"] <= 1 and scores["val/recon"] > 0

    xs, ys, grid = sweep_map.grid_values(finished, ("model.latent_dim", "model.kl_weight"), "val/nelbo")
    assert xs == [2, 4] and ys == [0.1, 1.0] and np.isfinite(grid).all()
    parent = child_runs(in_tmp)[0].data.tags["mlflow.parentRunId"]
    client = MlflowClient(f"sqlite:///{in_tmp / 'mlruns' / 'mlflow.db'}")
    assert "optuna/map.png" in {f.path for f in client.list_artifacts(parent, "optuna")}


def test_pareto_front_keeps_exactly_the_undominated_points() -> None:
    points = np.array([[1.0, 0.1], [2.0, 0.3], [1.5, 0.05], [3.0, 0.3], [0.5, -0.2]])  # (cost, gain)
    assert sweep_map.pareto_front(points).tolist() == [4, 0, 1]


def test_pruned_and_diverged_trials_are_recorded_and_the_sweep_goes_on(in_tmp: Path, capsys) -> None:
    # Random draws with seed 4: lr 1e6 (NaN in the first epoch: FAIL), 1e-6, 1e-2, then 1e-6 again, which the
    # median pruner stops after the first epoch: its val/loss is above the median of the two completed trials.
    space = {"model.lr": [0.01, 1e-6, 1e6]}
    objectives = [{"metric": "val/loss", "direction": "minimize"}]
    pruner = {"name": "median", "n_startup_trials": 1}
    path = write_sweep(
        in_tmp, space=space, objectives=objectives, pruner=pruner, sampler={"name": "random", "seed": 4}, n_trials=4
    )
    assert cli.main(["sweep", "--config", str(path)]) == 0
    study = trials(local_storage(in_tmp))
    states = {t.number: t.state for t in study}
    runs = {int(run.data.tags["optuna.trial"]): run for run in child_runs(in_tmp)}
    assert {TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL} <= set(states.values()), states
    for trial in study:
        run = runs[trial.number]
        assert run.data.tags["optuna.state"] == trial.state.name
        assert (
            run.info.status
            == {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}[trial.state]
        )
        if trial.state == TrialState.FAIL:
            assert "diverged" in trial.user_attrs["fail_reason"] and "diverged" in run.data.tags["failure_reason"]
    capsys.readouterr()
    assert cli.main(["best", "--study", "tiny"]) == 0
    best = min((t for t in study if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert f"trial {best.number}: val/loss=" in capsys.readouterr().out


@pytest.mark.serial
def test_sigkilled_worker_trial_is_retried_and_its_run_killed(in_tmp: Path) -> None:
    tmp_path = in_tmp
    overrides = {**TINY["overrides"], "trainer.max_epochs": 40, "trainer.limit_train_batches": 8}  # seconds a trial
    path = write_sweep(tmp_path, overrides=overrides, n_trials=2, grace_period=3)  # the retry waits out the grace
    storage = local_storage(tmp_path)
    log = (tmp_path / "killed.log").open("w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "aevae", "sweep", "--config", str(path)],
        cwd=tmp_path,
        env=cli_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 240
    running: list[optuna.trial.FrozenTrial] = []
    while time.monotonic() < deadline and worker.poll() is None:  # kill once trial 1 trains (trial 0 is done)
        time.sleep(0.3)
        if not Path(storage.removeprefix("sqlite:///")).exists():
            continue  # polling an existing study creates nothing
        try:
            study = trials(storage)
        except (KeyError, sqlalchemy.exc.SQLAlchemyError):  # the database is there (or being made), the study not yet
            continue
        if not any(t.number == 0 and t.state == TrialState.COMPLETE for t in study):
            continue
        running = [t for t in study if t.number == 1 and t.state == TrialState.RUNNING]
        if running and sweep.RUN_ID_ATTR in running[0].user_attrs:
            worker.send_signal(signal.SIGKILL)
            break
    assert worker.wait() == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    killed = running[0]
    first_run_of_trial_0 = {run.info.run_id for run in child_runs(tmp_path) if run.data.tags["optuna.trial"] == "0"}

    assert cli.main(["sweep", "--config", str(path)]) == 0  # the same command again, here in-process
    study = trials(storage)
    assert [t.state for t in study] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    retry = study[2]
    assert retry.system_attrs["failed_trial"] == 1 and retry.params == killed.params
    assert sweep.counted(study) == 2
    runs = {run.info.run_id: run for run in child_runs(tmp_path)}
    assert runs[killed.user_attrs[sweep.RUN_ID_ATTR]].info.status == "KILLED"
    assert "no heartbeat" in runs[killed.user_attrs[sweep.RUN_ID_ATTR]].data.tags["failure_reason"]
    assert {r for r, run in runs.items() if run.data.tags["optuna.trial"] == "0"} == first_run_of_trial_0  # not re-run
    assert not [run for run in runs.values() if run.info.status == "RUNNING"]


def test_interrupted_trial_is_queued_again_and_the_parent_run_killed(in_tmp: Path, monkeypatch) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise SystemExit(1)  # what Lightning makes of Ctrl-C (or SIGTERM, which a sweep turns into Ctrl-C) in fit

    monkeypatch.setattr(sweep.training, "run_training", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["sweep", "--config", str(write_sweep(in_tmp, n_trials=1))])
    failed, queued = trials(local_storage(in_tmp))
    assert (failed.state, queued.state) == (TrialState.FAIL, TrialState.WAITING)
    assert queued.params == failed.params and queued.system_attrs["retry_history"] == [0]
    client = MlflowClient(f"sqlite:///{in_tmp / 'mlruns' / 'mlflow.db'}")
    (parent,) = client.search_runs(client.get_experiment_by_name("demo").experiment_id)
    assert parent.info.status == "KILLED"


def test_two_machines_share_one_study_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    """The same command started twice at once against one PostgreSQL study, as on two machines of a cluster."""
    command = [
        sys.executable,
        "-m",
        "aevae",
        "sweep",
        "--config",
        str(write_sweep(tmp_path, n_trials=4)),
        "--storage",
        postgres_url,
    ]
    workers = [
        subprocess.Popen(
            command, cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    for worker in workers:
        assert worker.wait(timeout=300) == 0, worker.stderr.read()[-3000:]
    check_one_run_per_trial(tmp_path, postgres_url, 4)
    assert len({run.data.tags["optuna.worker"] for run in child_runs(tmp_path)}) == 2


# --- checks before a sweep starts, and how it ends -------------------------------------------------


def sweep_cli(folder: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_aevae("sweep", "--config", str(folder / "tiny.yaml"), *args, cwd=folder, env=env)


def error_lines(stderr: str) -> list[str]:
    """stderr without the progress bar's frames: what the user is told."""
    frames = [part for line in stderr.splitlines() for part in line.split("\r")]
    return [line for line in frames if line.strip() and not line.lstrip().startswith("sweep tiny:")]


def test_sweep_without_its_data_is_one_line_and_writes_nothing(in_tmp: Path) -> None:
    overrides = {**TINY["overrides"], "data.source": "mnist"}
    write_sweep(in_tmp, overrides=overrides)
    result = sweep_cli(in_tmp, env={"AEVAE_DATA_ROOT": str(in_tmp / "no-data")})
    assert result.returncode == 2, result.stderr[-3000:]
    assert error_lines(result.stderr) == [result.stderr.strip()]
    assert "experiment: data.source=mnist: train-images-idx3-ubyte.gz not found" in result.stderr
    assert not (in_tmp / "mlruns").exists()  # no study, no parent run, no store


def test_a_trial_that_fails_on_bad_input_stops_the_sweep_at_once(in_tmp: Path) -> None:
    # The base experiment trains and is analysed; the searched latent_dim 1 builds (the space check passes) but has no
    # 2-D projection, which only the trial's own pre-check finds: every trial would fail alike, so the first one
    # stops the sweep with its one line. (A missing data set is found earlier, by the space check: no trial at all.)
    analysed = {**TINY["overrides"], "analysis.enabled": True, "analysis.umap": False}
    write_sweep(in_tmp, overrides=analysed, space={"model.latent_dim": [1]}, n_trials=3)
    result = sweep_cli(in_tmp)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("aevae sweep: error: model.latent_dim: a 2-D projection"), lines
    (trial,) = trials(local_storage(in_tmp))
    assert trial.state == TrialState.FAIL and "latent_dim >= 2" in trial.user_attrs["usage_error"]
    client = MlflowClient(f"sqlite:///{in_tmp / 'mlruns' / 'mlflow.db'}")
    (parent,) = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
                 if r.data.tags.get("aevae.sweep") == "parent"]  # fmt: skip
    assert parent.info.status == "FAILED"


def test_a_sweep_whose_trials_all_failed_exits_1_without_plot_warnings(in_tmp: Path) -> None:
    write_sweep(in_tmp, space={"model.lr": [1e6]}, objectives=[{"metric": "val/loss"}], n_trials=2)
    result = sweep_cli(in_tmp)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert [line for line in lines if line.startswith("trial ")] == [
        f"trial {n} failed: TrainingDiverged: {lines[0].partition('TrainingDiverged: ')[2]}" for n in (0, 1)
    ]
    assert lines[-1].startswith("aevae sweep: all 2 trials failed; the last: TrainingDiverged: ")
    assert len(lines) == 3 and "Traceback" not in result.stderr and "plot" not in result.stderr, lines
    assert [t.state for t in trials(local_storage(in_tmp))] == [TrialState.FAIL, TrialState.FAIL]


def test_sweep_progress_and_summary_without_library_chatter(in_tmp: Path) -> None:
    write_sweep(in_tmp, n_trials=2)
    result = sweep_cli(in_tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("study tiny: 2 trials (2 complete)") and "open it: aevae ui" in result.stdout
    final = result.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert "2/2" in final and "2 complete, 0 pruned, 0 failed | best val/nelbo=" in final, final
    assert error_lines(result.stderr) == [], result.stderr[-3000:]  # no banner, tip, warning or Optuna INFO line
    quiet = run_aevae("best", "--study", "tiny", "--quiet", cwd=in_tmp)
    assert quiet.stdout.startswith("study tiny: 2 trials") and quiet.stderr == ""


# --- worker placement on GPUs -------------------------------------------------------------------------


PLACEMENTS = [  # workers, GPUs, each worker's GPU
    (1, [], [None]),
    (3, [], [None, None, None]),
    (2, ["0", "1"], ["0", "1"]),
    (4, ["0", "1"], ["0", "1", "0", "1"]),
    (3, ["2"], ["2", "2", "2"]),
    (1, ["0", "1", "2", "3"], ["0"]),
    (3, ["3", "1"], ["3", "1", "3"]),
]


@pytest.mark.parametrize("workers, gpus, expected", PLACEMENTS)
def test_workers_are_placed_round_robin_on_the_gpus(workers: int, gpus: list[str], expected: list) -> None:
    assert placement.place(workers, gpus) == expected


def test_gpu_lists_and_threads() -> None:
    assert placement.parse_gpus("0,2", ["0", "1", "2"]) == ["0", "2"]
    assert placement.parse_gpus(" 1 ", ["4", "5"]) == ["5"]  # an index among the visible GPUs -> its physical id
    assert placement.parse_gpus(None, ["4", "5"]) == ["4", "5"]
    for text, message in (("0,0", "listed twice"), ("3", "no GPU 3"), ("a", "expected GPU indices"), ("", "expected")):
        with pytest.raises(UsageError, match=f"--gpus: .*{message}"):
            placement.parse_gpus(text, ["0", "1"])
    assert [placement.threads_per_worker(n, 16) for n in (1, 2, 3, 16, 32)] == [16, 8, 5, 1, 1]


def test_bad_gpu_list_is_one_line_and_creates_nothing(in_tmp: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv(placement.FAKE_GPUS_ENV, "2")
    assert cli.main(["sweep", "--config", str(write_sweep(in_tmp)), "--workers", "2", "--gpus", "0,2"]) == 2
    assert capsys.readouterr().err.strip() == "aevae sweep: error: --gpus: no GPU 2; this machine shows 2 (indices 0..1)"
    assert not (in_tmp / "mlruns").exists()


def test_two_workers_share_one_study_on_sqlite_each_trial_recording_its_workers_gpu(in_tmp: Path) -> None:
    # Two GPUs stated (placement runs as on a GPU machine); the trials still train on this machine's CPU.
    write_sweep(in_tmp, n_trials=4)
    result = sweep_cli(in_tmp, "--workers", "2", "--gpus", "1,0", env={placement.FAKE_GPUS_ENV: "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    check_one_run_per_trial(in_tmp, local_storage(in_tmp), 4)
    runs = child_runs(in_tmp)
    assert len(runs) == 4 and {run.data.tags["device"] for run in runs} == {"cpu"}
    gpu_of_worker = {run.data.tags["optuna.worker"]: run.data.tags["worker.gpu"] for run in runs}
    assert sorted(gpu_of_worker.values()) == ["0", "1"]  # two workers, one GPU each
    for run in runs:
        assert run.data.tags["worker.gpu"] == gpu_of_worker[run.data.tags["optuna.worker"]]
