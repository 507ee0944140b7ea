"""The engine's own memory growth, without Ray: USS of one process that feeds vLLM as a label
actor does (blocks of ``--batch-size`` rows, ``--in-flight`` blocks at once), every ~1,000 rows.

Set beside the label job's actor (bench_label.py ``--scale``), it separates what the engine
and its image processing keep from what the Ray actor around it adds.

Run::

    .venv/bin/python bench/bench_engine_memory.py --rows 10000
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--in-flight", type=int, default=8)
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as the label actor runs
    import psutil

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_label import _images

    from grounding.engines import EngineConfig, load_engine
    from grounding.engines.grounder import Grounder, GroundingRequest
    from grounding.paths import DEFAULT_MODEL
    from grounding.synth import iter_samples

    model = str(DEFAULT_MODEL)
    eng = load_engine(EngineConfig(model=model, engine="vllm"))
    g = Grounder(eng)
    me = psutil.Process()
    inflight, block, done, every = [], [], 0, 63 * a.batch_size  # 1,008 rows at 16
    t0 = time.perf_counter()
    for s in iter_samples(a.rows, "base", seed=11):
        (im,) = _images([s], model)
        block.append(g.prepare(GroundingRequest(im, s.text, None)))
        if len(block) == a.batch_size:
            inflight.append(eng.submit(block))
            block = []
        while len(inflight) >= a.in_flight:
            inflight.pop(0).result()
            done += a.batch_size
            if done % every == 0:
                gc.collect()
                print(f"{done} rows {time.perf_counter() - t0:.0f} s "
                      f"uss={me.memory_full_info().uss / 2**20:.0f} MB", flush=True)
    for f in inflight:  # the last blocks: their rows count, their memory too
        f.result()
    gc.collect()
    print(f"{done + len(inflight) * a.batch_size} rows (end) {time.perf_counter() - t0:.0f} s "
          f"uss={me.memory_full_info().uss / 2**20:.0f} MB", flush=True)
    eng.close()


if __name__ == "__main__":
    main()
