"""The request gate (serve/gate.py) on a real uvicorn server in its own process, reached over
real sockets: it decides from the headers before reading a body, reads admitted bodies under a
deadline, caps requests per key and refuses Ray Serve's own headers. (The same gate in front of
Ray Serve's proxy and a replica: tests/serve/test_serve_hostile.py.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import requests
from support import free_port, port_open

KEYS = ["gate-key-1", "gate-key-2"]
APP = """
import asyncio, json, sys
import uvicorn
from serve.gate import Gate, settings_from_env

async def inner(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        m = await receive()
        body += m.get("body", b"")
        if not m.get("more_body"):
            break
    if scope["path"].endswith("/slow"):
        await asyncio.sleep(30)
    out = json.dumps({"got": len(body), "headers": [k.decode() for k, _ in scope["headers"]]})
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": out.encode()})

uvicorn.run(Gate(inner, settings_from_env, role=sys.argv[2]), host="127.0.0.1",
            port=int(sys.argv[1]), log_level="warning")
"""


def _server(tmp_path_factory, role: str, **extra):
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text("\n".join(KEYS) + "\n")
    keys.chmod(0o600)
    settings = {"api_keys_file": str(keys), "max_body_bytes": 1_000_000,
                "body_timeout_s": 2.0, "max_requests_per_key": 8, "max_json_values": 2256,
                **extra}
    port = free_port()
    env = {**os.environ, "GROUNDLABEL_GATE": json.dumps(settings)}
    proc = subprocess.Popen([sys.executable, "-c", APP, str(port), role], env=env)
    deadline = time.time() + 30
    while not port_open(port):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    return proc, {"url": f"http://127.0.0.1:{port}", "port": port}


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    """The gate as in front of Serve's proxy."""
    proc, info = _server(tmp_path_factory, "proxy")
    yield info
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def replica_gate(tmp_path_factory):
    """The gate as in front of a replica's FastAPI app: a request deadline of 1 s."""
    proc, info = _server(tmp_path_factory, "replica", request_timeout_s=1.0)
    yield info
    proc.kill()
    proc.wait()


def _head(port: int, headers: dict, length: int, path: str = "/v1/ground") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    lines = [f"POST {path} HTTP/1.1", "Host: x", f"Content-Length: {length}",
             "Content-Type: application/json", *[f"{k}: {v}" for k, v in headers.items()]]
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return s


def _status(s: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]) if data else 0


def _send_until_refused(s: socket.socket, total: int) -> int:
    """Send up to ``total`` body bytes as fast as the server takes them; the bytes it took
    before it closed the connection."""
    s.settimeout(10)
    sent, block = 0, b"0" * 65536
    try:
        while sent < total:
            sent += s.send(block[:total - sent])
    except OSError:  # reset or broken pipe: the server closed the connection
        pass
    return sent


def test_a_key_passes_and_the_body_arrives_whole(gate):
    r = requests.post(f"{gate['url']}/v1/ground", data=b"x" * 300_000,
                      headers={"X-API-Key": KEYS[0]}, timeout=30)
    assert r.status_code == 200 and r.json()["got"] == 300_000
    r = requests.post(f"{gate['url']}/v1/ground", data=b"{}",
                      headers={"Authorization": f"Bearer {KEYS[1]}"}, timeout=30)
    assert r.status_code == 200
    assert requests.get(f"{gate['url']}/healthz", timeout=30).status_code == 200


def test_an_unauthenticated_48_mib_body_is_refused_unread(gate):
    s = _head(gate["port"], {}, 48 * 2**20)
    took = _send_until_refused(s, 48 * 2**20)
    status = _status(s)
    s.close()
    assert status == 401
    # The server closed the connection after its answer: what it took is what the two
    # sockets' buffers hold, not the body.
    assert took < 8 * 2**20, took


def test_a_declared_length_over_the_limit_is_refused_unread(gate):
    s = _head(gate["port"], {"X-API-Key": KEYS[0]}, 48 * 2**20)
    took = _send_until_refused(s, 48 * 2**20)
    status = _status(s)
    s.close()
    assert status == 413 and took < 8 * 2**20, (status, took)


