"""The tracking server's login check: MLflow's basic auth, where a database outage answers 503, never 401."""

from __future__ import annotations

from typing import Any


def authenticate_request() -> Any:
    """MLflow's own basic-auth check, named as a custom ``authorization_function`` on purpose.

    With its default function, MLflow's FastAPI routes (the proxied artifact uploads) turn any error of the login
    check into "not authenticated": while the user database is away a worker's upload got 401, which no client
    retries, and its trial failed. Through a custom function the same error (MLflow's TEMPORARILY_UNAVAILABLE)
    answers 503, as the Flask routes already do, and MLflow's client retries it like any other outage.
    """
    from mlflow.server import auth

    return auth.authenticate_request_basic_auth()
