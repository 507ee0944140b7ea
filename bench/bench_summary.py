"""Driver memory and time of the end-of-job summary (`pipelines.summary.summarize`) on an output.

Each repeat runs in a fresh process: peak RSS over the summary (``ru_maxrss`` after it, less
the RSS before it, imports done) and wall seconds. ``--src`` runs another checkout's code (an
older commit) on the same output, so two versions compare on the same files in the same run.

Run::

    git worktree add /tmp/old <commit>
    .venv/bin/python bench/bench_summary.py OUTPUT --src /tmp/old --src . --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = """
import json, resource, sys, time, psutil
from pipelines.output import JobOutput
from pipelines.summary import summarize
import pyarrow, pyarrow.parquet, pyarrow.compute, grounding.metrics, grounding.boxes
before = psutil.Process().memory_info().rss
t0 = time.perf_counter()
s = summarize(JobOutput(sys.argv[1]), write=False)
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": dt, "extra_mb": (peak - before) / 2**20, "rows": s["rows"],
                  "unique_rows": s["unique_rows"], "module": sys.modules["pipelines.summary"].__file__}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output")
    ap.add_argument("--src", action="append", default=None, help="checkout whose code runs "
                    "(repeatable; default: this one)")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    res = {}
    for src in a.src or ["."]:
        env = {**os.environ, "PYTHONPATH": os.path.abspath(src)}
        runs = []
        for _ in range(a.repeats):
            p = subprocess.run([sys.executable, "-c", CHILD, a.output], env=env, check=True,
                               capture_output=True, text=True, cwd=os.path.abspath(src))
            runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
        mb = [r["extra_mb"] for r in runs]
        s = [r["seconds"] for r in runs]
        res[src] = {"rows": runs[0]["rows"], "unique_rows": runs[0]["unique_rows"],
                    "module": runs[0]["module"],
                    "extra_mb": {"median": statistics.median(mb), "min": min(mb), "max": max(mb)},
                    "seconds": {"median": statistics.median(s), "min": min(s), "max": max(s)}}
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