def test_a_chunked_body_over_the_limit_is_413(gate):
    def gen():
        for _ in range(40):
            yield b"0" * 65536

    r = requests.post(f"{gate['url']}/v1/ground", data=gen(), headers={"X-API-Key": KEYS[0]},
                      timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize("header", ["x-request-timeout-seconds", "x-request-disconnect-disabled",
                                    "serve_multiplexed_model_id", "serve-multiplexed-model-id",
                                    "x-session-id", "X-Serve-Router-Replica"])
def test_ray_serve_headers_from_a_client_are_refused(gate, header):
    r = requests.post(f"{gate['url']}/v1/ground", data=b"{}",
                      headers={"X-API-Key": KEYS[0], header: "?1"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "reserved_header", r.text


def test_a_clients_request_id_is_dropped(gate):
    r = requests.post(f"{gate['url']}/v1/ground", data=b"{}",
                      headers={"X-API-Key": KEYS[0], "X-Request-ID": "mine"}, timeout=30)
    assert r.status_code == 200 and "x-request-id" not in r.json()["headers"]


def test_paths_without_a_key_take_no_body(gate):
    assert requests.get(f"{gate['url']}/healthz", timeout=30).status_code == 200
    assert requests.get(f"{gate['url']}/anything", timeout=30).status_code == 200
    for path in ("/healthz", "/anything", "/-/healthz"):
        r = requests.post(f"{gate['url']}{path}", data=b"x" * 10, timeout=30)
        assert r.status_code == 413, path
    assert requests.get(f"{gate['url']}/v1/models", timeout=30).status_code == 401
    assert requests.get(f"{gate['url']}/metrics", timeout=30).status_code == 401


def test_stalled_clients_hold_nothing_and_are_timed_out(gate):
    """100 clients with one key send their headers and 11 body bytes, then stall: 8 (the
    key's cap) are admitted and wait for their bodies, 92 are answered 429 at once; another
    key's ordinary request is answered at once (the issue's bound: 2 s); the stalled ones are
    answered 408 at the body deadline (2 s here) and their connections closed."""
    stalled = []
    for _ in range(100):
        s = _head(gate["port"], {"X-API-Key": KEYS[0]}, 1000)
        s.sendall(b'{"image": "')  # 11 bytes, then nothing
        stalled.append(s)
    t = time.monotonic()
    r = requests.post(f"{gate['url']}/v1/ground", data=b"{}", headers={"X-API-Key": KEYS[1]},
                      timeout=30)
    answered_s = time.monotonic() - t
    assert r.status_code == 200 and answered_s < 2.0, (r.status_code, answered_s)
    r = requests.post(f"{gate['url']}/v1/ground", data=b"{}", headers={"X-API-Key": KEYS[0]},
                      timeout=30)
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_requests"
    statuses = [_status(s) for s in stalled]
    for s in stalled:
        s.close()
    assert statuses.count(429) == 92 and statuses.count(408) == 8, sorted(set(statuses))
    # The cap is released with the requests.
    r = requests.post(f"{gate['url']}/v1/ground", data=b"{}", headers={"X-API-Key": KEYS[0]},
                      timeout=30)
    assert r.status_code == 200


def test_keys_are_re_read_when_their_file_changes(tmp_path):
    from serve.gate import read_api_keys

    f = tmp_path / "keys"
    f.write_text("a, b\n\nc\n")
    assert read_api_keys("UNUSED", str(f)) == ["a", "b", "c"]
    time.sleep(0.01)
    f.write_text("d\n")
    assert read_api_keys("UNUSED", str(f)) == ["d"]
    assert read_api_keys("UNUSED", str(tmp_path / "missing")) == []


def test_the_replica_gate_ends_a_request_at_its_deadline(replica_gate):
    r = requests.post(f"{replica_gate['url']}/v1/slow", data=b"{}",
                      headers={"X-API-Key": KEYS[0]}, timeout=30)
    assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
    r = requests.post(f"{replica_gate['url']}/v1/fast", data=b"{}",
                      headers={"X-API-Key": KEYS[0]}, timeout=30)
    assert r.status_code == 200


def test_wide_json_is_refused_as_it_arrives(gate):
    """A flat array within the size limit is refused once its brackets and commas pass the
    bound, counted chunk by chunk, before the body is complete."""
    r = requests.post(f"{gate['url']}/v1/ground", data=b"[" + b"0," * 450_000 + b"0]",
                      headers={"X-API-Key": KEYS[0]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "json_too_large"
    r = requests.post(f"{gate['url']}/v1/ground", data=b"[" + b"0," * 1000 + b"0]",
                      headers={"X-API-Key": KEYS[0]}, timeout=30)
    assert r.status_code == 200  # within the bound: the replica's parser decides


def test_settings_with_a_mistake_fall_back_to_the_defaults(monkeypatch, tmp_path):
    from serve.gate import GateSettings, settings_from_env

    monkeypatch.setenv("GROUNDLABEL_GATE", '{"max_body_bytes": "lots", "nonsense": 1}')
    assert settings_from_env() == GateSettings()
    f = tmp_path / "gate.json"
    monkeypatch.setenv("GROUNDLABEL_GATE", str(f))
    assert settings_from_env() is None  # no file yet
    f.write_text('{"max_body_bytes": 5}')
    time.sleep(1.1)  # the file is looked at at most once a second
    assert settings_from_env().max_body_bytes == 5
