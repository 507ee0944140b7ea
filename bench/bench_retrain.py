"""Benchmark of one retraining on the shifted synthetic domain: lift, time and memory.

Reviewed labels: ``--labels`` shifted-domain samples (seed 11) imported into a fresh store,
after ``--earlier`` base-domain labels (seed 13, an earlier store version: what the team
reviewed before the shift, trained along so the base domain is kept). ``retrain`` holds out
20 % of the images (`train.gate.split`) and trains on the rest, through Ray Train, with the
recipe's defaults and a ``--minutes`` cap, then gates through vLLM (paired test; with
``--regression N`` also the base-domain non-inferiority check on N base images, seed 12, within
the gate's ``max_forgetting``). Afterwards the base model and the new adapter are both measured
on the untouched test sets (`train.evaluate.TEST_SEED`, ``--n-eval`` images per domain) through
vLLM, in this same run.

Run::

    .venv/bin/python bench/bench_retrain.py --labels 625 --minutes 10 --out bench/retrain.json
    .venv/bin/python bench/bench_retrain.py --labels 500 --earlier 200 --regression 200 \
        --out bench/retrain-loop.json     # issue 32's loop: defaults, QLoRA, the whole gate
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--labels", type=int, default=625, help="Reviewed labels in the store.")
    ap.add_argument("--minutes", type=float, default=10.0, help="Training time cap.")
    ap.add_argument("--n-eval", type=int, default=200, help="Held-out images per domain.")
    ap.add_argument("--earlier", type=int, default=0, help="Base-domain labels reviewed "
                    "before the shifted ones (an earlier store version).")
    ap.add_argument("--regression", type=int, default=0, help="Base-domain regression set "
                    "size the gate checks forgetting on (0: none).")
    ap.add_argument("--single", action="store_true",
                    help="Single-object shifted images (labels and evaluation).")
    ap.add_argument("--model", default=None, help="Base checkpoint (default: the bundled one).")
    ap.add_argument("--out", default="bench/retrain.json")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="Recipe overrides, e.g. rank=8 lr=0.001 freeze_vision=false.")
    args = ap.parse_args()

    from grounding.synth import write_dataset
    from pipelines.review import ImportConfig, import_labels
    from train.evaluate import SynthEvalConfig, evaluate_synthetic
    from train.retrain import RetrainConfig, retrain

    tmp = Path(tempfile.mkdtemp(prefix="gl-bench-retrain-"))
    from grounding.synth import SynthConfig

    sc = SynthConfig(min_objects=1, max_objects=1) if args.single else None
    sets = ([("earlier", args.earlier, "base", 13, None)] if args.earlier else []) + [
        ("labels", args.labels, "shifted", 11, sc)]
    for name, n, domain, seed, synth in sets:   # one store version each, earliest first
        data = write_dataset(tmp / name, n, domain, seed=seed, cfg=synth)
        import_labels(ImportConfig(input=str(data), from_fmt="seed", store=str(tmp / "store"),
                                   reviewer="bench"))
    overrides = {}
    if args.regression:
        overrides["regression_set"] = str(write_dataset(tmp / "regression", args.regression,
                                                        "base", seed=12))
    for kv in args.set:
        k, v = kv.split("=", 1)
        overrides[k] = {"true": True, "false": False}.get(v.lower(), v)
    from grounding.engines.base import EngineConfig

    engine = EngineConfig(**({"model": args.model} if args.model else {}))
    cfg = RetrainConfig(store=str(tmp / "store"), registry=str(tmp / "registry"), inference=engine,
                        storage_path=str(tmp / "ray-train"), max_minutes=args.minutes,
                        **overrides)
    t0 = time.time()
    res = retrain(cfg)
    wall = time.time() - t0
    from grounding.registry import AdapterRegistry

    # The registry keeps an adapter's files under a content-addressed path: ask it for them.
    adapter = AdapterRegistry(cfg.registry).download(res["adapter"], tmp / "adapter-cache")
    from grounding.engines import load_engine

    evals, vllm = {}, load_engine(engine)   # one engine for all six measurements
    for dom in ("shifted", "base", "robust"):  # "shifted" follows --single
        for name, ad in (("base_model", None), ("adapter", adapter)):
            m = evaluate_synthetic(SynthEvalConfig(inference=engine, domain=dom, n=args.n_eval,
                                                   adapter=ad),
                                   engine=vllm, synth=sc if dom == "shifted" else None)
            evals[f"{dom}/{name}"] = m["acc@0.5"]
    vllm.close()
    out = {
        "command": "bench/bench_retrain.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "set")
        + (" --set " + " ".join(args.set) if args.set else ""),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "recipe": res and cfg.model_dump(include={"rank", "alpha", "lr", "epochs", "batch_size",
                                                 "target_modules", "freeze_vision",
                                                 "mask_label_text", "max_minutes"}),
        "train_items": res["train_items"], "heldout_items": res["heldout_items"],
        "decision": res["decision"], "reasons": res["reasons"], "gate_summary":
        res["gate"]["summary"], "new_domain": res["new_domain"], "old_domain": res["old_domain"],
        "regression": res["regression"], "replay": res["replay"], "gate": res["gate"],
        "train_metrics": res["train_metrics"],
        "retrain_wall_s": round(wall, 1),
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "heldout_synthetic_acc@0.5": evals,
    }
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
