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
serving. Every input problem is a 4xx JSON ``{"error": {"code", "message"}}`` raised before the
engine (`serve.guards`); if an engine batch still fails, its requests are retried one by one
so only the culprit fails (`serve.batching`).

What is checked where (docs/architecture.md): Serve's proxy and then each replica run the
request gate (`serve.gate`: reserved Ray headers, API key, ``Content-Length``, per-key cap, the
body read under ``body_timeout_s``, the request under ``request_timeout_s``) before a body is
read; the route then parses the body, decodes the image and counts tokens in a bounded thread
pool of its own (``cpu_workers``), so the event loop only routes.

Auth cannot be off by accident: with no API keys a replica refuses to start unless Serve's
proxy listens on loopback only or ``insecure_no_auth`` is set. ``/v1/ground`` and
``/v1/models`` need a key whenever keys are set, ``/metrics`` too unless ``metrics_public``;
``/healthz`` and ``/readyz`` are public.

Run::

    groundlabel serve                                   # local Ray, the bundled tiny model
    curl -s localhost:8000/v1/ground -H 'content-type: application/json' \\
      -d "{\\"image\\": \\"$(base64 -w0 img.png)\\", \\"text\\": \\"the red circle\\"}"
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from ray import serve

from serve.config import ServeConfig
from serve.gate import Gate, configure_replica, replica_settings
from serve.guards import (
    ApiError,
    check_auth,
    check_image_shape,
    load_model_image,
    parse_request,
    read_request,
)
from serve.schema import GroundRequest, GroundResponse

log = logging.getLogger("groundlabel.serve")

api = FastAPI(title="groundlabel", version="1",
              description="Visual grounding: an image and a referring expression in, boxes in "
                          "original-image pixels out (xyxy), from the model and adapters the "
                          "batch jobs use.")
# Before FastAPI reads anything: key, size, per-key cap, body and request deadlines.
api.add_middleware(Gate, settings=replica_settings, role="replica")


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


@api.exception_handler(Exception)
async def _unexpected(request: Request, e: Exception):
    # A bug, not an input problem: still a JSON error, and no internal text for the client.
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return _error(500, "internal", "internal error (logged)")


def _refusal_code(why: str) -> str:
    """A stable reason code for a refused adapter (the follower keeps the exception text,
    which names internals: paths, shapes, buckets; it stays in the logs)."""
    if why.split(":", 1)[0].endswith(("Error", "Exception")):
        return "load_failed"  # registered or probed, and failed (wrong shapes, corrupt weights)
    return "download_failed"  # never reached the engine (registry or storage)


def _proxy_host(cfg: ServeConfig) -> str:
    """The host Serve's HTTP proxy listens on (``http_options``, which a ``serve deploy``
    config sets apart from our args); unknown counts as exposed."""
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client().http_config.host
    except Exception:  # noqa: BLE001 - no controller to ask: assume the worst
        return "0.0.0.0"


