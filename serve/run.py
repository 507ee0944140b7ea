"""``groundlabel serve``: start the endpoint on a local Ray (or a cluster) and keep it up."""

from __future__ import annotations

import time

from serve.config import ServeConfig


def start(cfg: ServeConfig, blocking: bool = True) -> str:
    """Deploy the app; returns its base URL. With ``blocking`` it serves until interrupted."""
    import logging

    from ray import serve

    from serve.app import build_app

    # Before Ray starts: no keys on a non-loopback host is refused (the replica checks again,
    # against the host Serve really listens on, for `serve run`/`serve deploy` configs).
    if why := cfg.auth_refusal(cfg.host):
        raise SystemExit(f"groundlabel serve: {why}")
    if not cfg.api_keys():
        logging.getLogger("groundlabel.serve").warning(
            "serving WITHOUT authentication on %s (%s)", cfg.host,
            "--insecure-no-auth" if cfg.insecure_no_auth else "loopback only")
    cluster = cfg.ray.connect()  # RAY_ADDRESS (a cluster, or the Ray job it runs in), else local
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
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
