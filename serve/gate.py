"""The request gate: a pure ASGI middleware that decides on a request from its headers, BEFORE
its body is read, and then reads the body under a deadline and a size limit.

It runs in two places:

* **In Ray Serve's HTTP proxy**, installed with Ray's own hook: the proxy process calls
  ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (here ``serve.gate:proxy_middlewares``) when it
  starts and wraps its ASGI app with the Starlette middlewares it returns (Ray 2.60
  ``serve/_private/http_util.py``: ``configure_http_middlewares``; ``HTTPOptions.middlewares``
  itself is removed). Without it the proxy reads every request's body into an unbounded queue
  before any replica sees the request. With it, a request without a valid key, with a
  ``Content-Length`` over the limit, or over its key's concurrency cap is answered at once,
  its body unread (``Connection: close``); an admitted body is read here, under
  ``body_timeout_s``, and only a complete body goes on to a replica, so a client that stalls
  mid-body holds a coroutine in the proxy, never a replica slot. Its settings are the JSON of
  `GateSettings` in ``GROUNDLABEL_GATE`` (the JSON text, or the path of a file holding it),
  in the proxy's environment; ``groundlabel serve`` sets both variables before it starts Ray.
* **In each replica**, in front of the FastAPI app (`serve.app`): the same checks again (for a
  proxy started without the hook), plus the whole-request deadline (``request_timeout_s``),
  which cancels the handler.

Ray's own per-request headers (``x-request-timeout-seconds``, ``x-request-disconnect-disabled``,
``serve_multiplexed_model_id``, the session-id header, ``x-serve-router-*``) change how the proxy
treats a request (no deadline, no cancel on disconnect, routing): a client sending one gets 400
``reserved_header``. A client's ``x-request-id`` is dropped in the proxy (Ray makes its own).

Run::

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve.gate:proxy_middlewares \\
    GROUNDLABEL_GATE='{"api_keys_file": "/etc/groundlabel/api-keys"}' ray start --head
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from collections.abc import Callable

from pydantic import BaseModel, Field

GATE_ENV = "GROUNDLABEL_GATE"
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "serve.gate:proxy_middlewares"

# Header names (lower case, '-' and '_' alike) that Ray Serve's proxy or replica act on.
RESERVED_HEADERS = {"x_request_timeout_seconds", "x_request_disconnect_disabled",
                    "serve_multiplexed_model_id", "x_session_id"}
RESERVED_PREFIXES = ("x_serve_", "x_ray_")


class GateSettings(BaseModel):
    """What the gate checks before a body is read (`serve.config.ServeConfig.gate_settings`)."""

    model_config = {"extra": "forbid"}
    api_keys_env: str = Field("GROUNDLABEL_API_KEYS", description="Environment variable with "
                              "comma-separated API keys (read when api_keys_file is unset).")
    api_keys_file: str | None = Field(None, description="File with the API keys, one a line "
                                      "or comma-separated (a mounted Kubernetes Secret).")
    keyed_prefixes: list[str] = Field(["/v1/", "/metrics"], description="Paths that need a "
                                      "key and may carry a body (up to max_body_bytes). Every "
                                      "other path (/healthz, /readyz, /docs, Serve's /-/healthz "
                                      "that KubeRay probes, unknown paths) needs no key and "
                                      "takes no body.")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=0, description="Largest body.")
    body_timeout_s: float = Field(10.0, gt=0, description="Deadline to receive the body.")
    request_timeout_s: float | None = Field(60.0, gt=0, description="Deadline of the whole "
                                            "request (enforced in the replica).")
    max_requests_per_key: int = Field(32, ge=1, description="Requests one API key may have "
                                      "in flight here; more are answered 429.")
    max_json_values: int | None = Field(None, ge=1, description="Most '[', '{' and ',' bytes "
                                        "a body may hold (`serve.guards.max_json_values`), "
                                        "counted chunk by chunk as it arrives: a wide JSON "
                                        "body is refused (400 json_too_large) before it is "
                                        "read whole. None: not counted here.")

    def api_keys(self) -> list[str]:
        return read_api_keys(self.api_keys_env, self.api_keys_file)


_KEY_FILES: dict[str, tuple[tuple, list[str]]] = {}


def read_api_keys(env: str, path: str | None) -> list[str]:
    """The API keys: from the file ``path`` when given (re-read when it changes, as a mounted
    Secret does on rotation; missing or unreadable: no keys), else from the environment
    variable ``env``; comma- or newline-separated, stripped, blanks dropped."""
    if path:
        try:
            st = os.stat(path)
            sig = (st.st_mtime_ns, st.st_size, st.st_ino)
            cached = _KEY_FILES.get(path)
            if cached and cached[0] == sig:
                return cached[1]
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError:
            return []
        keys = [k.strip() for k in text.replace("\n", ",").split(",") if k.strip()]
        _KEY_FILES[path] = (sig, keys)
        return keys
    return [k.strip() for k in os.environ.get(env, "").split(",") if k.strip()]


def presented_key(headers) -> str:
    """The API key a request presents (``X-API-Key``, else ``Authorization: Bearer``), or ""."""
    got = headers.get("x-api-key") or ""
    auth = headers.get("authorization") or ""
    if not got and auth[:7].lower() == "bearer ":
        got = auth[7:]
    return got


def matching_key(keys: list[str], got: str) -> str | None:
    """The configured key equal to ``got`` (constant-time comparisons), or None."""
    found = None
    for k in keys:
        if hmac.compare_digest(got.encode("utf-8", "surrogatepass"), k.encode()):
            found = k
    return found


def reserved_header(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The first client header that Ray Serve would act on (see the module docstring)."""
    # Ray's session-id header is configurable (ray/serve/_private/constants.py SERVE_SESSION_ID).
    session = os.environ.get("RAY_SERVE_SESSION_ID_HEADER_KEY", "").lower().replace("-", "_")
    for k, _ in headers:
        name = k.decode("latin-1").lower().replace("-", "_")
        if name in RESERVED_HEADERS or name.startswith(RESERVED_PREFIXES) or name == session:
            return k.decode("latin-1")
    return None


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class _Gone(Exception):
    """The client disconnected while sending its body."""