@serve.deployment
@serve.ingress(api)
class GroundingService:
    def __init__(self, cfg: ServeConfig):
        from grounding.engines import load_engine
        from grounding.engines.grounder import Grounder
        from serve.follower import Follower
        from serve.guards import UriAllowList

        self.cfg = cfg
        self.ready = False
        configure_replica(cfg.gate_settings())
        # CPU work of requests (JSON, image decoding, token counts) runs here, never on the
        # event loop nor in asyncio's default pool (fetches, adapter loads, engine calls);
        # the semaphore admits at most cpu_workers requests to it, and a request waiting for
        # it can still be cancelled by its deadline.
        self.cpu_pool = ThreadPoolExecutor(cfg.cpu_workers, thread_name_prefix="gl-cpu")
        self.cpu_slots = asyncio.Semaphore(cfg.cpu_workers)
        # Here, in the replica, because this is the environment check_auth reads keys from, and
        # every way to start the app (groundlabel serve, serve run/deploy) reaches it.
        host = _proxy_host(cfg)
        if why := cfg.auth_refusal(host):
            raise ValueError(why)
        if not cfg.api_keys():
            log.warning("serving WITHOUT authentication on %s (%s)", host,
                        "--insecure-no-auth" if cfg.insecure_no_auth else "loopback only")
        self.uris = UriAllowList(cfg.allowed_uri_prefixes)
        family = cfg.inference.resolve_family().name
        self.engine = load_engine(cfg.inference.model_copy(update={"family": family}))
        self.grounder = Grounder(self.engine)
        self.family = family
        from serve.guards import TokenBudget

        inf = self.engine.cfg  # resolved: the context the engine really runs with
        self.budget = TokenBudget(inf.model, self.grounder.reader.resize, inf.max_model_len,
                                  inf.max_new_tokens)
        self.gen_lock = threading.Lock()  # one engine call at a time (vLLM is not re-entrant)
        self._batched.set_max_batch_size(self.cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.cfg.batch_wait_ms / 1000)
        self._metrics()
        self.follower = Follower(cfg, self.engine, self.grounder, self.gen_lock,
                                 self.m_swaps, self.m_refused)
        self.follower.start()
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
        self.m_retries = Counter("groundlabel_batch_retries", "Engine batches that failed and "
                                 "were retried one request at a time.", registry=r)
        self.m_rejections = Counter("groundlabel_engine_rejections", "Requests the engine "
                                    "failed on alone (answered 422 engine_rejected or 503).",
                                    registry=r)

    # -- batching --------------------------------------------------------------------------
    def _generate(self, inputs):
        with self.gen_lock:
            return self.engine.generate(inputs)

    def _generate_isolated(self, inputs: list) -> list:
        """A Generation or an ApiError per input: one failing request fails alone."""
        from serve.batching import isolate_failures

        out, retried = isolate_failures(self._generate, inputs)
        if retried:
            self.m_retries.inc()
        self.m_rejections.inc(sum(isinstance(x, ApiError) for x in out))
        return out

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _batched(self, inputs: list) -> list:
        self.m_batch.observe(len(inputs))
        return await asyncio.to_thread(self._generate_isolated, inputs)

    async def _cpu(self, fn, *args):
        """``fn(*args)`` in the replica's CPU pool, at most ``cpu_workers`` at once."""
        async with self.cpu_slots:
            return await asyncio.get_running_loop().run_in_executor(self.cpu_pool, fn, *args)

    def _parse(self, body: bytes):
        req = parse_request(self.cfg, body, self.family)
        self.budget.check_text(req.text)
        return req

    def _image(self, ref: str):
        """The image at the model's input size (decoded no larger than the model takes), its
        displayed original ``(width, height)`` and its model-input size."""
        resize = self.grounder.reader.resize
        dec = load_model_image(self.cfg, self.uris, ref, resize)
        return dec.image, dec.size, check_image_shape(resize, dec.size)

    def _prepare(self, img, text: str, adapter, model_size):
        from grounding.engines.base import EngineInput
        from grounding.engines.grounder import GroundingRequest

        prepared = self.grounder.prepare(GroundingRequest(img, text, adapter))
        if not isinstance(prepared, EngineInput):
            raise ApiError(422, prepared.error_code or "bad_request", prepared.error or "")
        self.budget.check(prepared.prompt, model_size)  # before batching: fails alone
        return prepared

    # -- routes ----------------------------------------------------------------------------
    # The body is read and checked by hand (serve.guards.read_request, parse_request: size,
    # JSON values and depth, schema, Unicode), so FastAPI does not see it: openapi_extra puts
    # its schema in the OpenAPI document.
    @api.post("/v1/ground", response_model=GroundResponse,
              responses={400: {}, 401: {}, 403: {}, 404: {}, 413: {}, 422: {}, 503: {}},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": GroundRequest.model_json_schema()}}}})
    async def ground(self, request: Request):
        """Boxes for one image and one referring expression."""
        t0 = time.perf_counter()
        try:
            check_auth(self.cfg, request)
            body = await read_request(self.cfg, request)
            req = await self._cpu(self._parse, body)
            del body
            img, size, model_size = await self._cpu(self._image, req.image)
            adapter = await asyncio.to_thread(self.follower.adapter_for, req.adapter)
            prepared = await self._cpu(self._prepare, img, req.text, adapter, model_size)
            gen = await self._batched(prepared)
            if isinstance(gen, ApiError):
                raise gen
            res = await self._cpu(self.grounder.finish, gen, size)
        except ApiError as e:
            self.m_requests.labels(str(e.status)).inc()
            return _error(e.status, e.code, e.message)
        self.m_requests.labels("200").inc()
        ms = (time.perf_counter() - t0) * 1000
        self.m_latency.observe(ms / 1000)
        return {"boxes": [{"x1": b.x1, "y1": b.y1, "x2": b.x2, "y2": b.y2, "score": b.score}
                          for b in res.boxes],
                "status": res.status, "image_size": list(size), "model": self.cfg.inference.model,
                "adapter": adapter, "raw_text": res.raw_text, "latency_ms": round(ms, 1),
                "replica": self.follower.replica}

    @api.get("/v1/models", responses={401: {}})
    async def models(self, request: Request):
        """The base model, the production adapter, and the adapters this replica can serve
        (refused ones: name and a reason code, ``load_failed`` or ``download_failed``)."""
        check_auth(self.cfg, request)
        f = self.follower
        out = {"model": self.cfg.inference.model, "family": self.family, "production": f.production,
               "loaded_adapters": sorted(self.engine.adapters),
               "refused": {n: _refusal_code(why) for n, why in dict(f.refused).items()},
               "replica": f.replica, "switched_at": f.switched_at}
        if f.registry is not None:
            reg = await asyncio.to_thread(f.registry.list)
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
        return {"status": "ready", "production": self.follower.production}

    @api.get("/metrics")
    async def metrics(self, request: Request):
        from prometheus_client import generate_latest

        if not self.cfg.metrics_public:
            check_auth(self.cfg, request)
        self.m_ready.set(1 if self.ready else 0)
        return PlainTextResponse(generate_latest(self.prom).decode(),
                                 media_type="text/plain; version=0.0.4")


def build_app(args: dict | ServeConfig | None = None):
    """The Serve application (also the ``import_path`` target of a ``serve run`` config:
    ``serve.app:build_app``, with ServeConfig fields as ``args``).

    API keys never enter the application's config nor its ``runtime_env`` (Ray's dashboard
    shows both unredacted): replicas read them from ``api_keys_file`` or from their own
    process environment (``api_keys_env``: a cluster's Secret, or a local Ray's workers,
    which inherit the environment of the process that started Ray)."""
    cfg = args if isinstance(args, ServeConfig) else ServeConfig(**(args or {}))
    dep = GroundingService.options(
        num_replicas=cfg.num_replicas,
        # Serve lets 5 requests into a replica by default: too few to fill a batch.
        max_ongoing_requests=max(8, 2 * cfg.max_batch_size),
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus,
                           "runtime_env": {"env_vars": {
                               "OMP_NUM_THREADS": str(max(1, int(cfg.num_cpus)))}}},
    )
    return dep.bind(cfg)
