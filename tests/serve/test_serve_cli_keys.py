"""``groundlabel serve`` with the API keys in its own environment (the local case): the local
Ray it starts inherits them, so replicas and the proxy's gate check them, and nothing of them
is in what Ray's dashboard shows (the application's runtime_env and config, issue 27)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import requests
from support import free_port

pytestmark = pytest.mark.slow
KEY = "cli-secret-key-1"

DETAILS = """
import json, sys, ray
from ray.serve.context import _get_global_client
ray.init(address=sys.argv[1], namespace="serve", log_to_driver=False)
print("DETAILS" + json.dumps(_get_global_client().get_serve_details(), default=str))
"""


def test_groundlabel_serve_keeps_keys_from_its_environment_out_of_the_runtime_env(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "GROUNDLABEL_"))}
    env.update(GROUNDLABEL_API_KEYS=KEY, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "groundlabel", "serve", "--port",
                                 str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while "answering at" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(2)
        gcs = re.search(r"on the Ray cluster at (\S+)", log.read_text()).group(1)
        # The keys reached the replicas and the proxy's gate through the inherited environment.
        r = requests.get(f"{url}/v1/models", timeout=60)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert requests.get(f"{url}/v1/models", headers={"X-API-Key": KEY},
                            timeout=60).status_code == 200
        r = requests.post(f"{url}/v1/ground", data=b"x" * 100, timeout=60,
                          headers={"x-request-timeout-seconds": "0", "X-API-Key": KEY})
        assert r.status_code == 400  # the gate in front of the proxy: installed by the CLI
        # What the dashboard shows (GET /api/serve/applications/ = get_serve_details()).
        # A second driver; a local Ray 2.60 uses token auth (~/.ray/auth_token) by default.
        got = subprocess.run([sys.executable, "-c", DETAILS, gcs], timeout=300,
                             env={**env, "RAY_AUTH_MODE": "token"},
                             capture_output=True, text=True)
        line = [x for x in got.stdout.splitlines() if x.startswith("DETAILS")]
        assert line, got.stderr[-3000:]
        details = line[0][len("DETAILS"):]
        assert "groundlabel" in json.loads(details)["applications"]
        assert KEY not in details
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
