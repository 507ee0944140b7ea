"""Hostile clients against a real Ray Serve deployment (the request gate in front of its proxy,
installed as ``groundlabel serve`` does) of the bundled tiny model with the vLLM CPU engine:

1. ``/healthz`` latency idle, then while ``--hostile`` clients at a time send 8 MB
   ``[0,0,...]`` bodies (within the default 8 MiB limit) with a valid key (each client a
   process of its own, niced: they stand for other machines);
2. an ordinary request's latency while ``--stalled`` authenticated clients have sent their
   headers and 11 body bytes and stalled (half on each of two keys);
3. an unauthenticated 48 MiB body: bytes the server took before it answered and closed, its
   answer, and the proxy process's RSS before and after.

Run::

    .venv/bin/python bench/bench_hostile.py --out bench/hostile.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = ["bench-key-1", "bench-key-2", "bench-key-3"]


def _head(port: int, headers: dict, length: int):
    from support import raw_post_head  # tests/support.py, on the path from main()

    return raw_post_head(port, "/v1/ground", {"Content-Type": "application/json", **headers},
                         length, timeout=120)


def _proxy_rss() -> int:
    import psutil

    for p in psutil.process_iter(["cmdline", "name"]):
        if "ProxyActor" in " ".join(p.info["cmdline"] or []) + (p.info["name"] or ""):
            return p.memory_info().rss
    return -1


def _healthz(url: str, n: int, pause: float) -> list[float]:
    import requests

    out = []
    for _ in range(n):
        t = time.perf_counter()
        requests.get(f"{url}/healthz", timeout=120).raise_for_status()
        out.append((time.perf_counter() - t) * 1000)
        time.sleep(pause)
    return out


def _hostile(url: str, key: str, t_end: float, out) -> None:
    """One hostile client (a process): 8 MB ``[0,0,...]`` bodies with a valid key, one after
    another until ``t_end``; its answers (status, code, seconds) go to ``out``."""
    import requests

    os.nice(10)
    wide = b"[" + b"0," * 3_999_999 + b"0]"  # 8,000,001 bytes
    h = {"X-API-Key": key, "content-type": "application/json"}
    got = []
    while time.time() < t_end:
        t = time.perf_counter()
        r = requests.post(f"{url}/v1/ground", data=wide, headers=h, timeout=300)
        got.append((r.status_code, r.json().get("error", {}).get("code"),
                    round(time.perf_counter() - t, 2)))
    out.put(got)


def _summary(ms: list[float]) -> dict:
    ms = sorted(ms)
    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 1),
            "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 1), "max_ms": round(ms[-1], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hostile", type=int, default=3, help="Concurrent 8 MB wide bodies.")
    ap.add_argument("--hostile-seconds", type=float, default=20.0, help="How long they run.")
    ap.add_argument("--stalled", type=int, default=100, help="Stalled clients.")
    ap.add_argument("--out", default="bench/hostile.json", help="Where the figures go.")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    import ray
    import requests
    from ray import serve
    from support import read_status, send_body

    from grounding.synth import make_sample
    from serve.app import build_app
    from serve.config import ServeConfig

    tmp = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
    (tmp / "keys").write_text("\n".join(KEYS) + "\n")
    port = 8125
    fields = dict(api_keys_file=str(tmp / "keys"), port=port, body_timeout_s=10.0,
                  max_requests_per_key=32)
    cfg = ServeConfig(**{k: v for k, v in fields.items() if k in ServeConfig.model_fields})
    if "api_keys_file" not in ServeConfig.model_fields:
        os.environ["GROUNDLABEL_API_KEYS"] = ",".join(KEYS)  # the code before issue 27
    try:
        from serve.run import install_proxy_gate

        gate = install_proxy_gate(cfg)
    except ImportError:
        gate = False
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port,
                              "request_timeout_s": getattr(cfg, "request_timeout_s", None)})
    serve.run(build_app(cfg), name="bench-hostile", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    sample = make_sample(3, "base", 0)
    buf = io.BytesIO()
    sample.image.save(buf, format="PNG")
    ordinary = json.dumps({"image": base64.b64encode(buf.getvalue()).decode(),
                           "text": sample.text}).encode()
    h1 = {"X-API-Key": KEYS[0], "content-type": "application/json"}
    assert requests.post(f"{url}/v1/ground", data=ordinary, headers=h1, timeout=120).ok
    out: dict = {"command": " ".join(["bench/bench_hostile.py", *sys.argv[1:]]),
                 "machine": f"{platform.processor() or platform.machine()}, "
                            f"{os.cpu_count()} cores",
                 "date": time.strftime("%Y-%m-%d", time.gmtime()), "proxy_gate": gate}

    # 1. /healthz idle, then under wide JSON bodies.
    out["healthz_idle"] = _summary(_healthz(url, 40, 0.05))
    # The hostile clients are processes of their own, niced: on a deployment they are other
    # machines, and here they would otherwise take the 2 cores' time from the server (and, as
    # threads, the GIL from the prober that times /healthz).
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    answers = ctx.Queue()
    t_end = time.time() + 1 + args.hostile_seconds
    procs = [ctx.Process(target=_hostile, args=(url, KEYS[0], t_end, answers))
             for _ in range(args.hostile)]
    for p in procs:
        p.start()
    time.sleep(1)
    under: list[float] = []
    while time.time() < t_end:
        under += _healthz(url, 1, 0.1)
    got = []
    for _ in procs:  # every answer list first: a child exits only once its list was read
        got += answers.get(timeout=600)
    for p in procs:
        p.join(600)
    answers = got
    out["healthz_under_wide_json"] = _summary(under)
    out["wide_json_answers"] = {f"{s} {c}": sum(1 for a in answers if a[:2] == (s, c))
                                for s, c in {a[:2] for a in answers}}
    out["wide_json_seconds_p50"] = statistics.median(a[2] for a in answers) if answers else None
    print(json.dumps(out, indent=2), flush=True)

    # 2. stalled clients, then an ordinary request (a third key).
    stalled = []
    for i in range(args.stalled):
        s = _head(port, {"X-API-Key": KEYS[i % 2]}, 5000)
        s.sendall(b'{"image": "')
        stalled.append(s)
    time.sleep(1)
    t = time.perf_counter()
    try:
        r = requests.post(f"{url}/v1/ground", data=ordinary,
                          headers={**h1, "X-API-Key": KEYS[2]}, timeout=60)
        out["ordinary_with_stalled"] = {"status": r.status_code,
                                        "seconds": round(time.perf_counter() - t, 2)}
    except requests.RequestException as e:
        out["ordinary_with_stalled"] = {"status": type(e).__name__,
                                        "seconds": round(time.perf_counter() - t, 2)}
    t = time.perf_counter()
    statuses = []
    for s in stalled:  # each answered by the body deadline (10 s), or 0 after 30 s
        s.settimeout(max(0.1, 30 - (time.perf_counter() - t)))
        statuses.append(read_status(s))
    out["stalled_answers"] = {str(x): statuses.count(x) for x in sorted(set(statuses))}
    out["stalled_answered_within_s"] = round(time.perf_counter() - t, 1)
    for s in stalled:
        s.close()
    print(json.dumps(out, indent=2), flush=True)

    # 3. an unauthenticated 48 MiB body.
    time.sleep(2)
    before = _proxy_rss()
    total = 48 * 2**20
    t = time.perf_counter()
    sent, status = send_body(_head(port, {}, total), total, timeout=30)
    out["unauthenticated_48mib"] = {"bytes_taken": sent, "status": status,
                                    "seconds": round(time.perf_counter() - t, 2),
                                    "proxy_rss_mb_before": round(before / 2**20),
                                    "proxy_rss_mb_after": round(_proxy_rss() / 2**20)}
    serve.shutdown()
    ray.shutdown()
    Path(args.out).write_text(json.dumps(out, indent=2, sort_keys=True))
    print(json.dumps(out, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
