"""Benchmark of the bulk labeling job against its baselines, all measured in the same run.

* bare engine: vLLM `generate` on pre-decoded, pre-resized images held in memory;
* full job: `groundlabel label` (Ray Data + vLLM actor pool + Parquet), local paths;
* hand-written loop: transformers `generate`, one row at a time (what a user writes first).

Job throughput is *marginal*: rows / (T(2N rows) - T(N rows)), so Ray and engine start-up,
which do not grow with the data, cancel out; the start-up cost is reported beside it.

Run::

    .venv/bin/python bench/bench_label.py --rows 256 --out bench/label.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def _images(samples, model: str):
    from grounding.checkpoint import resize_spec

    spec = resize_spec(model)
    out = []
    for s in samples:
        w, h = spec.resized_size(s.image.size)
        out.append(s.image.resize((w, h)) if (w, h) != s.image.size else s.image)
    return out


def bare_engine(model: str, samples, batch: int) -> float:
    from grounding.engines import EngineConfig, EngineInput, load_engine
    from grounding.engines.grounder import Grounder

    eng = load_engine(EngineConfig(model=model, engine="vllm"))
    g = Grounder(eng)
    inputs = [EngineInput(g.prompt(s.text), im) for s, im in zip(samples, _images(samples, model),
                                                                  strict=True)]
    eng.generate(inputs[:batch])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(inputs), batch):
        eng.generate(inputs[i:i + batch])
    dt = time.perf_counter() - t0
    eng.close()
    return len(inputs) / dt


def hf_loop(model: str, samples) -> float:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from grounding.families import get_family

    torch.set_num_threads(1)
    proc = AutoProcessor.from_pretrained(model)
    m = AutoModelForImageTextToText.from_pretrained(model, dtype=torch.float32).eval()
    fam = get_family("qwen3_vl")

    def one(s):
        msgs = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": fam.prompt(s.text)}]}]
        prompt = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        enc = proc(text=[prompt], images=[s.image], return_tensors="pt")
        with torch.no_grad():
            out = m.generate(**enc, max_new_tokens=64, do_sample=False)
        fam.parse(proc.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True),
                  s.image.size)

    one(samples[0])
    t0 = time.perf_counter()
    for s in samples:
        one(s)
    return len(samples) / (time.perf_counter() - t0)


def job_seconds(data: Path, out: Path, actors: int, batch: int) -> float:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "groundlabel", "label", "--input", str(data), "--output",
           str(out), "--num-actors", str(actors), "--batch-size", str(batch), "--no-progress"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256, help="N (the job also runs 2N)")
    ap.add_argument("--batch", type=int, default=32, help="rows per engine call")
    ap.add_argument("--loop-rows", type=int, default=32, help="rows for the per-row HF loop")
    ap.add_argument("--out", default="bench/label.json")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from grounding.paths import DEFAULT_MODEL
    from grounding.synth import iter_samples, write_dataset

    model = str(DEFAULT_MODEL)
    tmp = Path(tempfile.mkdtemp(prefix="bench-label-"))
    n = a.rows
    small = write_dataset(tmp / "n", n, "base", seed=11)
    large = write_dataset(tmp / "2n", 2 * n, "base", seed=11)
    samples = list(iter_samples(n, "base", seed=11))

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())
    res: dict = {"machine": f"{os.cpu_count()} cores, {cpu}",
                 "rows": n, "batch": a.batch}
    res["bare_engine_rows_per_s"] = bare_engine(model, samples, a.batch)
    res["hf_loop_rows_per_s"] = hf_loop(model, samples[: a.loop_rows])
    for actors in (1, 2):
        t1 = job_seconds(small, tmp / f"o1-{actors}", actors, a.batch)
        t2 = job_seconds(large, tmp / f"o2-{actors}", actors, a.batch)
        res[f"job_{actors}_actor_seconds_N"] = t1
        res[f"job_{actors}_actor_seconds_2N"] = t2
        res[f"job_{actors}_actor_marginal_rows_per_s"] = n / max(1e-9, t2 - t1)
        res[f"job_{actors}_actor_startup_s"] = t1 - n / res[f"job_{actors}_actor_marginal_rows_per_s"]
    j = res["job_1_actor_marginal_rows_per_s"]
    res["job_over_bare_engine"] = j / res["bare_engine_rows_per_s"]
    res["job_over_hf_loop"] = j / res["hf_loop_rows_per_s"]
    res["two_actors_over_one"] = res["job_2_actor_marginal_rows_per_s"] / j
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
