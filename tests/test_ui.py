"""`aevae ui`: MLflow's server over the project's record, checked with a real headless Chromium."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Iterator

import pytest
from conftest import LATENT_PLOT, REPO, run_aevae
from mlflow import MlflowClient
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from aevae.cli import main

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")  # Debian's; nothing downloads
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
)  # fmt: skip
DEMO = str(REPO / "experiments" / "vae_demo.yaml")
TINY = ("--model.hidden_dims", "[32]", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4",
        "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false")  # fmt: skip
SCREENSHOT = REPO / "out" / "ui_latent_plot.png"  # /out/ is git-ignored


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    assert CHROMIUM.is_file() and CHROMEDRIVER.is_file(), "Debian's chromium and chromium-driver: make system-deps"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_browser_opens_on_the_runs_of_an_aevae_record(tmp_path, serve_ui, browser):
    trained = run_aevae("train", "--config", DEMO, *TINY, "--analysis.umap", "false", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
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
    wait.until(lambda d: d.find_element(By.XPATH, "//*[normalize-space(text())='val/loss']"))  # the run's metrics
    for label in ("Artifacts", *LATENT_PLOT.split("/")):  # the tab, the folder, the file
        _click_text(wait, label)
    plot = wait.until(lambda d: _loaded_image(d.find_elements(By.CSS_SELECTOR, "img[src^='blob:']"), d))
    SCREENSHOT.parent.mkdir(exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))
    assert browser.execute_script("return arguments[0].naturalWidth", plot) > 100  # the logged PCA plot
    fetched = browser.execute_script(
        "return performance.getEntriesByType('resource').filter(e => e.name.includes('get-artifact'))"
        ".map(e => [decodeURIComponent(e.name), e.responseStatus])"
    )
    assert any(f"path={LATENT_PLOT}" in name for name, _ in fetched), fetched
    assert all(status == 200 for _, status in fetched), fetched


def _click_text(wait: WebDriverWait, text: str) -> None:
    wait.until(lambda d: d.find_element(By.XPATH, f"//*[normalize-space(text())='{text}']")).click()


def _loaded_image(images: list[WebElement], driver: webdriver.Chrome) -> WebElement | None:
    return next((i for i in images if driver.execute_script("return arguments[0].naturalWidth > 0", i)), None)


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
