"""`aevae server`: a real MLflow server on PostgreSQL with basic auth; sweeps, reproduce and logins through it."""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import optuna
import pytest
import requests
import yaml
from conftest import REPO, aevae_here, cli_env, free_port, new_database, run_aevae, see_the_latent_plot, wait_until_healthy
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from optuna.trial import TrialState
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = pytest.mark.xdist_group("test_server")  # `make test`: one worker runs this file, making `server` once

ADMIN, PASSWORD = "admin", "s3cr3t-Pa55word-for-tests"
LOGIN = {"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": PASSWORD}
TINY_SWEEP: dict[str, Any] = {
    "experiment": str(REPO / "experiments" / "vae_demo.yaml"),
    "overrides": {"model.hidden_dims": [32], "trainer.max_epochs": 1, "trainer.limit_train_batches": 4,
                  "trainer.limit_val_batches": 2, "trainer.enable_progress_bar": False,
                  "trainer.enable_model_summary": False, "analysis.enabled": False},  # fmt: skip
    "space": {"model.latent_dim": {"low": 2, "high": 8, "log": True}},
    "objectives": [{"metric": "val/nelbo", "direction": "minimize"}],
    "n_trials": 2,
    "heartbeat_interval": 1,
    "grace_period": 30,  # a trial is stale only if its worker died; the kill and outage tests shorten it
}


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory) -> Iterator[dict[str, str]]:
    """`aevae server` on PostgreSQL with basic auth on loopback; its URL, database and artifact folder."""
    folder = tmp_path_factory.mktemp("server")
    database, port = new_database(postgres), free_port()
    args = ["server", "--backend-store-uri", database, "--artifacts-destination", str(folder / "artifacts"),
            "--port", str(port), "--workers", "1", "--auth"]  # fmt: skip
    log = folder / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "aevae", *args], cwd=folder, env=cli_env(LOGIN),
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    url = wait_until_healthy(f"http://127.0.0.1:{port}", process, log, seconds=120)
    yield {"url": url, "database": database, "artifacts": str(folder / "artifacts"), "log": str(log)}
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture
def admin(server, monkeypatch) -> MlflowClient:
    """An MlflowClient over HTTP, logged in as the admin."""
    for key, value in LOGIN.items():
        monkeypatch.setenv(key, value)
    return MlflowClient(server["url"])


