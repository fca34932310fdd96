"""Shared fixtures: a temporary MLflow store, the UI server, and the CLI as users run it."""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.request import urlopen

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("MPLBACKEND", "Agg")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # `make test`'s parallel pass: the cores shared among its workers
    # Before numpy and torch start their thread pools. Each worker and the commands it starts get an equal share:
    # with two threads a worker on two cores, test_full_size_vae_learns took 25 s in the pass, with one 16 s.
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def no_inherited_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow sets MLFLOW_TRACKING_URI when a run starts in this process (for its subprocesses): without this,
    a test that trains in-process would send the next test's default store (./mlruns) to its own."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    """A fresh SQLite MLflow store in the test's own folder."""
    return f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


def cli_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a CLI subprocess: ours, minus any tracking URI of the machine."""
    inherited = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    return {**inherited, "MPLBACKEND": "Agg", **(env or {})}


def run_aevae(*args: str, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the `aevae` CLI in a subprocess, as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "aevae", *args],
        cwd=cwd,
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def aevae_here(capfd: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """`aevae args` in this process (its cwd and environment as the test set them): exit code, stdout, stderr.
    capfd captures the process's file descriptors, so what a library writes to the terminal is in them too."""
    from aevae.cli import main

    capfd.readouterr()
    code = main(list(args))
    out, err = capfd.readouterr()
    return code, out, err


DEMO_RUNS = ("study-demo", "vae-z4-b1-s0", "vae-z8-b4-s0", "ae-z4-s0")  # a study of two VAEs, and an AE
LATENT_PLOT, PLOT_SIDE = "latent/pca.png", 64  # a PLOT_SIDE x PLOT_SIDE PNG


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder whose mlruns/ holds DEMO_RUNS in experiment "demo", each with its LATENT_PLOT.

    Logged once per session; copy its mlruns/ into a test's own folder before using it.
    """
    import matplotlib.pyplot as plt
    import numpy as np
    from mlflow import MlflowClient

    from aevae import tracking

    folder = tmp_path_factory.mktemp("demo_store")
    uri = tracking.validate_tracking_uri(f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")
    plot = folder / Path(LATENT_PLOT).name
    plt.imsave(plot, np.linspace(0, 1, PLOT_SIDE**2).reshape(PLOT_SIDE, PLOT_SIDE))
    client = MlflowClient(uri)
    experiment = tracking.experiment_id(client, "demo", uri)
    study = client.create_run(experiment, run_name=DEMO_RUNS[0]).info.run_id
    for name in DEMO_RUNS[1:]:
        parent = {"mlflow.parentRunId": study} if name.startswith("vae") else {}
        run_id = client.create_run(experiment, run_name=name, tags=parent).info.run_id
        client.log_metric(run_id, "val/loss", 100.0, step=0)
        client.log_artifact(run_id, str(plot), str(Path(LATENT_PLOT).parent))
        client.set_terminated(run_id)
    client.set_terminated(study)
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(url: str, server: subprocess.Popen, log: Path, seconds: float) -> str:
    """url, once its /health answers; fails with the server's log if it exits or stays silent for seconds."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the server exited: {log.read_text()}"
        try:
            with urlopen(f"{url}/health", timeout=2):
                return url
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"the server did not answer within {seconds:.0f} s: {log.read_text()}")


