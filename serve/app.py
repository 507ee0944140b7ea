"""The online grounding endpoint: a Ray Serve deployment with a FastAPI ingress.

    POST /v1/ground    {"image": base64 | data: URI | allowed URI, "text": ..., "adapter"?,
                        "family"?} -> boxes in ORIGINAL-image pixels (xyxy floats) with scores,
                        and the model and adapter that answered
    GET  /v1/models    the base model, the production adapter, the adapters it can serve
    GET  /healthz      the process answers;  GET /readyz  the engine is loaded
    GET  /metrics      Prometheus text format
    GET  /docs         OpenAPI docs (FastAPI)

Concurrent requests are batched into one engine call (``@serve.batch``). Each request is
pinned to one adapter when it arrives (the one it names, or production at that moment), so a
swap never mixes adapters inside an answer. A watcher thread reads the registry's production
pointer every ``poll_s``; a new adapter is downloaded, probed with one real generation, and only
then made the default: a corrupt or incompatible adapter is refused and the old one keeps
serving. Every error is a 4xx JSON ``{"error": {"code", "message"}}``.

Run::

    groundlabel serve                                   # local Ray, the bundled tiny model
    curl -s localhost:8000/v1/ground -H 'content-type: application/json' \\
      -d "{\\"image\\": \\"$(base64 -w0 img.png)\\", \\"text\\": \\"the red circle\\"}"
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import tempfile
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field, ValidationError
from ray import serve

from serve.config import ServeConfig

log = logging.getLogger("groundlabel.serve")

api = FastAPI(title="groundlabel", version="1",
              description="Visual grounding: an image and a referring expression in, boxes in "
                          "original-image pixels out (xyxy), from the model and adapters the "
                          "batch jobs use.")


class GroundRequest(BaseModel):
    """One question: where is ``text`` in ``image``?"""

    model_config = {"extra": "forbid"}
    image: str = Field(description="Base64 image bytes, a data: URI, or a URI under one of the "
                       "server's allowed prefixes.")
    text: str = Field(description="The referring expression.")
    adapter: str | None = Field(None, description="Adapter name (default: production).")
    family: str | None = Field(None, description="Model family; must match the served model.")


class BoxOut(BaseModel):
    x1: float
    y1: float
    x2: float
    y2: float
    score: float | None = None


class GroundResponse(BaseModel):
    """Boxes in pixels of the ORIGINAL image (xyxy), best first."""

    boxes: list[BoxOut]
    status: str = Field(description="ok, clipped, truncated, empty or unparseable")
    image_size: list[int] = Field(description="[width, height] of the original image")
    model: str
    adapter: str | None = Field(description="Adapter that answered (None: the base model)")
    raw_text: str
    latency_ms: float


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


@api.exception_handler(ApiError)
async def _api_error(_: Request, e: ApiError):
    return _error(e.status, e.code, e.message)


@api.exception_handler(404)
async def _not_found(request: Request, _):
    return _error(404, "not_found", f"no route {request.method} {request.url.path}")


@api.exception_handler(405)
async def _bad_method(request: Request, _):
    return _error(405, "method_not_allowed", f"{request.method} is not allowed here")


# Image errors -> HTTP status.
_IMAGE_STATUS = {"too_large": 413, "missing": 422, "fetch_failed": 422, "empty_image": 422,
                 "corrupt": 422, "zero_size": 422, "bad_image_ref": 400}


@serve.deployment
@serve.ingress(api)
class GroundingService:
    def __init__(self, cfg: ServeConfig):
        from grounding.checkpoint import detect_family
        from grounding.engines import load_engine
        from grounding.engines.grounder import Grounder
        from serve.guards import UriAllowList

        self.cfg = cfg
        self.ready = False
        self.uris = UriAllowList(cfg.allowed_uri_prefixes)
        family = cfg.inference.family or detect_family(cfg.inference.model)
        self.engine = load_engine(cfg.inference.model_copy(update={"family": family}))
        self.grounder = Grounder(self.engine, family)
        self.family = family
        self.gen_lock = threading.Lock()  # one engine call at a time (vLLM is not re-entrant)
        self._batched.set_max_batch_size(self.cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.cfg.batch_wait_ms / 1000)
        self.cache = tempfile.mkdtemp(prefix="groundlabel-serve-")
        self.refused: dict[str, str] = {}
        self.production: str | None = None
        self.switched_at: float | None = None
        self._metrics()
        self.registry = None
        if self.cfg.registry:
            from grounding.registry import AdapterRegistry

            self.registry = AdapterRegistry(self.cfg.registry, self.cfg.storage)
            self._follow_once()
            threading.Thread(target=self._watch, daemon=True, name="registry-watch").start()
        elif self.cfg.adapters_dir:
            for d in sorted(os.scandir(self.cfg.adapters_dir), key=lambda d: d.name):
                if d.is_dir():
                    self._load_adapter(d.name, d.path)
        self.ready = True

    # -- metrics ---------------------------------------------------------------------------
    def _metrics(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.prom = CollectorRegistry()
        self.m_requests = Counter("groundlabel_requests", "Requests by outcome.",
                                  ["status"], registry=r)
        self.m_latency = Histogram("groundlabel_request_seconds", "End-to-end latency.",
                                   registry=r, buckets=(.05, .1, .2, .5, 1, 2, 5, 10, 30))
        self.m_batch = Histogram("groundlabel_batch_size", "Requests per engine call.",
                                 registry=r, buckets=(1, 2, 4, 8, 16, 32, 64))
        self.m_swaps = Counter("groundlabel_adapter_swaps", "Production adapter switches.",
                               registry=r)
        self.m_refused = Counter("groundlabel_adapter_refusals", "Adapters refused.",
                                 registry=r)
        self.m_ready = Gauge("groundlabel_ready", "1 when the engine is loaded.", registry=r)

    # -- adapters --------------------------------------------------------------------------
    def _load_adapter(self, name: str, path: str) -> bool:
        """Register and probe an adapter with one real generation; refuse it if that fails."""
        from PIL import Image

        from grounding.engines.base import EngineInput

        if name in self.engine.adapters:
            return True
        try:
            self.engine.add_adapter(name, path)
            probe = EngineInput(self.grounder.prompt("the object"), Image.new("RGB", (64, 64)),
                                name)
            with self.gen_lock:
                self.engine.generate([probe])
            return True
        except Exception as e:  # noqa: BLE001 - any failure means: do not serve it
            self.engine.remove_adapter(name)
            self.refused[name] = f"{type(e).__name__}: {e}"[:300]
            self.m_refused.inc()
            log.warning("refused adapter %s: %s", name, self.refused[name])
            return False

    def _from_registry(self, name: str) -> bool:
        from grounding.registry import RegistryError

        if name in self.engine.adapters:
            return True
        if name in self.refused:
            return False
        try:
            path = self.registry.download(name, self.cache)
        except (RegistryError, OSError, ValueError) as e:
            self.refused[name] = str(e)
            return False
        return self._load_adapter(name, path)

    def _follow_once(self) -> None:
        name = self.registry.production()
        if name == self.production:
            return
        if name is None or self._from_registry(name):
            self.production = name  # one reference swap: requests read it once on arrival
            self.switched_at = time.time()
            self.m_swaps.inc()
            log.warning("serving adapter %s", name)

    def _watch(self) -> None:
        while True:
            time.sleep(self.cfg.poll_s)
            try:
                self._follow_once()
            except Exception as e:  # noqa: BLE001 - a registry hiccup must not stop the watcher
                log.warning("registry watch failed: %s", e)

    def _adapter_for(self, requested: str | None) -> str | None:
        if requested is None:
            return self.production
        ok = (self._from_registry(requested) if self.registry is not None
              else requested in self.engine.adapters)
        if not ok:
            why = self.refused.get(requested, "not in the registry or adapters folder")
            raise ApiError(404, "unknown_adapter", f"adapter {requested!r}: {why}")
        return requested

    # -- batching --------------------------------------------------------------------------
    def _generate(self, inputs):
        with self.gen_lock:
            return self.engine.generate(inputs)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _batched(self, inputs: list) -> list:
        self.m_batch.observe(len(inputs))
        return await asyncio.to_thread(self._generate, inputs)

    # -- routes ----------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        keys = [k for k in os.environ.get(self.cfg.api_keys_env, "").split(",") if k.strip()]
        if not keys:
            return
        got = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            got = got or auth[7:]
        if not any(hmac.compare_digest(got.encode(), k.strip().encode()) for k in keys):
            raise ApiError(401, "unauthorized", "missing or wrong API key (X-API-Key header "
                           "or Authorization: Bearer)")

    async def _read_request(self, request: Request) -> GroundRequest:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.cfg.max_body_bytes:
            raise ApiError(413, "payload_too_large",
                           f"body of {declared} bytes, limit {self.cfg.max_body_bytes}")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.cfg.max_body_bytes:
                raise ApiError(413, "payload_too_large",
                               f"body over the limit of {self.cfg.max_body_bytes} bytes")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "bad_json", "the body is not JSON") from None
        try:
            req = GroundRequest.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, p['loc'])) or 'body'}: {p['msg']}"
                                 for p in e.errors()[:5])
            raise ApiError(422, "bad_request", problems) from None
        if not req.text.strip():
            raise ApiError(422, "empty_text", "text (the referring expression) is empty")
        if len(req.text) > self.cfg.max_text_chars:
            raise ApiError(413, "text_too_long",
                           f"text has {len(req.text)} characters, limit {self.cfg.max_text_chars}")
        if req.family and req.family != self.family:
            raise ApiError(422, "wrong_family", f"this endpoint serves family {self.family!r}, "
                           f"not {req.family!r}")
        return req

    def _image(self, ref: str):
        from grounding.images import ImageError, decode, is_base64_image, read_bytes

        try:
            is_ref = not (ref.startswith("data:") or is_base64_image(ref))
            if is_ref and (why := self.uris.why_not(ref)):
                raise ApiError(403, "uri_not_allowed", why)
            # The allow-list checked this URI only: a redirect elsewhere is refused, not followed.
            data = read_bytes(ref, self.cfg.storage, max_bytes=self.cfg.max_body_bytes,
                              follow_redirects=False)
            return decode(data, self.cfg.max_image_pixels)
        except ImageError as e:
            raise ApiError(_IMAGE_STATUS.get(e.code, 422), e.code, str(e)) from None

    @api.post("/v1/ground", response_model=GroundResponse,
              responses={400: {}, 401: {}, 403: {}, 404: {}, 413: {}, 422: {}})
    async def ground(self, request: Request):
        """Boxes for one image and one referring expression."""
        from grounding.engines.base import EngineInput

        t0 = time.perf_counter()
        try:
            self._auth(request)
            req = await self._read_request(request)
            img = await asyncio.to_thread(self._image, req.image)
            adapter = await asyncio.to_thread(self._adapter_for, req.adapter)
            from grounding.engines.grounder import GroundingRequest

            prepared = self.grounder.prepare(GroundingRequest(img, req.text, adapter))
            if not isinstance(prepared, EngineInput):
                raise ApiError(422, prepared.error_code or "bad_request", prepared.error or "")
            gen = await self._batched(prepared)
            res = self.grounder.finish(gen, img.size)
        except ApiError as e:
            self.m_requests.labels(str(e.status)).inc()
            return _error(e.status, e.code, e.message)
        self.m_requests.labels("200").inc()
        ms = (time.perf_counter() - t0) * 1000
        self.m_latency.observe(ms / 1000)
        return {"boxes": [{"x1": b.x1, "y1": b.y1, "x2": b.x2, "y2": b.y2, "score": b.score}
                          for b in res.boxes],
                "status": res.status, "image_size": list(img.size), "model": self.cfg.inference.model,
                "adapter": adapter, "raw_text": res.raw_text, "latency_ms": round(ms, 1)}

    @api.get("/v1/models")
    async def models(self):
        """The base model, the production adapter, and the adapters this replica can serve."""
        out = {"model": self.cfg.inference.model, "family": self.family, "production": self.production,
               "loaded_adapters": sorted(self.engine.adapters), "refused": self.refused}
        if self.registry is not None:
            reg = await asyncio.to_thread(self.registry.list)
            out["registry"] = [{"name": m["name"], "registered_at": m["registered_at"],
                                "snapshot_version": m.get("snapshot_version")} for m in reg]
        return out

    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self):
        if not self.ready:
            return _error(503, "not_ready", "engine loading")
        return {"status": "ready", "production": self.production}

    @api.get("/metrics")
    async def metrics(self):
        from prometheus_client import generate_latest

        self.m_ready.set(1 if self.ready else 0)
        return PlainTextResponse(generate_latest(self.prom).decode(),
                                 media_type="text/plain; version=0.0.4")


def build_app(args: dict | ServeConfig | None = None):
    """The Serve application (also the ``import_path`` target of a ``serve run`` config:
    ``serve.app:build_app``, with ServeConfig fields as ``args``)."""
    cfg = args if isinstance(args, ServeConfig) else ServeConfig(**(args or {}))
    dep = GroundingService.options(
        num_replicas=cfg.num_replicas,
        # Serve lets 5 requests into a replica by default: too few to fill a batch.
        max_ongoing_requests=max(8, 2 * cfg.max_batch_size),
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus,
                           "runtime_env": {"env_vars": {
                               "OMP_NUM_THREADS": str(max(1, int(cfg.num_cpus))),
                               **({cfg.api_keys_env: os.environ[cfg.api_keys_env]}
                                  if os.environ.get(cfg.api_keys_env) else {})}}},
    )
    return dep.bind(cfg)
