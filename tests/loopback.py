"""Ports on 127.0.0.1 for the tests that start real servers (mlflow models serve, mlflow server, pipeline ui)."""
import socket
import subprocess
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_healthy(uri: str, server: subprocess.Popen, seconds: float, why_exited=lambda: "") -> None:
    """Until `uri`/health answers; AssertionError (with `why_exited()`, e.g. the end of its log) as soon as the server
    process exits, TimeoutError after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).close()
            return
        except OSError:
            assert server.poll() is None, f"the server at {uri} exited: {why_exited()}"
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server at {uri} did not answer within {seconds:.0f} s") from None
            time.sleep(0.5)
