"""What the registry on one Delta table costs as its history grows: ``--events`` events
(registrations, promotions, refusals, rollbacks) on moto's S3, then

* a promotion (one conditional commit: read the state, commit the next version);
* ``production()`` in a fresh process (cold: every row read once, through the change data feed);
* ``production()`` polled again with nothing new (what a serve replica does every ``poll_s``),
  and after one new event;

each repeated ``--repeat`` times (median and spread), with the storage requests of one warm poll
counted by the loopback proxy (tests/http_fault_proxy.py).

Run::

    .venv/bin/python bench/bench_registry.py --events 300 --out bench/registry.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cold(uri: str, endpoint: str) -> float:
    code = ("import time,sys;t=time.perf_counter();from grounding.registry import AdapterRegistry;"
            "from grounding.storage import StorageOptions;"
            f"r=AdapterRegistry({uri!r},StorageOptions(s3_endpoint_url={endpoint!r}));"
            "t=time.perf_counter();r.production();print(time.perf_counter()-t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"cold read failed ({out.returncode}): {out.stderr[-3000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def _spread(xs: list[float]) -> dict:
    return {"median_s": round(statistics.median(xs), 4), "min_s": round(min(xs), 4),
            "max_s": round(max(xs), 4), "n": len(xs)}


def main() -> None:
    moto: list[subprocess.Popen] = []
    try:
        _main(moto)
    finally:
        for m in moto:  # never left behind, whatever failed
            m.kill()


def _main(started: list) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=300, help="Events before measuring.")
    ap.add_argument("--repeat", type=int, default=5, help="Repeats of each measurement.")
    ap.add_argument("--out", default="bench/registry.json", help="Where the figures go.")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    import boto3
    from support import fault_proxy, free_port

    from grounding.registry import AdapterRegistry
    from grounding.storage import StorageOptions

    port = free_port()
    moto = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H",
                             "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    started.append(moto)
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    ep = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            boto3.client("s3", endpoint_url=ep).create_bucket(Bucket="bench")
            break
        except Exception:  # noqa: BLE001 - moto still starting
            time.sleep(0.1)
    uri = f"s3://bench/reg-{uuid.uuid4().hex[:6]}"
    reg = AdapterRegistry(uri, StorageOptions(s3_endpoint_url=ep))
    tmp = Path(tempfile.mkdtemp())
    names = []
    for i in range(3):
        d = tmp / f"a{i}"
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
        (d / "adapter_model.safetensors").write_bytes(bytes([i]) * 4096)
        names.append(reg.register(d, {"i": i}, name=f"ad-{i}"))
    t0 = time.time()
    while reg.state().version < args.events:
        k = reg.state().version
        if k % 3 == 2:
            reg.record("refuse", name=names[k % 3], reason="bench")
        elif k % 7 == 0 and reg.production():
            reg.rollback("bench")
        else:
            reg.promote(names[k % 3], "bench")
    fill_s = time.time() - t0
    out = {"command": f"bench/bench_registry.py --events {args.events} --repeat {args.repeat}",
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "date": time.strftime("%Y-%m-%d", time.gmtime()), "events": reg.state().version,
           "fill_s": round(fill_s, 1),
           "fill_per_event_s": round(fill_s / max(1, args.events - 3), 4)}
    promote = []
    for i in range(args.repeat):
        t = time.perf_counter()
        reg.promote(names[i % 3], "bench")
        promote.append(time.perf_counter() - t)
    out["promote"] = _spread(promote)
    out["production_cold_fresh_process"] = _spread([_cold(uri, ep) for _ in range(args.repeat)])
    warm = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        reg.production()
        warm.append(time.perf_counter() - t)
    out["production_warm_nothing_new"] = _spread(warm)
    after = []
    for _ in range(args.repeat):
        reg.record("refuse", name=names[0], reason="bench")
        t = time.perf_counter()
        reg.production()
        after.append(time.perf_counter() - t)
    out["production_warm_one_new_event"] = _spread(after)
    # The requests of one warm poll, counted by the proxy.
    log = tmp / "proxy.log"
    with fault_proxy(ep, drops=0, log=log) as proxy:
        via = AdapterRegistry(uri, StorageOptions(s3_endpoint_url=proxy["url"]))
        via.production()  # cold through the proxy
        before = len(log.read_text().splitlines())
        via.production()
        time.sleep(0.2)
        lines = [ln for ln in log.read_text().splitlines()[before:] if ln.startswith("req ")]
    out["warm_poll_requests"] = len(lines)
    out["warm_poll_request_lines"] = lines[:10]
    Path(args.out).write_text(json.dumps(out, indent=2, sort_keys=True))
    print(json.dumps(out, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
