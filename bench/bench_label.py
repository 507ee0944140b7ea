"""Benchmark of the bulk labeling job against the engine's best, all measured in the same run.

* engine best: vLLM's own ``LLM.generate`` with ALL rows in one call, images decoded and resized
  in memory beforehand: the most one engine does on these rows;
* per-row loop: transformers ``generate``, one row at a time (what a user writes first);
* full job: ``groundlabel label`` (Ray Data + vLLM actor + Parquet) from image files on disk.

The job's throughput is *marginal*: N / (T(2N) - T(N)) over two runs, so start-up (Ray, the
actor's vLLM import and engine) cancels out; N is chosen so that the difference is >= 30 s.
Every figure is repeated (``--repeats``, default 3): the median and the spread (min-max) are
reported. Each job also reports its start-up breakdown (``_summary.json``) and peak memory
(driver and inference actor RSS, sampled with psutil every 0.2 s; the actor's USS every 3 s;
a memory timeline every 15 s: see `PeakMemory`).

Run::

    .venv/bin/python bench/bench_label.py --rows 2048 --out bench/label.json
    .venv/bin/python bench/bench_label.py --grid --rows 1024 --out bench/label-grid.json
    .venv/bin/python bench/bench_label.py --scale 1000 10000 100000 --out bench/label-scale.json
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
import threading
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


def in_subprocess(what: str, rows: int, repeats: int) -> list[float]:
    """Run ``engine_best`` or ``hf_loop`` in a fresh process, as the job runs in one: a bench
    process that already held an engine and a model made the jobs after it 15-40 % slower."""
    cmd = [sys.executable, __file__, "--only", what, "--rows", str(rows), "--repeats",
           str(repeats)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode:
        raise RuntimeError(f"{cmd} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def engine_best(model: str, samples, repeats: int) -> list[float]:
    """rows/s of vLLM's ``LLM.generate`` on all rows at once, per repeat (one engine)."""
    from grounding.engines import EngineConfig, load_engine
    from grounding.engines.grounder import Grounder, GroundingRequest

    eng = load_engine(EngineConfig(model=model, engine="vllm"))
    g = Grounder(eng)
    inputs = [g.prepare(GroundingRequest(im, s.text, None))
              for s, im in zip(samples, _images(samples, model), strict=True)]
    prompts = [{"prompt": x.prompt, "multi_modal_data": {"image": x.image}} for x in inputs]
    params = [eng._params(x.grammar) for x in inputs]
    eng.llm.generate(prompts[:16], params[:16], use_tqdm=False)  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        eng.llm.generate(prompts, params, use_tqdm=False)
        rates.append(len(prompts) / (time.perf_counter() - t0))
    eng.close()
    return rates


def hf_loop(model: str, samples, repeats: int) -> list[float]:
    """rows/s of a per-row transformers loop (decode, prompt, generate, parse), per repeat."""
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
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for s in samples:
            one(s)
        rates.append(len(samples) / (time.perf_counter() - t0))
    return rates


class PeakMemory:
    """Peak memory of a process (the driver) and of its inference actor, sampled every 0.2 s.

    RSS counts every page a process has mapped, including the object store's shared pages
    that Ray Data hands the actor its blocks in; USS (pages only this process holds, sampled
    every 3 s because it reads /proc/PID/smaps) is the actor's own memory. ``timeline`` keeps a
    sample every 15 s, so a curve shows whether memory levels off or keeps growing.
    """

    def __init__(self, pid: int):
        import psutil

        self.proc = psutil.Process(pid)
        self.driver = self.actor = self.actor_uss = 0
        self.timeline: list[dict] = []
        self._t0 = time.perf_counter()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        import psutil

        tick = 0
        while not self._stop.is_set():
            try:
                rss = self.proc.memory_info().rss
                self.driver = max(self.driver, rss)
                a_rss = a_uss = 0
                for c in self.proc.children(recursive=True):
                    try:
                        if "Infer" in " ".join(c.cmdline()):  # ray::MapWorker(MapBatches(Infer))
                            a_rss = c.memory_info().rss
                            if tick % 15 == 0:
                                a_uss = c.memory_full_info().uss
                    except psutil.Error:
                        pass
            except psutil.Error:
                return
            self.actor = max(self.actor, a_rss)
            self.actor_uss = max(self.actor_uss, a_uss)
            if tick % 75 == 0 and a_uss:
                self.timeline.append({"t_s": round(time.perf_counter() - self._t0),
                                      "driver_mb": round(rss / 2**20),
                                      "actor_rss_mb": round(a_rss / 2**20),
                                      "actor_uss_mb": round(a_uss / 2**20)})
            tick += 1
            self._stop.wait(0.2)

    def stop(self) -> dict:
        self._stop.set()
        self._t.join()
        return {"driver_peak_mb": round(self.driver / 2**20),
                "actor_peak_mb": round(self.actor / 2**20),
                "actor_uss_peak_mb": round(self.actor_uss / 2**20),
                "memory_timeline": self.timeline}


