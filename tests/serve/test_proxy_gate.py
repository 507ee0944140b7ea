"""The request gate installed in Ray Serve's own HTTP proxy (Ray's
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` hook, set in tests/serve/conftest.py before Ray
starts), in front of a plain echo deployment with few replica slots: no engine, so the proxy's
part is seen alone. (The endpoint itself under the same clients: test_serve_hostile.py.)"""

from __future__ import annotations

import time

import pytest
import requests
from fastapi import FastAPI, Request  # module level: the route's annotations resolve here
from support import free_port, raw_post_head, read_status, send_body

KEY, KEY2 = "proxy-key-1", "proxy-key-2"


@pytest.fixture(scope="module")
def echo(ray_local, tmp_path_factory, proxy_gate):
    from ray import serve

    from serve.config import ServeConfig

    keys = tmp_path_factory.mktemp("proxy-keys") / "keys"
    keys.write_text(f"{KEY}\n{KEY2}\n")
    proxy_gate(ServeConfig(api_keys_file=str(keys), max_body_bytes=1_000_000,
                           body_timeout_s=3.0, max_requests_per_key=8))
    api = FastAPI()

    @serve.deployment(max_ongoing_requests=4)
    @serve.ingress(api)
    class Echo:
        @api.post("/v1/echo")
        async def echo(self, request: Request):
            return {"got": len(await request.body())}

        @api.get("/healthz")
        async def healthz(self):
            return {"status": "ok"}

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Echo.bind(), name="echo", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "port": port}
    serve.delete("echo")
    serve.shutdown()


def _head(port: int, headers: dict, length: int):
    return raw_post_head(port, "/v1/echo", headers, length)


def test_the_proxy_answers_through_the_gate(echo):
    r = requests.post(f"{echo['url']}/v1/echo", data=b"x" * 500_000,
                      headers={"X-API-Key": KEY}, timeout=60)
    assert r.status_code == 200 and r.json() == {"got": 500_000}
    assert requests.get(f"{echo['url']}/healthz", timeout=60).status_code == 200
    assert requests.get(f"{echo['url']}/-/healthz", timeout=60).status_code == 200  # KubeRay's
    r = requests.post(f"{echo['url']}/v1/echo", data=b"{}", timeout=60)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = requests.post(f"{echo['url']}/v1/echo", data=b"{}", timeout=60,
                      headers={"X-API-Key": KEY, "x-request-disconnect-disabled": "?1"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "reserved_header"


def test_an_unauthenticated_48_mib_body_is_refused_unread_by_the_proxy(echo):
    total = 48 * 2**20
    sent, status = send_body(_head(echo["port"], {}, total), total)
    assert status == 401 and sent < 8 * 2**20, (status, sent)


def test_stalled_clients_take_no_replica_slot(echo):
    """The deployment takes 4 requests at once; 20 stalled clients (8 admitted by their key's
    cap, 12 answered 429) leave it free: another key's request is answered at once."""
    stalled = [_head(echo["port"], {"X-API-Key": KEY2}, 5000) for _ in range(20)]
    try:
        for s in stalled:
            s.sendall(b'{"image": "')
        time.sleep(0.5)
        t = time.monotonic()
        r = requests.post(f"{echo['url']}/v1/echo", data=b"{}", headers={"X-API-Key": KEY},
                          timeout=30)
        assert r.status_code == 200 and time.monotonic() - t < 2.0
        statuses = [read_status(s) for s in stalled]
    finally:
        for s in stalled:
            s.close()
    assert statuses.count(408) == 8 and statuses.count(429) == 12, statuses
