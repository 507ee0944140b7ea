"""Benchmark of one retraining on the shifted synthetic domain: lift, time and memory.

Reviewed labels: ``--labels`` shifted-domain samples (seed 11) imported into a fresh store;
``retrain`` holds out 20 % of the images (`train.gate.split`) and trains on the rest, through
Ray Train, with the recipe's defaults and a ``--minutes`` cap, then gates through vLLM (paired
test; add a base-domain forgetting check with ``--set regression_set=FILE``). Afterwards the base
model and the new adapter are both measured on the standard held-out synthetic sets
(seed 0, 200 images per domain) through vLLM, in this same run.

Run::

    .venv/bin/python bench/bench_retrain.py --labels 625 --minutes 10 --out bench/retrain.json
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
    ap.add_argument("--single", action="store_true",
                    help="Single-object shifted images (labels and evaluation).")
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
    data = write_dataset(tmp / "labels", args.labels, "shifted", seed=11, cfg=sc)
    import_labels(ImportConfig(input=str(data), from_fmt="seed", store=str(tmp / "store"),
                               reviewer="bench"))
    overrides = {}
    for kv in args.set:
        k, v = kv.split("=", 1)
        overrides[k] = {"true": True, "false": False}.get(v.lower(), v)
    cfg = RetrainConfig(store=str(tmp / "store"), registry=str(tmp / "registry"),
                        storage_path=str(tmp / "ray-train"), max_minutes=args.minutes,
                        **overrides)
    t0 = time.time()
    res = retrain(cfg)
    wall = time.time() - t0
    from grounding.registry import AdapterRegistry

    # The registry keeps an adapter's files under a content-addressed path: ask it for them.
    adapter = AdapterRegistry(cfg.registry).download(res["adapter"], tmp / "adapter-cache")
    evals = {}
    for dom in ("shifted", "base"):  # "shifted" follows --single
        for name, ad in (("base_model", None), ("adapter", adapter)):
            m = evaluate_synthetic(SynthEvalConfig(domain=dom, n=args.n_eval, adapter=ad),
                                   synth=sc if dom == "shifted" else None)
            evals[f"{dom}/{name}"] = m["acc@0.5"]
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
