"""The label job writing a Delta table (this checkout) against the job of before, which wrote
Parquet parts (a checkout of 01992dc), on the same input, on this machine, alternating runs.

Each run is ``python -m groundlabel label`` started in its checkout (so it imports that
checkout's code), with the same settings and the same bundled model. Reported per run: the
whole run's rows/s (command to exit) and the engine phase's (rows / (written - first rows into
the engine), from the run's `_summary.json` start-up timeline); the median ratio new/old with
its spread; and whether both outputs hold the same labels, row for row
(`bench/compare_outputs.py`).

    git worktree add /tmp/old 01992dc
    .venv/bin/python bench/bench_table_vs_parts.py --old /tmp/old --rows 10000 --repeats 2
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(checkout: Path, data: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "groundlabel", "label", "--input", str(data), "--output",
           str(out), "--no-progress", "--model", str(ROOT / "models" / "tiny-qwen3-vl")]
    env = dict(os.environ, PYTHONPATH=str(checkout))
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise RuntimeError(f"{checkout}: {res.stderr[-3000:]}")
    s = json.loads((out / "_summary.json").read_text())
    tl = s["startup"]["timeline_s"]
    phase = tl["written"] - tl["first_rows_in"]
    return {"rows": s["rows"], "wall_s": round(wall, 1), "rows_per_s": round(s["rows"] / wall, 2),
            "engine_phase_s": round(phase, 1),
            "engine_phase_rows_per_s": round(s["rows"] / phase, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="checkout of the job before the table")
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="bench/table-vs-parts.json")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from grounding.synth import write_dataset

    tmp = Path(tempfile.mkdtemp(prefix="bench-table-"))
    data = write_dataset(tmp / "data", a.rows, "base", seed=7)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())
    res: dict = {"machine": f"{os.cpu_count()} cores, {cpu}", "rows": a.rows,
                 "command": " ".join(sys.argv), "old": [], "new": []}
    for k in range(a.repeats):
        res["old"].append(run(Path(a.old), data, tmp / f"old-{k}"))
        res["new"].append(run(ROOT, data, tmp / f"new-{k}"))
        print(json.dumps({"old": res["old"][-1], "new": res["new"][-1]}), flush=True)
    for key in ("rows_per_s", "engine_phase_rows_per_s"):
        ratios = [n[key] / o[key] for o, n in zip(res["old"], res["new"], strict=True)]
        res[f"ratio_{key}"] = {"median": round(statistics.median(ratios), 3),
                               "min": round(min(ratios), 3), "max": round(max(ratios), 3)}
    cmp = subprocess.run([sys.executable, str(ROOT / "bench" / "compare_outputs.py"),
                          str(tmp / "old-0"), str(tmp / "new-0")], capture_output=True, text=True)
    res["same_labels"] = json.loads(cmp.stdout.strip().splitlines()[-1])
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
