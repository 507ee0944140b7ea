"""``groundlabel serve``: start the endpoint on a local Ray (or a cluster) and keep it up."""

from __future__ import annotations

import logging
import os
import time

from serve.config import ServeConfig

log = logging.getLogger("groundlabel.serve")


def install_proxy_gate(cfg: ServeConfig) -> bool:
    """Put the request gate (`serve.gate`) in front of Serve's proxy: the two environment
    variables the proxy process reads, set here, before Ray starts, so that a local Ray's
    processes inherit them (so do the API keys of ``api_keys_env``: never sent in a
    runtime_env). False (and a warning) when Ray runs elsewhere or already: that cluster's
    own environment must carry them (cluster/rayservice.yaml does)."""
    import ray

    from serve.gate import GATE_ENV, PROXY_CALLBACK, PROXY_CALLBACK_ENV

    if ray.is_initialized() or cfg.ray.address():
        if os.environ.get(PROXY_CALLBACK_ENV) != PROXY_CALLBACK:
            log.warning("Ray is not started here: Serve's proxy gets the request gate only if "
                        "its own environment sets %s=%s and %s (cluster/rayservice.yaml); the "
                        "replicas check requests either way", PROXY_CALLBACK_ENV,
                        PROXY_CALLBACK, GATE_ENV)
        return False
    os.environ[PROXY_CALLBACK_ENV] = PROXY_CALLBACK
    os.environ[GATE_ENV] = cfg.gate_settings().model_dump_json()
    return True


def start(cfg: ServeConfig, blocking: bool = True) -> str:
    """Deploy the app; returns its base URL. With ``blocking`` it serves until interrupted."""
    from ray import serve

    from serve.app import build_app

    # Before Ray starts: no keys on a non-loopback host is refused (the replica checks again,
    # against the host Serve really listens on, for `serve run`/`serve deploy` configs).
    if why := cfg.auth_refusal(cfg.host):
        raise SystemExit(f"groundlabel serve: {why}")
    if not cfg.api_keys():
        log.warning(
            "serving WITHOUT authentication on %s (%s)", cfg.host,
            "--insecure-no-auth" if cfg.insecure_no_auth else "loopback only")
    install_proxy_gate(cfg)
    cluster = cfg.ray.connect()  # RAY_ADDRESS (a cluster, or the Ray job it runs in), else local
    serve.start(http_options={"host": cfg.host, "port": cfg.port,
                              "request_timeout_s": cfg.request_timeout_s})
    serve.run(build_app(cfg), name="groundlabel", route_prefix="/")
    url = f"http://{cfg.host}:{cfg.port}"
    print(f"[serve] groundlabel answering at {url}/v1/ground (docs: {url}/docs), on the Ray "
          f"cluster at {cluster}", flush=True)
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return url
