"""`pipeline ui`: MLflow's web UI on a local tracking store."""
from __future__ import annotations

import subprocess
import sys
import urllib.parse

from pipeline.errors import UserError
from pipeline.tracking.uri import check_reachable, resolve_uri


def ui(uri: str | None, host: str = "127.0.0.1", port: int = 5000, say=print) -> int:
    """Run `mlflow ui` on the store (`uri`, else as `resolve_uri`) until stopped; returns its exit code.

    A tracking server serves its own UI, so for an http(s) store there is nothing to start.
    """
    uri = resolve_uri(uri)
    if urllib.parse.urlparse(uri).scheme in ("http", "https"):
        raise UserError(f"tracking store {uri} is a server, which serves the UI itself: open {uri} in a browser")
    check_reachable(uri)
    say(f"MLflow UI for {uri} on http://{host}:{port} (Ctrl-C stops it)")
    return subprocess.call([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                            "--host", host, "--port", str(port)])