@pytest.fixture
def serve_ui(tmp_path: Path) -> Iterator[Callable[[Path], str]]:
    """Start `aevae ui` in a folder on a free loopback port; returns its URL once it answers.

    Every server (its whole process group) is stopped when the test ends.
    """
    servers: list[subprocess.Popen] = []

    def start(cwd: Path) -> str:
        port = free_port()
        log = tmp_path / f"ui-{port}.log"
        with log.open("w") as out:
            server = subprocess.Popen(
                [sys.executable, "-m", "aevae", "ui", "--port", str(port)],
                cwd=cwd, env=cli_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        servers.append(server)
        return wait_until_healthy(f"http://127.0.0.1:{port}", server, log, seconds=90)

    yield start
    for server in servers:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(server.pid, signal.SIGKILL)  # whatever of the group is left (the uvicorn worker)
        except ProcessLookupError:
            pass
        server.wait()


@dataclass
class Postgres:
    """A throwaway PostgreSQL cluster the tests own: its URL, and stop/start to take it away for a while."""

    url: str
    command: list[str]
    data: Path
    log: Path
    options: str

    def stop(self) -> None:
        subprocess.run([*self.command, "-D", self.data, "-m", "immediate", "stop"], capture_output=True)

    def start(self) -> None:
        subprocess.run(
            [*self.command, "-D", self.data, "-l", self.log, "-o", self.options, "-w", "start"],
            check=True,
            capture_output=True,
        )


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL cluster on a free loopback port, run as the postgres OS user when we are root."""
    pg_ctl = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    assert pg_ctl, "PostgreSQL is not installed: run `make system-deps`"
    folder = Path(tempfile.mkdtemp(prefix="aevae-pg-"))
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(folder, "postgres")
    port = free_port()
    data, options = folder / "data", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [*as_postgres, pg_ctl[-1].with_name("initdb"), "-D", data, "-U", "postgres", "-A", "trust", "-N"],
        check=True,
        capture_output=True,
    )
    server = Postgres(f"postgresql://postgres@127.0.0.1:{port}/postgres", [*as_postgres, str(pg_ctl[-1])], data,
                      folder / "log", options)  # fmt: skip
    server.start()
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres: Postgres) -> str:
    """A fresh database on the session's PostgreSQL cluster: each test its own record and studies."""
    return new_database(postgres)


def new_database(postgres: Postgres) -> str:
    """The URL of a new, empty database on the cluster."""
    import sqlalchemy

    name = f"t{time.monotonic_ns()}"
    engine = sqlalchemy.create_engine(postgres.url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return f"{postgres.url.rsplit('/', 1)[0]}/{name}"


def write_idx(path: Path, array: np.ndarray) -> None:
    """An unsigned-byte IDX file, gzipped, as MNIST ships them."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def small_mnist(tmp_path: Path) -> Path:
    """<tmp>/MNIST/raw with a 20-image train set and a 10-image test set, written by the test."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for stem, n in (("train", 20), ("t10k", 10)):
        write_idx(raw / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{stem}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return raw


# --- a real browser ------------------------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")  # Debian's; nothing downloads
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
)  # fmt: skip


@pytest.fixture
def browser(tmp_path: Path) -> Iterator:
    """Headless Chromium driven by Selenium (Debian's chromium and chromium-driver)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert CHROMIUM.is_file() and CHROMEDRIVER.is_file(), "Debian's chromium and chromium-driver: make system-deps"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def see_the_latent_plot(browser, wait) -> None:
    """On a run's page: its metrics, then the Artifacts tab down to the latent plot, which must load (HTTP 200)."""
    from selenium.webdriver.common.by import By

    wait.until(lambda d: d.find_element(By.XPATH, "//*[normalize-space(text())='val/loss']"))  # the run's metrics
    for label in ("Artifacts", *LATENT_PLOT.split("/")):  # the tab, the folder, the file
        _click_text(wait, label)
    plot = wait.until(lambda d: _loaded_image(d.find_elements(By.CSS_SELECTOR, "img[src^='blob:']"), d))
    assert browser.execute_script("return arguments[0].naturalWidth", plot) > 100  # the logged PCA plot
    fetched = browser.execute_script(
        "return performance.getEntriesByType('resource').filter(e => e.name.includes('get-artifact'))"
        ".map(e => [decodeURIComponent(e.name), e.responseStatus])"
    )
    assert any(f"path={LATENT_PLOT}" in name for name, _ in fetched), fetched
    assert all(status == 200 for _, status in fetched), fetched


def _click_text(wait, text: str) -> None:
    """Click the visible element showing text (the page may also hold hidden copies of it, e.g. a tooltip)."""
    from selenium.webdriver.common.by import By

    xpath = f"//*[normalize-space(text())='{text}']"
    wait.until(lambda d: next((e for e in d.find_elements(By.XPATH, xpath) if e.is_displayed()), None)).click()


def _loaded_image(images: list, driver):
    return next((i for i in images if driver.execute_script("return arguments[0].naturalWidth > 0", i)), None)
