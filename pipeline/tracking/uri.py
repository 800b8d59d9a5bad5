"""Where the runs go: the tracking URI, whether its store can be used, and pointing MLflow's process-wide URI at it."""
from __future__ import annotations

import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow

from pipeline.errors import UserError

DEFAULT_URI = "sqlite:///mlflow.db"  # MLflow's own default, relative to the working directory


def resolve_uri(cfg_uri: str | None) -> str:
    """`tracking.uri` from the config, else `MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db` in the working dir."""
    return cfg_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def check_reachable(uri: str, timeout: float = 3.0) -> None:
    """Fail fast with a `UserError` if the store cannot be used; an MLflow client would retry for minutes instead.

    http(s): one short request to the server's health endpoint. sqlite / file: the folder that will hold the database
    is created if missing. Other schemes (databricks, postgresql, ...) are left to MLflow.
    """
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("http", "https"):
        _check_server(uri, timeout)
    elif scheme == "sqlite":
        _check_folder(uri, _sqlite_path(uri).parent)
    elif scheme in ("file", ""):
        _check_folder(uri, Path(urllib.parse.urlparse(uri).path if scheme else uri))


def check_exists(uri: str) -> None:
    """For commands that only read runs: a local store that does not exist is a `UserError`, not a new empty one
    (opening a sqlite URI creates its database)."""
    if urllib.parse.urlparse(uri).scheme == "sqlite" and not _sqlite_path(uri).is_file():
        raise UserError(f"no tracking store at {_sqlite_path(uri)} ({uri}): nothing was logged there; run from the "
                        "folder you trained in, or point --uri / MLFLOW_TRACKING_URI at your store")


def _check_server(uri: str, timeout: float) -> None:
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return  # the server answered (maybe 401 behind auth, or 404 on an old version): it is reachable
    except (OSError, ValueError) as e:  # URLError, refused, timeout, bad host name
        reason = getattr(e, "reason", e)
        if isinstance(reason, ssl.SSLError):
            return  # a TLS server answered; its certificate is MLflow's business (MLFLOW_TRACKING_SERVER_CERT_PATH)
        raise UserError(f"tracking server {uri} is not reachable ({reason}); start it with "
                        "'mlflow server --backend-store-uri sqlite:///mlflow.db --port 5000' or unset "
                        f"tracking.uri / MLFLOW_TRACKING_URI to use the local {DEFAULT_URI}") from e


def server_up(uri: str, timeout: float = 3.0) -> bool:
    """False only when an http(s) tracking server does not answer; local stores count as up."""
    try:
        check_reachable(uri, timeout) if urllib.parse.urlparse(uri).scheme in ("http", "https") else None
    except UserError:
        return False
    return True


def _sqlite_path(uri: str) -> Path:
    """`sqlite:///rel/x.db` -> `rel/x.db`, `sqlite:////abs/x.db` -> `/abs/x.db` (SQLAlchemy's convention)."""
    path = urllib.parse.unquote(urllib.parse.urlparse(uri).path)  # without a `?query`
    return Path(path[1:] if path.startswith("/") else path)


def _check_folder(uri: str, folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"tracking store {uri}: cannot create folder {folder} ({e.strerror}); "
                        "fix tracking.uri / MLFLOW_TRACKING_URI or the folder's permissions") from e


@contextmanager
def process_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking URI at `uri` for the duration, then put back what was there.

    For the MLflow calls that read only that URI: model logging, and looking up `models:/` URIs.
    `mlflow.set_tracking_uri` mirrors its value into the `MLFLOW_TRACKING_URI` variable (None clears both), so the
    variable alone tells what to restore. MLflow's own private helper would drop a variable the user had set.
    """
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
