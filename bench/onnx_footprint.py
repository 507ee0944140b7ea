"""Latency and peak memory of the ONNX runner against the transformers engine, each engine in a
fresh process of its own (so one's memory never counts for the other), and the folder's size.

Each worker: imports and loads its engine (timed; peak RSS after loading), grounds one warm-up
image, then N test-seed images one per call (per-image latency: mean, median, p90), and reports
its peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) at the end. Run it alone on the
machine: latencies are wall clock.

    OMP_NUM_THREADS=1 .venv/bin/python bench/onnx_footprint.py --onnx runs/onnx --n 50 \\
        --out bench/onnx_footprint.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(engine: str, target: str, n: int, domain: str, seed: int) -> dict:
    t0 = time.perf_counter()
    if engine == "onnx":
        from grounding.edge.runner import OnnxGrounder

        g = OnnxGrounder(target)

        def ground(s):
            return g.ground(s.image, s.text)
    else:
        from grounding.engines import EngineConfig
        from grounding.engines.grounder import Grounder, GroundingRequest
        from grounding.engines.hf_engine import HFEngine

        hf = Grounder(HFEngine(EngineConfig(model=target, engine="transformers")))

        def ground(s):
            return hf.ground([GroundingRequest(s.image, s.text)])[0]
    from grounding.synth import iter_samples

    load_s = time.perf_counter() - t0
    rss_loaded = _rss_mb()
    samples = list(iter_samples(n + 1, domain, seed))
    ground(samples[0])  # warm-up: first-call allocations, grammar compilation
    times, tokens = [], 0
    for s in samples[1:]:
        t = time.perf_counter()
        r = ground(s)
        times.append(time.perf_counter() - t)
        tokens += r.num_tokens
    times.sort()
    heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "vllm",
                                                            "ray", "xgrammar"})
    return {"engine": engine, "images": n, "load_s": round(load_s, 2),
            "peak_rss_mb_after_load": round(rss_loaded, 1), "peak_rss_mb": round(_rss_mb(), 1),
            "s_per_image_mean": round(sum(times) / n, 4),
            "s_per_image_median": round(times[n // 2], 4),
            "s_per_image_p90": round(times[int(n * 0.9)], 4),
            "ms_per_token": round(1000 * sum(times) / max(tokens, 1), 2),
            "tokens_per_image": round(tokens / n, 1), "heavy_modules_loaded": heavy}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--onnx", required=True, help="export folder")
    ap.add_argument("--model", default=None, help="checkpoint for the transformers engine "
                    "(default: the manifest's source model)")
    ap.add_argument("--extra-onnx", nargs="*", default=[], help="more export folders to time "
                    "(e.g. an int8 one)")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--domain", default="base")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", nargs=2, metavar=("ENGINE", "TARGET"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1], a.n, a.domain, a.seed)))
        return {}
    manifest = json.loads((Path(a.onnx) / "manifest.json").read_text())
    model = a.model or manifest["source"]["model"]
    runs = [("transformers", model), ("onnx", a.onnx), *[("onnx", f) for f in a.extra_onnx]]
    report: dict = {"n": a.n, "domain": a.domain, "seed": a.seed, "engines": [],
                    "folders": {}}
    for engine, target in runs:
        p = subprocess.run([sys.executable, __file__, "--onnx", a.onnx, "--n", str(a.n),
                            "--domain", a.domain, "--seed", str(a.seed),
                            "--worker", engine, target], capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"{engine} {target} failed:\n{p.stderr[-3000:]}")
        res = {"target": target, **json.loads(p.stdout.strip().splitlines()[-1])}
        report["engines"].append(res)
        print(json.dumps(res), flush=True)
    for folder in (a.onnx, *a.extra_onnx):
        files = {f.name: f.stat().st_size for f in Path(folder).iterdir() if f.is_file()}
        report["folders"][folder] = {"bytes": sum(files.values()), "files": files}
    ckpt = Path(model)
    report["checkpoint_bytes"] = sum(f.stat().st_size for f in ckpt.iterdir() if f.is_file())
    print(json.dumps({k: v["bytes"] for k, v in report["folders"].items()}), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
