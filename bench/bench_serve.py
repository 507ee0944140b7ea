"""Benchmark of the online endpoint: dynamic batching against one request at a time.

Both configurations run in this same process on the same machine: the endpoint is deployed
with ``max_batch_size=1`` (every request is its own engine call), measured, then redeployed
with batching (``max_batch_size=32``) and measured under the same load: ``--clients`` threads
each sending requests back to back for ``--seconds``. Reported: throughput (requests/s) and
p50/p99 latency of each, and the ratio.

Run::

    .venv/bin/python bench/bench_serve.py --clients 32 --seconds 40 --out bench/serve.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path


def load(url: str, bodies: list[dict], clients: int, seconds: float) -> dict:
    import requests

    lat, errors = [], 0
    stop = time.time() + seconds
    lock = threading.Lock()

    def client(k: int):
        nonlocal errors
        s = requests.Session()
        i = k
        while time.time() < stop:
            t = time.perf_counter()
            r = s.post(url, json=bodies[i % len(bodies)], timeout=300)
            with lock:
                if r.status_code == 200:
                    lat.append(time.perf_counter() - t)
                else:
                    errors += 1
            i += clients

    t0 = time.time()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.time() - t0
    lat.sort()
    return {"requests": len(lat), "errors": errors, "rps": round(len(lat) / wall, 2),
            "p50_ms": round(1000 * statistics.median(lat), 1),
            "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=32, help="Concurrent clients.")
    ap.add_argument("--seconds", type=float, default=40.0, help="Load time per configuration.")
    ap.add_argument("--wait-ms", type=float, default=10.0, help="Batch wait (batched run).")
    ap.add_argument("--replica-cpus", type=float, default=1.0,
                    help="CPUs (= engine threads) of the replica, both runs.")
    ap.add_argument("--out", default="bench/serve.json")
    args = ap.parse_args()

    import ray
    from ray import serve

    from grounding.synth import iter_samples
    from serve.app import build_app
    from serve.config import ServeConfig

    bodies = []
    for s in iter_samples(64, "base", 0):
        buf = io.BytesIO()
        s.image.save(buf, format="PNG")
        bodies.append({"image": base64.b64encode(buf.getvalue()).decode(), "text": s.text})
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = 8123
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/v1/ground"
    out = {"command": f"bench/bench_serve.py --clients {args.clients} --seconds {args.seconds}"
                      f" --wait-ms {args.wait_ms} --replica-cpus {args.replica_cpus}",
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    for name, batch in (("one_at_a_time", 1), ("batched", 32)):
        serve.run(build_app(ServeConfig(max_batch_size=batch, batch_wait_ms=args.wait_ms,
                                        num_cpus=args.replica_cpus, port=port)),
                  name="bench", route_prefix="/")
        load(url, bodies, 4, 5)  # warm-up: engine compiled paths, caches
        out[name] = load(url, bodies, args.clients, args.seconds)
        out[name]["max_batch_size"] = batch
        serve.delete("bench")
        print(name, json.dumps(out[name]), flush=True)
    out["ratio"] = round(out["batched"]["rps"] / out["one_at_a_time"]["rps"], 2)
    serve.shutdown()
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
