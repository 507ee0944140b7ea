"""Benchmark of the retrain worker: QLoRA (nf4 base) vs plain LoRA, and 2 workers vs 1.

All in one run, on the same reviewed items (``--items`` single-object shifted-domain labels,
seed 11), through `train.retrain.fit` (Ray Train, ``cpus_per_worker=1`` so that two workers
fit on two cores):

* LoRA, 1 worker, batch 8 (the baseline);
* QLoRA (``quantize=nf4``), 1 worker, batch 8: same steps, same samples;
* LoRA, 2 workers (gloo), batch 4 each: the same global batch, steps and samples.

``--repeats`` runs the LoRA/QLoRA pair that many times (for the spread). Each adapter is then
measured through vLLM (Acc@0.5 on ``--n-eval`` single-object shifted images, seed 0), beside
the base model. Peak memory is the rank-0 worker process's peak RSS (``ru_maxrss``); samples/s
is the worker's own loop rate (Ray start-up and model loading excluded).

Run::

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_qlora.py --out bench/qlora.json
        # three trainings, about 4-5 minutes on 2 cores; --repeats 2 (five) took 7
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=64, help="Reviewed training items.")
    ap.add_argument("--epochs", type=float, default=3.0, help="Passes over the items.")
    ap.add_argument("--repeats", type=int, default=1, help="Runs of the LoRA/QLoRA pair.")
    ap.add_argument("--n-eval", type=int, default=64, help="Held-out images for Acc@0.5.")
    ap.add_argument("--out", default="bench/qlora.json")
    args = ap.parse_args()

    from grounding.engines import EngineConfig, load_engine
    from grounding.paths import DEFAULT_MODEL
    from grounding.store import ReviewStore
    from grounding.synth import SynthConfig, write_dataset
    from pipelines.review import ImportConfig, import_labels
    from train.evaluate import SynthEvalConfig, evaluate_synthetic
    from train.retrain import RetrainConfig, fit

    tmp = Path(tempfile.mkdtemp(prefix="gl-bench-qlora-"))
    single = SynthConfig(min_objects=1, max_objects=1)
    data = write_dataset(tmp / "labels", args.items, "shifted", seed=11, cfg=single)
    store = str(tmp / "store")
    import_labels(ImportConfig(input=str(data), from_fmt="seed", store=store, reviewer="bench"))
    items = ReviewStore(store).labels(1)
    base = {"store": store, "registry": str(tmp / "reg"), "storage_path": str(tmp / "ray"),
            "epochs": args.epochs, "cpus_per_worker": 1, "max_minutes": 30,
            "checkpoint_every_s": 3600}
    setups = {"lora": {"quantize": "none", "batch_size": 8},
              "qlora": {"quantize": "nf4", "batch_size": 8},
              "lora-2-workers": {"quantize": "none", "batch_size": 4, "num_workers": 2}}
    plan = [s for _ in range(args.repeats) for s in ("lora", "qlora")] + ["lora-2-workers"]
    runs = []
    t_all = time.time()
    for i, name in enumerate(plan):
        t0 = time.time()
        adapter, m = fit(RetrainConfig(**base, **setups[name]), items, f"bench-{i}-{name}")
        runs.append({"setup": name, "adapter": adapter, "wall_s": round(time.time() - t0, 1),
                     **{k: m.get(k) for k in ("samples_per_s", "worker_peak_rss_mb", "step",
                                              "total_steps", "loss", "first_loss",
                                              "quantization", "quantization_reason",
                                              "linear4bit_layers", "world_size", "train_s")}})
        print(json.dumps(runs[-1]), flush=True)
    engine = load_engine(EngineConfig(model=str(DEFAULT_MODEL), engine="vllm"))
    ev = SynthEvalConfig(domain="shifted", n=args.n_eval)
    acc_base = evaluate_synthetic(ev, engine, single)["acc@0.5"]
    for r in runs:
        r["acc@0.5"] = evaluate_synthetic(ev.model_copy(update={"adapter": r["adapter"]}),
                                          engine, single)["acc@0.5"]
    engine.close()

    def ratios(setup: str, key: str) -> list[float]:
        # each run against the LoRA baseline of its own pair (the 2-worker run: the first)
        out = []
        for k, r in enumerate(runs):
            if r["setup"] == setup:
                ref = runs[2 * (k // 2)] if setup == "qlora" else runs[0]
                out.append(round(r[key] / ref[key], 3))
        return out

    summary = {
        "qlora_vs_lora_samples_per_s": ratios("qlora", "samples_per_s"),
        "qlora_vs_lora_peak_rss": ratios("qlora", "worker_peak_rss_mb"),
        "two_vs_one_worker_samples_per_s": ratios("lora-2-workers", "samples_per_s"),
        "acc@0.5_base": acc_base,
        "acc@0.5": {s: [r["acc@0.5"] for r in runs if r["setup"] == s] for s in setups},
        "final_loss": {s: [round(r["loss"], 3) for r in runs if r["setup"] == s] for s in setups},
        "spread_samples_per_s": {s: [r["samples_per_s"] for r in runs if r["setup"] == s]
                                 for s in setups},
    }
    if args.repeats > 1:
        summary["qlora_vs_lora_samples_per_s_median"] = statistics.median(
            summary["qlora_vs_lora_samples_per_s"])
    out = {"args": vars(args), "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                           "processor": platform.processor()},
           "total_s": round(time.time() - t_all, 1), "summary": summary, "runs": runs}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
