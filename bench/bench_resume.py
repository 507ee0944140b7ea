"""Exactly once at scale: a 10,000-row label job with ~5 % poisoned rows, killed at roughly
half way and rerun; and the driver's peak memory for 10,000 vs 1,000 rows.

Poison (every 20th row, cycling): a line that is not JSON, a missing image file, a corrupt
image, an empty expression, a zero-byte image. The job runs as users run it
(``python -m groundlabel label``); the kill is SIGKILL of its whole process group (driver, Ray,
actors) once about half the rows are committed. The driver's peak RSS is its ``VmHWM``
(``/proc/PID/status``), sampled until it exits.

    .venv/bin/python bench/bench_resume.py                 # -> bench/resume.json
    .venv/bin/python bench/bench_resume.py --rows 2000 --small 500   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

POISON = ["bad_json", "missing", "corrupt", "empty_text", "empty_image"]


def make_input(d: Path, n: int) -> tuple[Path, Counter]:
    """A seed JSONL of ``n`` rows, every 20th poisoned; returns it and the expected codes."""
    from grounding.synth import write_dataset

    shard = write_dataset(d, n, "base", seed=21)
    lines = shard.read_text().splitlines()
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (d / "empty.png").write_bytes(b"")
    expect: Counter = Counter()
    for i in range(0, n, 20):
        kind = POISON[(i // 20) % len(POISON)]
        row = json.loads(lines[i])
        if kind == "bad_json":
            lines[i] = '{"image": "x.png", "text": '
        elif kind == "missing":
            row["image"] = str(d / "no-such-image.png")
        elif kind == "corrupt":
            row["image"] = str(d / "corrupt.png")
        elif kind == "empty_text":
            row["text"] = "  "
        else:
            row["image"] = str(d / "empty.png")
        if kind != "bad_json":
            lines[i] = json.dumps(row)
        expect[kind] += 1
    shard.write_text("\n".join(lines) + "\n")
    return shard, expect


def _hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _committed(out: Path) -> int:
    """Rows committed to the output table so far (its file statistics; no data read)."""
    from grounding import tables

    try:
        return tables.row_count(tables.open_table(str(out)))
    except Exception:  # noqa: BLE001 - no table yet
        return 0


def run(cmd: list[str], log: Path, kill_at_rows: int | None = None, out: Path | None = None):
    """Run the job; with ``kill_at_rows`` SIGKILL it once that many rows are committed.
    Returns (exit code, seconds, driver peak RSS MiB, killed?)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    peak, killed = 0, False
    while proc.poll() is None:
        peak = max(peak, _hwm_kb(proc.pid))
        if kill_at_rows and out is not None and (out / "_delta_log").exists():
            if _committed(out) >= kill_at_rows:
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
                break
        time.sleep(0.5)
    code = proc.wait()
    return code, time.perf_counter() - t0, peak / 1024, killed


def check(out: Path, n: int, expect: Counter) -> dict:
    from pipelines.output import JobOutput

    rows = JobOutput(str(out)).read(["row_id", "error_code"]).to_pylist()
    ids = [r["row_id"] for r in rows]
    codes = Counter(r["error_code"] for r in rows if r["error_code"])
    return {"rows_in": n, "rows_out": len(rows), "duplicates": len(ids) - len(set(ids)),
            "bad_rows_expected": dict(expect), "bad_rows_coded": dict(codes),
            "bad_rows_as_expected": all(codes.get(k, 0) >= v for k, v in expect.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--small", type=int, default=1_000, help="the memory baseline's rows")
    ap.add_argument("--repeats", type=int, default=3, help="runs of the small job")
    ap.add_argument("--out", default="bench/resume.json")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    tmp = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    base = [sys.executable, "-m", "groundlabel", "label", "--no-progress", "--batch-size", "32",
            "--commit-rows", "512"]
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())
    res: dict = {"machine": f"{os.cpu_count()} cores, {cpu}", "rows": a.rows,
                 "small_rows": a.small}

    big, expect = make_input(tmp / "big", a.rows)
    out = tmp / "out-big"
    cmd = [*base, "--input", str(big), "--output", str(out)]
    code, s1, peak1, killed = run(cmd, tmp / "big-1.log", kill_at_rows=a.rows // 2, out=out)
    res["first_run"] = {"exit": code, "seconds": round(s1, 1), "killed": killed,
                        "driver_peak_mib": round(peak1)}
    from pipelines.output import JobOutput

    res["rows_before_rerun"] = JobOutput(str(out)).progress().rows
    code, s2, peak2, _ = run(cmd, tmp / "big-2.log")
    res["rerun"] = {"exit": code, "seconds": round(s2, 1), "driver_peak_mib": round(peak2)}
    res["result"] = check(out, a.rows, expect)

    small_peaks = []
    for k in range(a.repeats):
        sm, _ = make_input(tmp / f"small-{k}", a.small)
        code, s, peak, _ = run([*base, "--input", str(sm), "--output", str(tmp / f"out-s{k}")],
                               tmp / f"small-{k}.log")
        assert code == 0, (tmp / f"small-{k}.log").read_text()[-2000:]
        small_peaks.append(peak)
    code, s, big_peak, _ = run([*base, "--input", str(big), "--output", str(tmp / "out-big2")],
                               tmp / "big-3.log")
    res["driver_peak_mib_small"] = [round(p) for p in small_peaks]
    res["driver_peak_mib_big"] = round(big_peak)
    med = sorted(small_peaks)[len(small_peaks) // 2]
    res["driver_peak_ratio_big_over_small"] = round(big_peak / med, 3)
    res["driver_peak_ratio_spread"] = [round(big_peak / max(small_peaks), 3),
                                       round(big_peak / min(small_peaks), 3)]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
