"""`aevae server`: a team's MLflow tracking server (PostgreSQL or SQLite, proxied artifacts, basic auth)."""

from __future__ import annotations

import configparser
import os
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from aevae import tracking
from aevae.credentials import credentials
from aevae.errors import UsageError
from aevae.ui import Parser, check_port, quiet_ui_environment, url_of

def server(args: Sequence[str]) -> int:
    """Start a team's MLflow tracking server: runs, artifacts and models of many machines in one place."""
    options = _parse(args)
    environ = dict(os.environ)
    uri, artifacts = _stores(options)
    loopback = check_port(options.host, options.port)
    auth = options.auth or not loopback
    if auth:
        _auth_environment(environ, options, uri)
    if tracking.local_store_dir(uri) is not None:  # everything checked: now the store may be made
        tracking.open_store(uri)  # its tables made once, a moved record relocated, the snapshot lock held
    quiet_ui_environment(environ)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
               "--serve-artifacts", "--artifacts-destination", artifacts,
               "--host", options.host, "--port", str(options.port), "--workers", str(options.workers)]  # fmt: skip
    if auth:
        command += ["--app-name", "basic-auth"]
    if not loopback:
        command += ["--allowed-hosts", "*"]  # the hosts that reach it are the network's business; logins guard it
    base = url_of(options.host, options.port)
    print(f"aevae server: {tracking.mask_secrets(uri)}, artifacts in {artifacts}, at {base} (Ctrl-C stops it)")
    print(f"  clients: --tracking.uri {base.rstrip('/')}  (login: MLFLOW_TRACKING_USERNAME/_PASSWORD)"
          if auth else f"  clients: --tracking.uri {base.rstrip('/')}  (no login: loopback only; --auth turns it on)")  # fmt: skip
    sys.stdout.flush()
    os.execve(sys.executable, command, environ)  # the server replaces this process: Ctrl-C reaches it directly


def _parse(args: Sequence[str]):
    parser = Parser(prog="aevae server", description=server.__doc__)
    parser.add_argument("--backend-store-uri", default=None,
                        help="postgresql://... for a team; default sqlite:///<cwd>/mlruns/mlflow.db (one machine)")  # fmt: skip
    parser.add_argument("--artifacts-destination", default=None,
                        help="folder or object-store URL (s3://, gs://); default the SQLite store's artifacts/")  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="interface; beyond loopback turns basic auth on")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2, help="server processes (default 2)")
    parser.add_argument("--auth", action="store_true", help="basic auth on loopback too (always on beyond it)")
    parser.add_argument("--credentials", type=Path, default=None,
                        help="the admin's login: an INI file readable only by you (default ~/.mlflow/credentials)")  # fmt: skip
    parser.add_argument("--auth-database-uri", default=None,
                        help="users and permissions; default the backend store's database (SQLite: beside it)")  # fmt: skip
    return parser.parse_args(args)


def _stores(options) -> tuple[str, str]:
    """The backend store URI and the artifact destination, checked (reachable, writable); nothing is made yet."""
    uri = options.backend_store_uri or tracking.default_tracking_uri()
    if uri.split(":", 1)[0] in ("http", "https"):
        raise UsageError("--backend-store-uri: a database (postgresql://..., sqlite:///...), not a server URL")
    tracking.validate_tracking_uri(uri)
    store = tracking.local_store_dir(uri)
    if options.artifacts_destination:
        artifacts = options.artifacts_destination
    elif store is not None:
        artifacts = str((store / tracking.ARTIFACTS_DIR).resolve())
    else:
        raise UsageError("--artifacts-destination: required with a database server (a folder, s3://..., gs://...)")
    if "://" not in artifacts:
        tracking.creatable_folder(Path(artifacts), "--artifacts-destination")
    return uri, artifacts


def _auth_environment(environ: dict[str, str], options, uri: str) -> None:
    """The basic-auth app's settings: admin login (never on the command line), its user database, a CSRF key."""
    login = credentials(environ, options.credentials)
    if login is None:
        raise UsageError(
            "--credentials: basic auth needs an admin login: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
            " or write them to ~/.mlflow/credentials (chmod 600)"
        )
    store = tracking.local_store_dir(uri)
    database = options.auth_database_uri or (f"sqlite:///{store.resolve() / 'basic_auth.db'}" if store else uri)
    config = configparser.ConfigParser()
    config["mlflow"] = {"default_permission": "READ", "database_uri": database, "admin_username": login[0],
                        "authorization_function": "aevae.server_auth:authenticate_request"}  # fmt: skip
    handle, path = tempfile.mkstemp(prefix="aevae-auth-", suffix=".ini")  # 0600; no password in it
    with os.fdopen(handle, "w") as ini:
        config.write(ini)
    environ.update(MLFLOW_AUTH_CONFIG_PATH=path, MLFLOW_AUTH_ADMIN_USERNAME=login[0], MLFLOW_AUTH_ADMIN_PASSWORD=login[1])
    environ.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))  # one server: a fresh key is fine