def test_a_two_worker_sweep_and_a_reproduction_land_on_the_server(
    server, admin, postgres_url, tmp_path, monkeypatch, capfd
) -> None:
    config = {**TINY_SWEEP, "overrides": {**TINY_SWEEP["overrides"], "tracking.uri": server["url"]}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    swept = run_aevae("sweep", "--config", "tiny.yaml", "--workers", "2", "--storage", postgres_url,
                      cwd=tmp_path, env=LOGIN, timeout=400)  # fmt: skip
    assert swept.returncode == 0, swept.stderr[-3000:]
    experiment = admin.get_experiment_by_name("demo")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = admin.search_runs([experiment.experiment_id])
    trials = [run for run in runs if "optuna.trial" in run.data.tags]
    assert sorted(run.data.tags["optuna.trial"] for run in trials) == ["0", "1"]
    assert len({run.data.tags["optuna.worker"] for run in trials}) == 2
    assert [run.info.status for run in runs] == ["FINISHED"] * 3  # the parent and both trials; none RUNNING
    for run in trials:
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied: written by the server
        assert [a.path for a in admin.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/best.ckpt"]
        assert (Path(server["artifacts"]) / experiment.experiment_id / run.info.run_id / "artifacts" / "config.yaml").is_file()
        logged = [*run.data.params.values(), *run.data.tags.values()]
        assert not [value for value in logged if PASSWORD in value]

    monkeypatch.chdir(tmp_path)  # best and reproduce in this process, logged in as the admin
    code, out, err = aevae_here(capfd, "best", "--study", "tiny", "--storage", postgres_url)
    best = out + err
    assert code == 0, best[-3000:]
    named = re.findall(r"MLflow run (\w+)", best)  # the best trials' runs
    assert named and set(named) <= {run.info.run_id for run in trials}, best

    code, out, err = aevae_here(capfd, "reproduce", "--study", "tiny", "--storage", postgres_url, "--tracking-uri",
                                  server["url"], "--register-as", "tiny-vae")  # fmt: skip
    reproduced = out + err
    assert code == 0, reproduced[-3000:]
    (version,) = admin.search_model_versions("name = 'tiny-vae'")
    run = admin.get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["reproduction"] == "true"
    assert "reproduction/comparison.json" in {a.path for a in admin.list_artifacts(run.info.run_id, "reproduction")}
    assert PASSWORD not in swept.stdout + swept.stderr + best + reproduced


def test_the_server_refuses_a_client_without_login(server, monkeypatch) -> None:
    for key in LOGIN:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", "/nonexistent")  # no ~/.mlflow/credentials either
    with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):
        MlflowClient(server["url"]).search_experiments()


@pytest.mark.parametrize(("login", "message"), [
    ({**LOGIN, "MLFLOW_TRACKING_PASSWORD": "wrong"}, "refused the login (user 'admin': wrong username or password"),
    ({"MLFLOW_TRACKING_USERNAME": "", "MLFLOW_TRACKING_PASSWORD": ""}, "refused the login (it needs a login"),
])  # fmt: skip
def test_a_wrong_login_is_one_line_before_any_run(server, admin, tmp_path, monkeypatch, capfd, login, message):
    runs_before = len(admin.search_runs([e.experiment_id for e in admin.search_experiments()]))
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as user:  # this login, and no ~/.mlflow/credentials, for the command only
        for key, value in {**login, "HOME": str(tmp_path)}.items():
            user.setenv(key, value)
        code, out, err = aevae_here(capfd, "train", "--config", str(REPO / "experiments" / "vae_demo.yaml"),
                                   "--tracking.uri", server["url"])  # fmt: skip
        printed = out + err
    assert code == 2
    assert printed.count("\n") == 1 and message in printed, printed
    assert "wrong" not in printed.replace("wrong username", "")  # the password is not echoed
    assert len(admin.search_runs([e.experiment_id for e in admin.search_experiments()])) == runs_before
    assert not list(tmp_path.iterdir())


def credentials_file(folder: Path, mode: int) -> Path:
    path = folder / "credentials"
    path.write_text(f"[mlflow]\nmlflow_tracking_username = {ADMIN}\nmlflow_tracking_password = {PASSWORD}\n")
    path.chmod(mode)
    return path


@pytest.mark.parametrize(("args", "message"), [
    (["--host", "0.0.0.0"], "--credentials: basic auth needs an admin login"),  # beyond loopback: auth is on
    (["--auth", "--credentials", "{group_readable}"], "readable by other users; run chmod 600"),
    (["--auth", "--credentials", "{missing}"], "--credentials: no file"),
    (["--backend-store-uri", "{postgres}"], "--artifacts-destination: required with a database server"),
    (["--backend-store-uri", "postgresql://ann:pw@127.0.0.1:1/none", "--artifacts-destination", "a"],
     "tracking.uri: cannot reach postgresql://ann:***@127.0.0.1:1/none"),
    (["--backend-store-uri", "http://127.0.0.1:5000"], "--backend-store-uri: a database"),
])  # fmt: skip
def test_server_bad_input_is_one_line_and_starts_nothing(args, message, postgres_url, tmp_path, monkeypatch, capsys):
    from aevae.cli import main

    monkeypatch.chdir(tmp_path)
    for key in LOGIN:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    values = {"group_readable": str(credentials_file(tmp_path, 0o640)), "missing": str(tmp_path / "none"),
              "postgres": postgres_url}  # fmt: skip
    args = [arg.format(**values) for arg in args]
    assert main(["server", "--port", str(free_port()), *args]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1, error
    assert PASSWORD not in error and not (tmp_path / "mlruns").exists()


@pytest.mark.serial
def test_a_sigkilled_workers_run_is_closed_on_the_server(server, admin, postgres_url, tmp_path):
    overrides = {**TINY_SWEEP["overrides"], "tracking.uri": server["url"], "trainer.max_epochs": 3,
                 "trainer.limit_train_batches": 8, "tracking.log_checkpoints": "none", "tracking.experiment": "killed"}  # fmt: skip
    (tmp_path / "killed.yaml").write_text(yaml.safe_dump({**TINY_SWEEP, "overrides": overrides, "grace_period": 3}))
    command = [sys.executable, "-m", "aevae", "sweep", "--config", "killed.yaml", "--workers", "2", "--storage", postgres_url]
    log = (tmp_path / "sweep.log").open("w")
    sweep = subprocess.Popen(command, cwd=tmp_path, env=cli_env(LOGIN), stdout=log, stderr=subprocess.STDOUT)
    experiment, killed, deadline = None, None, time.monotonic() + 300
    while killed is None and sweep.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
        experiment = experiment or admin.get_experiment_by_name("killed")
        running = [run for run in admin.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
                   if "optuna.trial" in run.data.tags] if experiment else []  # fmt: skip
        if running:
            killed = running[0]
            os.kill(int(killed.data.tags["optuna.worker"].rsplit(":", 1)[1]), signal.SIGKILL)  # its run just begun
    assert killed is not None, (tmp_path / "sweep.log").read_text()[-3000:]
    assert sweep.wait(timeout=300) == 1  # the sweep says a worker failed; the other finished the study
    assert "1 of 2 workers failed" in (tmp_path / "sweep.log").read_text()
    closed = admin.get_run(killed.info.run_id)
    assert closed.info.status == "KILLED" and "no heartbeat" in closed.data.tags["failure_reason"]
    trials = [run for run in admin.search_runs([experiment.experiment_id]) if "optuna.trial" in run.data.tags]
    assert len([run for run in trials if run.info.status == "FINISHED"]) >= 2  # the study's two trials, done
    assert not admin.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")


@pytest.mark.serial
def test_while_its_database_is_away_the_server_answers_503_never_401(server, postgres) -> None:
    """An outage must read as one (503, which MLflow's client retries), for the proxied artifact uploads too: a
    401 reads as a wrong login, which nothing retries (a sweep's trial that was uploading its config failed)."""
    login, base = (ADMIN, PASSWORD), server["url"]
    upload = f"{base}/api/2.0/mlflow-artifacts/artifacts/outage-check/note.txt"
    postgres.stop()
    try:
        answers = [requests.put(upload, data=b"x", auth=login, timeout=30).status_code,
                   requests.get(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", auth=login,
                                timeout=30).status_code]  # fmt: skip
    finally:
        postgres.start()
    assert answers == [503, 503]
    deadline = time.monotonic() + 30  # the server's pool replaces its dead connections
    while (answer := requests.put(upload, data=b"x", auth=login, timeout=30).status_code) != 200:
        assert answer == 503 and time.monotonic() < deadline, answer
        time.sleep(0.5)


OUTAGE_S = 12  # the code waits up to outage_wait (default 120 s); the test keeps it short


@pytest.mark.serial
def test_a_sweep_rides_out_its_database_going_away(server, admin, postgres, postgres_url, tmp_path):
    """PostgreSQL (the server's store and the study's) stops while both workers train, and comes back."""
    overrides = {**TINY_SWEEP["overrides"], "tracking.uri": server["url"], "trainer.max_epochs": 4,
                 "trainer.limit_train_batches": 8, "tracking.log_checkpoints": "none", "tracking.experiment": "outage"}  # fmt: skip
    # Two trials, one per worker; a grace (3 s) shorter than the outage: no heartbeat lands while the database is
    # away, and a trial must not then be failed as stale when it comes back.
    config = {**TINY_SWEEP, "overrides": overrides, "outage_wait": 60, "grace_period": 3}
    (tmp_path / "outage.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "aevae", "sweep", "--config", "outage.yaml", "--workers", "2", "--storage", postgres_url]
    log = (tmp_path / "sweep.log").open("w")
    sweep = subprocess.Popen(command, cwd=tmp_path, env=cli_env(LOGIN), stdout=log, stderr=subprocess.STDOUT)
    experiment, deadline = None, time.monotonic() + 300
    while sweep.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
        experiment = experiment or admin.get_experiment_by_name("outage")
        if experiment and len(admin.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")) == 3:
            break  # the parent and both workers' trials are running
    assert sweep.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
    postgres.stop()
    try:
        time.sleep(OUTAGE_S)
        assert sweep.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]  # still waiting, not failed
    finally:
        postgres.start()
    assert sweep.wait(timeout=300) == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    output = (tmp_path / "sweep.log").read_text()
    assert "unreachable, retrying for up to 60 s" in output and "Traceback" not in output, output[-3000:]
    study = optuna.load_study(study_name="outage", storage=postgres_url)
    reasons = [t.user_attrs.get("fail_reason") for t in study.trials]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2, reasons  # none lost, failed or re-run
    runs = admin.search_runs([experiment.experiment_id])
    assert len(runs) == 3 and {run.info.status for run in runs} == {"FINISHED"}  # the parent and both trials


def see_it_in_a_browser(browser, url: str, run) -> None:
    """What a person sees: refused without a login; logged in, the experiment's runs table (the model-training
    view, not the GenAI one) with the run, then its metrics and its latent plot among the artifacts."""
    runs_page = f"{url}/#/experiments/{run.info.experiment_id}/runs?workflowType=machine_learning"
    browser.get(runs_page)
    assert browser.execute_script("return performance.getEntriesByType('navigation')[0].responseStatus") == 401
    token = base64.b64encode(f"{ADMIN}:{PASSWORD}".encode()).decode()
    browser.execute_cdp_cmd("Network.enable", {})  # the header a browser sends once the user has typed the login
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}})
    browser.get(runs_page)
    wait = WebDriverWait(browser, 90)
    link = wait.until(lambda d: d.find_element(By.LINK_TEXT, run.info.run_name))  # a row of the runs table
    assert link.find_elements(By.XPATH, "./ancestor::*[@role='row']")
    link.click()
    see_the_latent_plot(browser, wait)


