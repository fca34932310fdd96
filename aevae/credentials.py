"""Logins for a tracking server: where clients and `aevae server` read them, and whether the server accepts them."""

from __future__ import annotations

import base64
import configparser
import os
import stat
from pathlib import Path
from typing import Mapping
from urllib.error import HTTPError
from urllib.request import Request, urlopen

from aevae.errors import UsageError

CREDENTIALS_FILE = Path("~/.mlflow/credentials")  # MLflow's own: [mlflow] mlflow_tracking_username/_password


def credentials(environ: Mapping[str, str], path: Path | None = None) -> tuple[str, str] | None:
    """(username, password) from MLFLOW_TRACKING_USERNAME/_PASSWORD, else from a credentials file that only its
    owner can read (MLflow's ~/.mlflow/credentials by default); None when neither has them."""
    user, password = environ.get("MLFLOW_TRACKING_USERNAME"), environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return user, password
    file = (path or CREDENTIALS_FILE).expanduser()
    if not file.is_file():
        if path is not None:
            raise UsageError(f"--credentials: no file {file}")
        return None
    if file.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(f"{file}: readable by other users; run chmod 600 {file}")
    parser = configparser.ConfigParser()
    parser.read(file)
    section = parser["mlflow"] if "mlflow" in parser else {}
    user, password = section.get("mlflow_tracking_username"), section.get("mlflow_tracking_password")
    return (user, password) if user and password else None


def check_login(tracking_uri: str, shown: str, environ: Mapping[str, str] = os.environ, timeout_s: int = 10) -> None:
    """An http(s) tracking server accepts our credentials (or needs none); one line naming the field if not.

    ``shown`` is the URI as messages may print it (secrets masked)."""
    login = credentials(environ)
    request = Request(f"{tracking_uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1")
    if login is not None:
        token = base64.b64encode(f"{login[0]}:{login[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        urlopen(request, timeout=timeout_s).close()
    except HTTPError as err:
        if err.code == 401:
            who = f"user {login[0]!r}: wrong username or password" if login else "it needs a login"
            raise UsageError(
                f"tracking.uri: {shown} refused the login ({who}; set"
                " MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or ~/.mlflow/credentials)"
            ) from err
        if err.code == 403:
            raise UsageError(f"tracking.uri: {shown}: permission denied") from err
        raise UsageError(f"tracking.uri: {shown} answered HTTP {err.code}") from err
