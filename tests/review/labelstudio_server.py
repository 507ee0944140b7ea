"""Start a real, throw-away Label Studio server for a test (no pytest tests in this module).

Label Studio (Django, ~160 packages, ~800 MB) lives in its own venv, /work/main/.venv-ls, so its
pins (numpy, opencv, pyjwt) never touch .venv; `make` / CI install it with
`python3 -m venv .venv-ls && UV_LINK_MODE=copy uv pip install --python .venv-ls/bin/python
label-studio==1.23.2` (copy mode: Label Studio rewrites a file of its own package at runtime,
which with uv's default hardlinks would alter uv's cache).
Tests talk to it over HTTP only.

    with start_label_studio(tmp_path) as (base_url, token):
        requests.get(f"{base_url}/api/projects", headers={"Authorization": f"Token {token}"})

A first start on an empty data dir runs the migrations: ~35-40 s on 2 CPU cores; a restart on
the same dir takes ~3 s. Prefer one server per session (tmp_path_factory) over one per test.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LS_VENV = REPO / ".venv-ls"
LS_BIN = LS_VENV / "bin" / "label-studio"

USERNAME = "test@localhost"
PASSWORD = "test-password-123"


def label_studio_available() -> bool:
    """True where the separate Label Studio venv is installed (tests skip otherwise)."""
    return LS_BIN.is_file() and os.access(LS_BIN, os.X_OK)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextmanager
def start_label_studio(tmp_dir: str | os.PathLike, timeout: float = 240.0
                       ) -> Iterator[tuple[str, str]]:
    """Run Label Studio on a free localhost port with all state under tmp_dir; yield
    (base_url, api_token) once /health answers; kill its process group on exit.

    api_token is a legacy DRF token: send it as `Authorization: Token <api_token>`."""
    tmp_dir = Path(tmp_dir)
    data_dir = tmp_dir / "ls-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    # The user and its token are created on the first start only: keep the token next to the
    # database so a later start on the same data dir (~3 s, no migrations) still works.
    token_file = data_dir / "api-token"
    if not token_file.is_file():
        token_file.write_text(secrets.token_hex(20))  # 40 hex chars, like a DRF token key
    token = token_file.read_text().strip()

    env = {k: v for k, v in os.environ.items()
           # Label Studio reads every setting as LABEL_STUDIO_X, HEARTEX_X or bare X: drop
           # anything inherited that could point it at another database or settings module.
           if not k.startswith(("LABEL_STUDIO_", "HEARTEX_", "DJANGO_", "PYTHON", "VIRTUAL_ENV"))}
    env.update({
        # sqlite database, media, uploads and exports all go here, never to ~/.local/share.
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        # Absolute URLs the server builds (export links, local files) point back at this port.
        "LABEL_STUDIO_HOST": base_url,
        # `start` creates this admin user non-interactively (else it prompts, or has no user).
        "LABEL_STUDIO_USERNAME": USERNAME,
        "LABEL_STUDIO_PASSWORD": PASSWORD,
        # ...and sets its legacy API token to this known value,
        "LABEL_STUDIO_USER_TOKEN": token,
        # ...which is only accepted if legacy tokens are on for the organization. Since 1.18
        # they are off by default (JWT personal access tokens instead): `Authorization: Token`
        # then gets 401 "legacy token authentication has been disabled".
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        # Nobody else can sign up on this port.
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        # No network: the OSS settings default to real Sentry DSNs (backend and frontend) ...
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        # ... importing the app asks pypi.org for the latest version (10 s timeout) ...
        "LATEST_VERSION_CHECK": "false",
        # ... and the frontend would send usage analytics.
        "COLLECT_ANALYTICS": "false",
        # Label Studio runs `git describe/show` from its package dir to report its version;
        # without a ceiling git finds *our* repo and it writes our commit into the venv.
        "GIT_CEILING_DIRECTORIES": str(REPO),
    })
    cmd = [str(LS_BIN), "start", "--no-browser", "--internal-host", "127.0.0.1",
           "--port", str(port), "--data-dir", str(data_dir), "--log-level", "WARNING"]
    log_path = tmp_dir / "label-studio.log"
    with open(log_path, "wb") as log:  # a file, not a pipe: a full pipe would block the server
        # Own session/process group so teardown can kill it and anything it spawned.
        proc = subprocess.Popen(cmd, cwd=tmp_dir, env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while not _healthy(base_url):
                if proc.poll() is not None:
                    raise RuntimeError(f"label-studio exited with {proc.returncode}:\n"
                                       + log_path.read_text(errors="replace")[-3000:])
                if time.monotonic() > deadline:
                    # Also the symptom if the port was taken meanwhile: label-studio then
                    # silently moves to the next free port ("Port N is in use" in the log).
                    raise TimeoutError(f"label-studio not healthy at {base_url} after "
                                       f"{timeout:.0f}s:\n"
                                       + log_path.read_text(errors="replace")[-3000:])
                time.sleep(0.5)
            yield base_url, token
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


def invite_user(base_url: str, token: str, email: str, password: str) -> str:
    """Sign a second person up the way people join (the organization's invite link and the
    signup form), then read their own legacy API token as them; returns that token."""
    import requests

    admin = requests.Session()
    admin.headers["Authorization"] = f"Token {token}"
    r = admin.get(f"{base_url}/api/invite", timeout=60)
    r.raise_for_status()
    person = requests.Session()
    page = person.get(base_url + r.json()["invite_url"], timeout=60)
    page.raise_for_status()
    r = person.post(page.url, data={"email": email, "password": password,
                                    "csrfmiddlewaretoken": person.cookies.get("csrftoken"),
                                    "allow_newsletters": "false"},
                    headers={"Referer": page.url}, allow_redirects=False, timeout=60)
    if r.status_code != 302:  # the form is shown again, with its errors
        raise RuntimeError(f"signup of {email} failed: HTTP {r.status_code}")
    r = person.get(f"{base_url}/api/current-user/token", timeout=60)
    r.raise_for_status()
    return r.json()["token"]