def test_train_analyze_and_compare_work_against_the_server(server, admin, browser, tmp_path, monkeypatch, capfd):
    """Each command (in this process) with the server's URL as its tracking URI; what it logged read back over
    HTTP, and the trained run seen in a real browser that logs in."""
    tiny = ["--model.init_args.hidden_dims", "[32]", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
            "--analysis.sample_size", "300", "--analysis.umap", "false", "--tracking.uri", server["url"]]  # fmt: skip
    monkeypatch.chdir(tmp_path)
    code, out, err = aevae_here(capfd, "train", "--config", str(REPO / "experiments" / "vae_demo.yaml"), *tiny,
                               "--tracking.experiment", "commands")  # fmt: skip
    trained = out + err
    assert code == 0, trained[-3000:]
    (run,) = admin.search_runs([admin.get_experiment_by_name("commands").experiment_id])
    assert run.info.status == "FINISHED" and "val/nelbo" in run.data.metrics
    logged = {a.path for path in ("", "checkpoints", "latent") for a in admin.list_artifacts(run.info.run_id, path)}
    assert {"config.yaml", "checkpoints/best.ckpt", "latent/pca.png"} <= logged
    see_it_in_a_browser(browser, server["url"], run)
    before = len(admin.get_metric_history(run.info.run_id, "silhouette_pca"))

    code, out, err = aevae_here(capfd, "analyze", "--run-id", run.info.run_id, "--tracking-uri", server["url"],
                                "--sample_size", "300")  # fmt: skip
    analyzed = out + err
    assert code == 0, analyzed[-3000:]
    assert len(admin.get_metric_history(run.info.run_id, "silhouette_pca")) == before + 1  # its new analysis
    assert admin.get_run(run.info.run_id).info.status == "FINISHED"

    code, out, err = aevae_here(capfd, "compare", "--config", str(REPO / "experiments" / "ae_vs_vae_demo.yaml"), *tiny,
                                "--compare.seeds", "[0]", "--compare.output_dir", str(tmp_path / "out"),
                                "--fit.checkpoint_dir", str(tmp_path / "ckpt"))  # fmt: skip
    compared = out + err
    assert code == 0, compared[-3000:]
    runs = admin.search_runs([admin.get_experiment_by_name("ae-vs-vae-demo").experiment_id])
    (parent,) = [r for r in runs if "compare" in r.data.tags]
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}  # the parent, an AE and a VAE
    table = admin.download_artifacts(parent.info.run_id, "compare/scores.csv", str(tmp_path))
    assert "vae" in Path(table).read_text().lower()
    assert {"compare/ae_vs_vae.png", "compare/scores.md"} <= {a.path for a in admin.list_artifacts(parent.info.run_id, "compare")}
    assert PASSWORD not in trained + analyzed + compared