def job(data: Path, out: Path, extra: list[str] | None = None) -> dict:
    """One ``groundlabel label`` run as a user starts it: wall seconds, peak memory, summary."""
    cmd = [sys.executable, "-m", "groundlabel", "label", "--input", str(data), "--output",
           str(out), "--no-progress", *(extra or [])]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mem = PeakMemory(p.pid)
    stdout, stderr = p.communicate()
    wall = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(f"{cmd} failed:\n{stderr[-3000:]}")
    summary = json.loads((out / "_summary.json").read_text())
    tl = summary["startup"]["timeline_s"]
    return {"seconds": wall, **mem.stop(), "rows": summary["rows"],
            "to_first_part_s": summary["startup"]["to_first_part_s"],
            "startup_phases_s": summary["startup"]["phases_s"],
            # rows over the time the engine was labeling (engine ready -> last part written)
            "engine_phase_rows_per_s": summary["rows"] / (tl["written"] - tl["engine_ready"])}


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())
    return f"{os.cpu_count()} cores, {cpu}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048, help="N (the job also runs 2N)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loop-rows", type=int, default=64, help="rows for the per-row HF loop")
    ap.add_argument("--grid", action="store_true", help="job settings grid (batch size x "
                    "batches in flight) on N rows instead of the comparison")
    ap.add_argument("--scale", type=int, nargs="*", help="rows per run for a scale curve "
                    "(one job each) instead of the comparison")
    ap.add_argument("--only", choices=["engine-best", "hf-loop"], help=argparse.SUPPRESS)
    ap.add_argument("--out", default="bench/label.json")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from grounding.paths import DEFAULT_MODEL
    from grounding.synth import iter_samples, write_dataset

    model = str(DEFAULT_MODEL)
    if a.only:  # one baseline, in this (fresh) process: rows/s per repeat on stdout
        samples = list(iter_samples(a.rows, "base", seed=11))
        fn = engine_best if a.only == "engine-best" else hf_loop
        print(json.dumps(fn(model, samples, a.repeats)))
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-label-"))
    n = a.rows
    res: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d"),
                 "command": " ".join(["python", *sys.argv])}

    def save() -> None:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2))

    if a.scale:
        res["scale"] = []
        for rows in a.scale:
            data = write_dataset(tmp / f"s{rows}", rows, "base", seed=11)
            r = job(data, tmp / f"o-s{rows}")
            r["rows_per_s"] = rows / r["seconds"]
            res["scale"].append(r)
            print(json.dumps(r), flush=True)
            save()
        return
    data = write_dataset(tmp / "n", n, "base", seed=11)
    if a.grid:
        res["grid"] = []
        for bs, k in ((16, 1), (16, 4), (16, 8), (16, 16), (32, 8), (64, 4)):
            r = job(data, tmp / f"o-{bs}-{k}", ["--batch-size", str(bs),
                                                "--batches-in-flight", str(k)])
            r.update(batch_size=bs, batches_in_flight=k)
            res["grid"].append(r)
            print(json.dumps(r), flush=True)
            save()
        return
    large = write_dataset(tmp / "2n", 2 * n, "base", seed=11)
    res["rows"] = n
    res["hf_loop_rows_per_s"] = spread(in_subprocess("hf-loop", a.loop_rows, a.repeats))
    save()
    # Each repeat measures the engine's best and the job back to back, each in a fresh
    # process, so that a drift in the machine's speed hits both sides of a ratio alike.
    runs = []
    for i in range(a.repeats):
        (best,) = in_subprocess("engine-best", n, 1)
        small, big = job(data, tmp / f"o1-{i}"), job(large, tmp / f"o2-{i}")
        marginal = n / (big["seconds"] - small["seconds"])
        runs.append({"engine_best_rows_per_s": best, "N": small, "2N": big,
                     "difference_s": big["seconds"] - small["seconds"],
                     "marginal_rows_per_s": marginal, "job_over_engine_best": marginal / best})
        print(json.dumps(runs[-1]), flush=True)
        res["runs"] = runs
        save()
    res["engine_best_rows_per_s"] = spread([r["engine_best_rows_per_s"] for r in runs])
    res["job_marginal_rows_per_s"] = spread([r["marginal_rows_per_s"] for r in runs])
    res["job_over_engine_best"] = spread([r["job_over_engine_best"] for r in runs])
    res["job_over_hf_loop"] = (res["job_marginal_rows_per_s"]["median"]
                               / res["hf_loop_rows_per_s"]["median"])
    res["to_first_part_s"] = spread([r["N"]["to_first_part_s"] for r in runs]
                                    + [r["2N"]["to_first_part_s"] for r in runs])
    save()
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
