"""Start a real, throw-away MLflow tracking server for a test (no pytest tests in this module).

The server (full ``mlflow``, whose pins of pyarrow and cachetools do not fit .venv) lives in its
own venv, .venv-mlflow, built by ``make mlflow`` from requirements/mlflow.lock.txt; .venv has
only the client (``mlflow-skinny``). Tests talk to it over HTTP only: runs are written by
groundlabel's own client and read back through the server's REST API.

    with start_mlflow(tmp_path) as url:
        requests.post(f"{url}/api/2.0/mlflow/runs/search", json={"experiment_ids": ["0"]})
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from support import free_port

REPO = Path(__file__).resolve().parents[2]
MLFLOW_VENV = REPO / ".venv-mlflow"
MLFLOW_BIN = MLFLOW_VENV / "bin" / "mlflow"


def mlflow_available() -> bool:
    """True where the separate MLflow server venv is installed (tests skip otherwise)."""
    return MLFLOW_BIN.is_file() and os.access(MLFLOW_BIN, os.X_OK)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextmanager
def start_mlflow(tmp_dir: str | os.PathLike, timeout: float = 180.0) -> Iterator[str]:
    """Run ``mlflow server`` on a free loopback port, its runs in a SQLite file and its
    artifacts (uploaded through the server) in a folder, all under ``tmp_dir``; yield its URL
    once /health answers; kill its process group on exit."""
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # nothing inherited may point the server at another store or server
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "PYTHON", "VIRTUAL_ENV"))}
    # no usage telemetry to MLflow's hosts (the server, and the UI it serves)
    env.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    cmd = [str(MLFLOW_BIN), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{tmp_dir / 'mlflow.db'}",
           "--artifacts-destination", str(tmp_dir / "artifacts"), "--workers", "1"]
    log_path = tmp_dir / "mlflow-server.log"
    with open(log_path, "wb") as log:  # a file, not a pipe: a full pipe would block the server
        proc = subprocess.Popen(cmd, cwd=tmp_dir, env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while not _healthy(url):
                if proc.poll() is not None:
                    raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n"
                                       + log_path.read_text(errors="replace")[-3000:])
                if time.monotonic() > deadline:
                    raise TimeoutError(f"mlflow server not healthy at {url} after "
                                       f"{timeout:.0f}s:\n"
                                       + log_path.read_text(errors="replace")[-3000:])
                time.sleep(0.5)
            yield url
        finally:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:  # already gone
                pass
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
