"""``groundlabel serve``: start the endpoint on a local Ray (or a cluster) and keep it up."""

from __future__ import annotations

import os
import time

from serve.config import ServeConfig


def start(cfg: ServeConfig, blocking: bool = True) -> str:
    """Deploy the app; returns its base URL. With ``blocking`` it serves until interrupted."""
    import ray
    from ray import serve

    from serve.app import build_app

    if not ray.is_initialized():
        if cfg.ray_address:
            ray.init(address=cfg.ray_address)
        else:  # never attach by accident to another Ray on this machine
            ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1),
                     include_dashboard=False)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg), name="groundlabel", route_prefix="/")
    url = f"http://{cfg.host}:{cfg.port}"
    print(f"[serve] groundlabel answering at {url}/v1/ground (docs: {url}/docs)", flush=True)
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return url
