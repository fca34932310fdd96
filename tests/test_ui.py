"""`aevae ui`: MLflow's server over the project's record, checked with a real headless Chromium."""

from __future__ import annotations

import socket

import pytest
from conftest import REPO, aevae_here, see_the_latent_plot
from mlflow import MlflowClient
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from aevae.cli import main

DEMO = str(REPO / "experiments" / "vae_demo.yaml")
TINY = ("--model.hidden_dims", "[32]", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4",
        "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false")  # fmt: skip
SCREENSHOT = REPO / "out" / "ui_latent_plot.png"  # /out/ is git-ignored


def test_browser_opens_on_the_runs_of_an_aevae_record(tmp_path, serve_ui, browser, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)  # trained in this process; `aevae ui` is a process of its own
    code, _, err = aevae_here(capfd, "train", "--config", DEMO, *TINY, "--analysis.umap", "false")
    assert code == 0, err[-2000:]
    url = serve_ui(tmp_path)
    printed = next(tmp_path.glob("ui-*.log")).read_text()
    runs_url = next(line.split("runs: ", 1)[1] for line in printed.splitlines() if "runs: " in line)
    assert "/runs?workflowType=machine_learning" in runs_url, printed
    wait = WebDriverWait(browser, 90)
    browser.get(runs_url)  # what `aevae ui` tells the user to open
    run_link = wait.until(lambda d: d.find_element(By.LINK_TEXT, "vae-z4-b1-s0"))  # a row of the runs table
    assert run_link.find_elements(By.XPATH, "./ancestor::*[@role='row']")
    wait.until(lambda d: "1 matching run" in d.find_element(By.TAG_NAME, "body").text)  # the runs table's footer
    assert MlflowClient(url).get_experiment_by_name("demo").tags["mlflow.experimentKind"] == "custom_model_development"
    run_link.click()
    see_the_latent_plot(browser, wait)
    SCREENSHOT.parent.mkdir(exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "mlruns/mlflow.db: not found; train a model (aevae train) or fetch the record (dvc pull)"),
        (["--port", "70000"], "--port: must be between 1 and 65535"),
        (["--tracking.uri", "http://localhost:5000"], "tracking.uri: aevae ui serves a local SQLite store"),
    ],
)
def test_ui_bad_input_is_one_line(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if args:
        (tmp_path / "mlruns").mkdir()
        (tmp_path / "mlruns" / "mlflow.db").touch()
    assert main(["ui", *args]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_ui_refuses_a_busy_port(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "mlruns").mkdir()
    (tmp_path / "mlruns" / "mlflow.db").touch()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["ui", "--port", str(port)]) == 2
    assert f"--port: cannot listen on 127.0.0.1:{port}: it is already in use" in capsys.readouterr().err
