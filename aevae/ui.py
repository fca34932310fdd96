"""`aevae ui` serves the tracking record with MLflow's own server; `aevae snapshot` versions it with DVC."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import MutableMapping, NoReturn, Sequence

import yaml

from aevae import tracking
from aevae.errors import UsageError

SNAPSHOT_TARGET = tracking.DEFAULT_STORE  # the folder that mlruns.dvc versions


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes are UsageErrors (one line, exit code 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def ui(args: Sequence[str]) -> int:
    """Serve the tracking record (runs, studies, artifacts) in MLflow's UI."""
    parser = Parser(prog="aevae ui", description=ui.__doc__)
    parser.add_argument("--port", type=int, default=5000, help="TCP port (default 5000)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind; default loopback only")
    parser.add_argument("--tracking.uri", dest="uri", default=None, help="SQLite store; default ./mlruns/mlflow.db")
    options = parser.parse_args(args)
    uri = options.uri or tracking.default_tracking_uri()
    store = tracking.local_store_dir(uri)
    if store is None:
        raise UsageError(f"tracking.uri: aevae ui serves a local SQLite store (sqlite:///.../mlflow.db), got {uri!r}")
    if not (store / tracking.DB_NAME).is_file():
        raise UsageError(f"{store / tracking.DB_NAME}: not found; train a model (aevae train) or fetch the record (dvc pull)")
    loopback = check_port(options.host, options.port)
    tracking.open_store(uri)  # relocates a moved record; the server inherits the lock that blocks snapshots
    print(f"aevae ui: serving {store} at {url_of(options.host, options.port)} (Ctrl-C stops it)")
    print(f"  runs: {runs_page(url_of(options.host, options.port), uri)}")
    if loopback:
        print(f"  bound to {options.host}, loopback: only this machine can open it (--host 0.0.0.0 shares it)")
    else:
        print(f"  WARNING: bound to {options.host}: anyone who can reach port {options.port} can read, change and "
              "delete runs; MLflow has no authentication")  # fmt: skip
    sys.stdout.flush()
    quiet_ui_environment(os.environ)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
               "--artifacts-destination", str((store / tracking.ARTIFACTS_DIR).resolve()),
               "--host", options.host, "--port", str(options.port), "--workers", "1"]  # fmt: skip
    os.execv(sys.executable, command)  # the server replaces this process: Ctrl-C and kill reach it directly


def quiet_ui_environment(environ: MutableMapping[str, str]) -> None:
    """MLflow's server as a researcher's UI: no telemetry, no remote assistant, no GenAI job runners, unless the
    user set these variables themselves."""
    environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # also turns the UI's telemetry off (its config says so)
    environ.setdefault("DO_NOT_TRACK", "true")
    environ.setdefault("MLFLOW_ENABLE_REMOTE_ASSISTANT", "false")  # the assistant answers loopback only, if set up
    environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # no GenAI job runner processes


def runs_page(base_url: str, tracking_uri: str) -> str:
    """The runs table of the experiment with the latest run, in MLflow's model-training view (not GenAI)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    latest = client.search_runs(experiments, order_by=["attributes.start_time DESC"], max_results=1) if experiments else []
    page = f"experiments/{latest[0].info.experiment_id}/runs" if latest else "experiments"
    return f"{base_url}#/{page}?workflowType=machine_learning"


def check_port(host: str, port: int) -> bool:
    """Fail with one line unless ``host:port`` can be listened on; True if ``host`` is loopback."""
    if not 1 <= port <= 65535:
        raise UsageError(f"--port: must be between 1 and 65535, got {port}")
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise UsageError(f"--host: cannot resolve {host!r} ({err.strerror})") from err
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            probe.bind(address)
        except OSError as err:
            reason = "it is already in use; choose another --port" if err.errno == errno.EADDRINUSE else err.strerror
            raise UsageError(f"--port: cannot listen on {host}:{port}: {reason}") from err
    return ipaddress.ip_address(address[0]).is_loopback


def url_of(host: str, port: int) -> str:
    """The address to open in a browser (0.0.0.0 and :: listen everywhere, this machine included)."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}/"


def snapshot(args: Sequence[str]) -> int:
    """Record ./mlruns with DVC (dvc add) and push it to the default remote, if one is set."""
    Parser(prog="aevae snapshot", description=snapshot.__doc__).parse_args(args)
    store = SNAPSHOT_TARGET
    if not Path(".dvc").is_dir():
        raise UsageError(".dvc: not found; run it at the root of the aevae checkout (a DVC project)")
    if not (store / tracking.DB_NAME).is_file():
        raise UsageError(f"{store}: no tracking record ({tracking.DB_NAME}) to record")
    fd = tracking.lock_store(store, exclusive=True)
    if fd is None:
        raise UsageError(f"{store}: a training, sweep or `aevae ui` is using it; snapshot when it has ended")
    try:
        running = tracking.running_runs(store)
        if running:
            name, run_id = running[0]
            raise UsageError(
                f"{store}: {len(running)} run(s) still RUNNING, e.g. {name} ({run_id}); wait for them"
                f" to end (if the process died: MlflowClient().set_terminated('{run_id}', 'KILLED'))"
            )
        _dvc("add", str(store))
        remote = _dvc("remote", "default", check=False)
        if remote:
            _dvc("push", f"{store}.dvc")
    finally:
        os.close(fd)
    out = yaml.safe_load(Path(f"{store}.dvc").read_text())["outs"][0]
    print(f"recorded {store}/ in {store}.dvc ({out.get('nfiles')} files, {out.get('size', 0) / 1e6:.1f} MB)")
    print(f"pushed to DVC remote {remote!r}" if remote else "no default DVC remote: kept in .dvc/cache only")
    print(f"share it: git add {store}.dvc && git commit -m 'Snapshot {store}' && git push")
    return 0


def _dvc(*args: str, check: bool = True) -> str:
    """Run a dvc command here; its stdout, or a UsageError with dvc's last line when it fails."""
    result = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True)
    if result.returncode != 0 and check:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise UsageError(f"dvc {' '.join(args)}: {lines[-1]}")
    return result.stdout.strip() if result.returncode == 0 else ""