async def refuse(send, status: int, code: str, message: str, *, close: bool = True) -> None:
    """Answer a JSON error. ``close``: the body was not (fully) read, so the connection is
    closed after the answer instead of reading the rest to keep it alive."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    if status == 429:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Gate:
    """The ASGI middleware (see the module docstring). ``settings`` is called per request
    (None: only reserved headers are refused); ``role`` is ``"proxy"`` or ``"replica"``."""

    def __init__(self, app, settings: Callable[[], GateSettings | None], role: str = "replica"):
        self.app, self.settings, self.role = app, settings, role
        self.in_flight: dict[str, int] = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":  # no websocket routes: refused before accept
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers") or []
        if bad := reserved_header(headers):
            await refuse(send, 400, "reserved_header", f"the header {bad!r} is reserved for "
                         "the server's own proxy; do not send it")
            return
        if self.role == "proxy":  # Ray makes its own request id; a client's is only dropped
            scope = dict(scope, headers=[(k, v) for k, v in headers
                                         if k.lower() != b"x-request-id"])
        s = self.settings()
        if s is None:
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic()
        try:
            key = self._admit(s, scope)
        except _Refused as e:
            await refuse(send, e.status, e.code, e.message)
            return
        try:
            try:
                body = await _read_body(receive, self._limit(s, scope), s.body_timeout_s,
                                        s.max_json_values if self._keyed(s, scope) else None)
            except _Refused as e:
                await refuse(send, e.status, e.code, e.message)
                return
            except _Gone:
                return
            await self._forward(s, scope, body, receive, send, t0)
        finally:
            if key is not None:
                n = self.in_flight[key] - 1
                if n:
                    self.in_flight[key] = n
                else:
                    del self.in_flight[key]

    @staticmethod
    def _keyed(s: GateSettings, scope) -> bool:
        return str(scope.get("path", "")).startswith(tuple(s.keyed_prefixes))

    def _limit(self, s: GateSettings, scope) -> int:
        return s.max_body_bytes if self._keyed(s, scope) else 0

    def _admit(self, s: GateSettings, scope) -> str | None:
        """The request's key (None: no keys configured, or a path without one), or _Refused:
        401 without a valid key, 413 for a declared body over the limit, 429 over the key's
        cap. Headers only: nothing of the body has been read."""
        from starlette.datastructures import Headers

        h = Headers(scope=scope)
        key = None
        keys = s.api_keys()
        if keys and self._keyed(s, scope):
            key = matching_key(keys, presented_key(h))
            if key is None:
                raise _Refused(401, "unauthorized", "missing or wrong API key (X-API-Key "
                               "header or Authorization: Bearer)")
        limit = self._limit(s, scope)
        declared = h.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise _Refused(400, "bad_content_length", "Content-Length is not a number")
            if int(declared) > limit:
                raise _Refused(413, "payload_too_large",
                               f"body of {int(declared)} bytes, limit {limit}")
        if key is not None:
            n = self.in_flight.get(key, 0)
            if n >= s.max_requests_per_key:
                raise _Refused(429, "too_many_requests", f"this API key has {n} requests in "
                               f"flight, the limit is {s.max_requests_per_key}")
            self.in_flight[key] = n + 1
        return key

    async def _forward(self, s: GateSettings, scope, body: bytes, receive, send, t0: float):
        """Call the app with the body already read, under the request deadline (replica)."""
        given = False

        async def replay():
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: waits for the disconnect

        started = False

        async def tracked(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        if self.role != "replica" or s.request_timeout_s is None:
            await self.app(scope, replay, send)
            return
        left = s.request_timeout_s - (time.monotonic() - t0)
        try:
            async with asyncio.timeout(max(left, 0.001)):
                await self.app(scope, replay, tracked)
        except TimeoutError:
            if not started:
                await refuse(send, 408, "request_timeout", f"no answer within the request "
                             f"deadline of {s.request_timeout_s} s")


async def _read_body(receive, limit: int, timeout_s: float,
                     max_values: int | None = None) -> bytes:
    """The whole body, or _Refused 408 (not complete within ``timeout_s``) / 413 (over
    ``limit``) / 400 (more than ``max_values`` JSON brackets and commas), or _Gone (the
    client left)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    chunks, size, values = [], 0, 0
    while True:
        left = deadline - loop.time()
        try:
            if left <= 0:
                raise TimeoutError
            message = await asyncio.wait_for(receive(), left)
        except TimeoutError:
            raise _Refused(408, "body_timeout", f"the body did not arrive within "
                           f"{timeout_s} s") from None
        if message["type"] == "http.disconnect":
            raise _Gone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _Refused(413, "payload_too_large", f"body over the limit of {limit} bytes")
        if max_values is not None:
            values += chunk.count(b",") + chunk.count(b"[") + chunk.count(b"{")
            if values > max_values:
                raise _Refused(400, "json_too_large", f"the body has more than {max_values} "
                               "JSON brackets and commas; a request is one object of at "
                               "most 4 string fields")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


