"""Bookkeeping of a label job's output table at scale, with no model: what resume planning and
the end-of-job summary cost at 1M and 10M rows, on a local folder and on moto's S3.

Rows are generated and committed through the job's own write and commit path, one commit per
``--commit-rows`` rows as a job's driver commits them (`pipelines.commit.commit_rows`:
`write_group` writes the data file, `JobOutput.commit_add` commits it with its application
transactions and record). Every 50th row has a permanent error, one row per shard of 100,000
a transient one (so planning reads the few files holding them), every 10th a true box. Then, each in a fresh process and repeated: resume planning (what
`pipelines.label.plan` reads: the job's identity, `JobOutput.progress`, the committed pieces
by shard, the rows to retry) and the summary (`pipelines.summary.summarize`), with the driver
memory each adds (peak RSS over the RSS before, imports done) and, on S3, the requests the
store received, counted by a loopback proxy in front of moto (`tests/http_fault_proxy.py`) in
one more run (the timed runs go to moto directly: the proxy adds its own latency).

    .venv/bin/python bench/bench_bookkeeping.py --rows 1000000 --where local s3
    .venv/bin/python bench/bench_bookkeeping.py --rows 10000000 --where local s3 --out bench/bookkeeping-10m.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARD_ROWS = 100_000


def _rss_kb(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _chunk(start: int, n: int):
    """Output rows ``start .. start+n-1`` (shards of 100,000 lines) as an Arrow table."""
    import pyarrow as pa

    from pipelines import schema

    i = list(range(start, start + n))
    shard = [f"shard-{k // SHARD_ROWS:05d}.jsonl" for k in i]
    code = ["engine_error" if k % SHARD_ROWS == 7 else "missing" if k % 50 == 0 else None
            for k in i]
    box = {"x1": 10.0, "y1": 10.0, "x2": 50.0, "y2": 50.0, "score": 0.9, "label": None}
    cols = {f.name: pa.nulls(n, f.type) for f in schema.OUTPUT}
    cols.update(
        row_id=pa.array([f"{s}:{k % SHARD_ROWS}" for s, k in zip(shard, i, strict=True)]),
        shard=pa.array(shard), status=pa.array(["error" if c else "ok" for c in code]),
        error_code=pa.array(code, pa.string()),
        boxes=pa.array([[] if c else [box] for c in code], schema.OUTPUT.field("boxes").type),
        gold=pa.array([[10.0, 10.0, 50.0, 50.0] if k % 10 == 5 else None for k in i],
                      schema.OUTPUT.field("gold").type),
        score=pa.array([None if c else 0.9 for c in code], pa.float64()))
    return pa.table(cols, schema=schema.OUTPUT)


def write(uri: str, endpoint: str | None, rows: int, commit_rows: int) -> dict:
    """Create the table and commit ``rows`` rows, ``commit_rows`` at a time."""
    from grounding.storage import StorageOptions
    from pipelines.commit import commit_rows as commit
    from pipelines.output import JobOutput

    out = JobOutput(uri, StorageOptions(s3_endpoint_url=endpoint))
    job = out.start_job({"piece_rows": 128}, "bench-bookkeeping", {})
    t0 = time.perf_counter()
    commits = 0
    for shard in range(0, rows, SHARD_ROWS):  # commits hold whole pieces of one shard
        for start in range(shard, min(rows, shard + SHARD_ROWS), commit_rows):
            n = min(commit_rows, rows - start, shard + SHARD_ROWS - start)
            commits += len(commit(out, job, _chunk(start, n), run="bench"))
            if commits % 500 == 0:
                print(f"  {start + n:,} rows, {commits} commits, "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
    return {"commits": commits, "write_s": round(time.perf_counter() - t0, 1)}


def measure(uri: str, endpoint: str | None) -> dict:
    """In a fresh process: planning, then the summary, each timed with the memory it adds."""
    import pyarrow  # noqa: F401 - imported before the baseline, as in a driver
    from deltalake import DeltaTable  # noqa: F401

    from grounding.storage import StorageOptions
    from pipelines.output import JobOutput
    from pipelines.summary import summarize

    out = JobOutput(uri, StorageOptions(s3_endpoint_url=endpoint))
    base = _rss_kb()
    t0 = time.perf_counter()
    job = out.job_record()
    prog = out.progress()
    done = prog.done()
    retry = out.transient_rows(sorted(prog.transient_files()))
    plan_s = time.perf_counter() - t0
    plan_peak = _rss_kb("VmHWM") - base
    t0 = time.perf_counter()
    s = summarize(out, write=False)
    summary_s = time.perf_counter() - t0
    return {"plan_s": round(plan_s, 2), "summary_s": round(summary_s, 2),
            "plan_peak_added_mb": round(plan_peak / 1024, 1),
            "total_peak_added_mb": round((_rss_kb("VmHWM") - base) / 1024, 1),
            "rows": s["rows"], "unique_rows": s["unique_rows"], "table_rows": s["table_rows"],
            "files": len(prog.files), "shards": len(done), "retry_rows":
            sum(len(v) for v in retry.values()), "job": job.get("job_id")}


def _proxy(moto_port: int, log: Path):
    """The counting proxy, its log to a file (a pipe nobody reads while the measured process
    runs would fill up and stall the proxy)."""
    from support import free_port

    port = free_port()
    p = subprocess.Popen([sys.executable, str(ROOT / "tests" / "http_fault_proxy.py"),
                          str(port), str(moto_port), "^$", "0", "log"],
                         stdout=log.open("w"), text=True)
    deadline = time.time() + 30
    while "ready" not in log.read_text():
        assert time.time() < deadline and p.poll() is None, "the counting proxy did not start"
        time.sleep(0.05)
    return p, f"http://127.0.0.1:{port}"


def _requests(lines: list[str]) -> dict:
    c: Counter = Counter()
    for ln in lines:
        m = re.match(r"req (\w+) (\S+)", ln)
        if m:
            path = m.group(2).split("?", 1)[0]
            kind = "log" if "/_delta_log/" in path else "data" if path.endswith(
                ".parquet") else "other"
            c[f"{m.group(1)} {kind}"] += 1
    return dict(sorted(c.items()))


def _one(uri, endpoint) -> dict:
    cmd = [sys.executable, __file__, "--measure", uri] + (["--endpoint", endpoint]
                                                          if endpoint else [])
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_measure(uri, endpoint, proxy_port_of_moto, repeats):
    """Fresh processes, timed straight against the store; on S3 one more run through the
    counting proxy, which counts its requests (the proxy, a Python process relaying every
    request, adds its own latency, so that run's times are reported apart, as
    ``counted_run``)."""
    runs = [_one(uri, endpoint) for _ in range(repeats)]
    keys = ("plan_s", "summary_s", "plan_peak_added_mb", "total_peak_added_mb")
    out = {k: {"median": statistics.median(r[k] for r in runs),
               "min": min(r[k] for r in runs), "max": max(r[k] for r in runs)} for k in keys}
    out["runs"] = runs
    if endpoint:
        log = Path(tempfile.gettempdir()) / f"bookkeeping-proxy-{os.getpid()}.log"
        proxy, via = _proxy(proxy_port_of_moto, log)
        try:
            r = _one(uri, via)
        finally:
            proxy.kill()
            proxy.wait()
        r["requests"] = _requests(log.read_text().splitlines())
        r["requests_total"] = sum(r["requests"].values())
        out["counted_run"] = r
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--where", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    ap.add_argument("--commit-rows", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/bookkeeping.json")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    if a.measure:
        print(json.dumps(measure(a.measure, a.endpoint)))
        return
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())
    res: dict = {"machine": f"{os.cpu_count()} cores, {cpu}", "commit_rows": a.commit_rows,
                 "command": " ".join(sys.argv), "results": []}
    tmp = Path(tempfile.mkdtemp(prefix="bench-bookkeeping-"))
    moto = None
    try:
        if "s3" in a.where:
            import boto3
            from support import free_port

            port = free_port()
            moto = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H",
                                     "127.0.0.1", "-p", str(port)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                              AWS_DEFAULT_REGION="us-east-1")
            time.sleep(2)
            endpoint = f"http://127.0.0.1:{port}"
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        for rows in a.rows:
            for where in a.where:
                uri = str(tmp / f"out-{rows}") if where == "local" else f"s3://bench/out-{rows}"
                ep = endpoint if where == "s3" else None
                print(f"{where} {rows:,} rows: writing", flush=True)
                w = write(uri, ep, rows, a.commit_rows)
                m = run_measure(uri, ep, port if where == "s3" else None, a.repeats)
                r = {"where": where, "rows": rows, **w, **m}
                res["results"].append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "runs"}), flush=True)
                Path(a.out).write_text(json.dumps(res, indent=2))
    finally:
        if moto is not None:
            moto.kill()
    Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
