"""The larger property-based fuzz of the online endpoint: ``--examples`` requests generated
from its OpenAPI schema and beyond it (tests/serve/serve_fuzz.py: nested JSON, huge numbers,
unicode text, extreme and corrupt images, long prompts, strange adapter names, raw bytes,
mangled image URIs, lone surrogates and control tokens in the text, wide JSON)
against a real Ray Serve deployment of the bundled tiny model with the vLLM CPU engine.
Reported: status counts by kind of input, the number of 5xx (must be 0), ``/healthz``
latency throughout (a prober process, every 0.2 s), and whether the endpoint was still healthy
and answering afterwards. CI runs a smaller count of the same
strategies (tests/serve/test_serve.py::test_property_based_fuzz_no_5xx_and_still_healthy).

Run::

    .venv/bin/python bench/bench_fuzz.py --examples 2000 --out bench/fuzz.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEY = "bench-key"


def _probe(url: str, stop, out) -> None:
    """GET /healthz every 0.2 s until ``stop``; the latencies (ms) go to ``out``."""
    import requests

    ms = []
    while not stop.is_set():
        t = time.perf_counter()
        requests.get(f"{url}/healthz", timeout=120).raise_for_status()
        ms.append((time.perf_counter() - t) * 1000)
        time.sleep(0.2)
    out.put(ms)


def _summary(ms: list[float]) -> dict:
    ms = sorted(ms)
    return {"n": len(ms), "p50_ms": round(ms[len(ms) // 2], 1),
            "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 1), "max_ms": round(ms[-1], 1),
            "over_100_ms": sum(m > 100 for m in ms)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=2000, help="Requests to generate.")
    ap.add_argument("--seed", type=int, default=0, help="Hypothesis seed.")
    ap.add_argument("--out", default="bench/fuzz.json", help="Where the figures go.")
    args = ap.parse_args()

    import ray
    import requests
    from hypothesis import HealthCheck, given, seed, settings
    from ray import serve

    sys.path.insert(0, str(ROOT / "tests" / "serve"))
    from serve_fuzz import requests_

    from grounding.synth import make_sample
    from serve.app import build_app
    from serve.config import ServeConfig
    from serve.run import install_proxy_gate

    tmp = Path(tempfile.mkdtemp(prefix="bench-fuzz-"))
    (tmp / "imgs").mkdir()
    sample = make_sample(3, "base", 0)
    sample.image.save(tmp / "imgs" / "one.png")
    buf = io.BytesIO()
    sample.image.save(buf, format="PNG")
    normal = {"image": base64.b64encode(buf.getvalue()).decode(), "text": sample.text}
    os.environ["GL_BENCH_KEYS"] = KEY  # before Ray starts: the replica inherits it
    port = 8124
    cfg = ServeConfig(api_keys_env="GL_BENCH_KEYS", port=port,
                      allowed_uri_prefixes=[str(tmp / "imgs") + "/"],
                      max_body_bytes=2_000_000, max_image_pixels=4_000_000)
    install_proxy_gate(cfg)  # as `groundlabel serve`: the gate in front of Serve's proxy
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port,
                              "request_timeout_s": cfg.request_timeout_s})
    serve.run(build_app(cfg), name="bench-fuzz", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    spec = requests.get(f"{url}/openapi.json", timeout=30).json()
    # /healthz timed throughout, by a process of its own started before this one (the
    # fuzzing client, which stands for other machines) is niced: a prober thread here would
    # wait on the GIL behind hypothesis, and the client would take the server's CPU share.
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    stop, probes = ctx.Event(), ctx.Queue()
    prober = ctx.Process(target=_probe, args=(url, stop, probes))
    prober.start()
    os.nice(10)
    seen: dict[str, dict[int, int]] = {}
    five: list = []
    t0 = time.time()

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(requests_(spec, str(tmp / "imgs") + "/", KEY))
    def one(req):
        r = requests.post(f"{url}/v1/ground", data=req.body, headers=req.headers, timeout=120)
        k = seen.setdefault(req.kind, {})
        k[r.status_code] = k.get(r.status_code, 0) + 1
        if r.status_code >= 500:
            five.append({"status": r.status_code, "body": req.body[:200].decode("latin-1"),
                         "answer": r.text[:200]})

    one()
    seconds = time.time() - t0
    stop.set()
    healthz = _summary(probes.get(timeout=120))
    prober.join(60)
    h = {k: requests.get(f"{url}{k}", timeout=30).status_code for k in ("/healthz", "/readyz")}
    after = requests.post(f"{url}/v1/ground", json=normal, headers={"X-API-Key": KEY},
                          timeout=120).status_code
    serve.shutdown()
    total = sum(sum(v.values()) for v in seen.values())
    out = {"command": f"bench/bench_fuzz.py --examples {args.examples} --seed {args.seed}",
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "date": time.strftime("%Y-%m-%d", time.gmtime()),
           "requests": total, "seconds": round(seconds, 1), "five_xx": len(five),
           "healthz_during": healthz,
           "five_xx_examples": five[:10], "statuses_by_kind": seen, "health_after": h,
           "normal_request_after": after}
    Path(args.out).write_text(json.dumps(out, indent=2, sort_keys=True))
    print(json.dumps(out, indent=2, sort_keys=True))
    sys.exit(0 if not five and after == 200 and set(h.values()) == {200} else 1)


if __name__ == "__main__":
    main()