# ---- the two installations ---------------------------------------------------------------------
_env_cache: dict[str, tuple] = {}


def _validated(text: str) -> GateSettings:
    """Settings from JSON; on a mistake, the defaults (and the mistake logged), so that a typo
    in a node's environment never turns every request into a 500."""
    try:
        return GateSettings.model_validate_json(text)
    except ValueError as e:
        logging.getLogger("groundlabel.serve").error("%s is not valid gate settings, using "
                                                     "the defaults: %s", GATE_ENV, e)
        return GateSettings()


def settings_from_env() -> GateSettings | None:
    """`GateSettings` from ``GROUNDLABEL_GATE`` (JSON text, or a file path re-read when it
    changes, checked at most once a second); None when unset or the file does not exist yet."""
    raw = os.environ.get(GATE_ENV, "").strip()
    if not raw:
        return None
    if raw.startswith("{"):
        hit = _env_cache.get(raw)
        if hit is None:
            hit = _env_cache[raw] = (_validated(raw),)
        return hit[0]
    now = time.monotonic()
    hit = _env_cache.get(raw)
    if hit and now - hit[0] < 1.0:
        return hit[2]
    try:
        st = os.stat(raw)
        sig = (st.st_mtime_ns, st.st_size)
        if hit and hit[1] == sig:
            value = hit[2]
        else:
            with open(raw, encoding="utf-8") as f:
                value = _validated(f.read())
    except OSError:
        sig, value = None, None
    _env_cache[raw] = (now, sig, value)
    return value


def proxy_middlewares():
    """Ray Serve's proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``): the gate."""
    from starlette.middleware import Middleware

    return [Middleware(Gate, settings=settings_from_env, role="proxy")]


_replica_settings: list[GateSettings | None] = [None]


def configure_replica(settings: GateSettings) -> None:
    """Set the settings of the gate in front of this process's FastAPI app."""
    _replica_settings[0] = settings


def replica_settings() -> GateSettings | None:
    return _replica_settings[0]
