"""Does adjudication pay off in the model? One retrain on reviewers' noisy labels as the store
used to resolve them (the latest decision wins), one on the same reviews with disagreements
adjudicated, each measured on the untouched shifted test set (issue 33).

    OMP_NUM_THREADS=2 PYTHONPATH=. .venv/bin/python bench/bench_reviewers_retrain.py \\
        --labels 500 --single --out bench/reviewers-retrain.json

The world: ``--labels`` shifted-domain images (seed 11; single-object with ``--single``), their
true boxes from the generator. The model's prediction is right (the true box moved by
N(0, 1 px)) with probability 0.6, else a random box. Three reviewers of `bench_reviewers`'
known noise (alice: 1 px jitter, 2 % wrong decisions; bob 2 px, 5 %; carol 12 px, 30 %) each
decide every item, in a random order. Two stores get those reviews:

- ``latest_wins``: each item's last decision only: the label the store trained on before
  issue 33, whoever made it;
- ``adjudicated``: every decision, and for each item the store holds back as disagreeing
  (`ReviewStore.unresolved`) an adjudication by a careful lead (the true box moved by
  N(0, 1 px); an accept where the model's box was right).

Each store goes through one `retrain` with the recipe's defaults (``--minutes`` cap), then the
base model and each adapter are measured through vLLM on 200 images of the shifted test set
(seed 0), in this same run. The training labels' precision (share whose box is the true box at
IoU >= 0.5) is reported for both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

from bench_reviewers import REVIEWERS, decide  # the same reviewers, deciding the same way


def _rand_box(rnd, w, h):
    bw, bh = rnd.uniform(0.1, 0.4) * w, rnd.uniform(0.1, 0.4) * h
    x, y = rnd.uniform(0, w - bw), rnd.uniform(0, h - bh)
    return [x, y, x + bw, y + bh]


def _jitter(b, sigma, rnd, w, h):
    x1, y1, x2, y2 = (c + rnd.gauss(0, sigma) for c in b)
    x1, x2 = sorted((min(max(x1, 0.0), w), min(max(x2, 0.0), w)))
    y1, y2 = sorted((min(max(y1, 0.0), h), min(max(y2, 0.0), h)))
    if x2 - x1 < 1 or y2 - y1 < 1:  # a degenerate drawing: the person redraws it
        return list(b)
    return [x1, y1, x2, y2]


def reviews(items: list[dict], seed: int) -> tuple[list[dict], dict]:
    """Every reviewer's decision on every item (random order per item), and the truth."""
    from grounding.agreement import box_iou
    from grounding.store import decision_record

    rnd = random.Random(seed)
    records, truth = [], {}
    for it in items:
        w, h = it["width"], it["height"]
        (true,) = it["boxes"]
        pred = _jitter(true, 1.0, rnd, w, h) if rnd.random() < 0.6 else _rand_box(rnd, w, h)
        right = box_iou(pred, true) >= 0.5
        truth[it["item_id"]] = {"item": it, "pred": pred, "right": right}
        order = list(REVIEWERS.items())
        rnd.shuffle(order)
        for k, (who, (sigma, e)) in enumerate(order):
            d, boxes = decide(right, pred, lambda: _jitter(true, sigma, rnd, w, h), e, rnd)  # noqa: B023
            records.append(decision_record(
                dict(it, boxes=boxes), d, reviewer=who, source="bench",
                predicted={"boxes": [pred], "score": 0.5},
                reviewed_at=f"2026-12-07T10:00:0{k}+00:00",
                guideline="groundlabel-default@1"))
    return records, truth


def adjudications(unresolved: list[dict], truth: dict, seed: int) -> list[dict]:
    from grounding.store import decision_record

    rnd = random.Random(seed + 1)
    out = []
    for item_id in sorted({r["item_id"] for r in unresolved}):  # the queue has each person's row
        t = truth[item_id]
        it = t["item"]
        if t["right"]:
            d, boxes = "accept", [t["pred"]]
        else:
            d, boxes = "correct", [_jitter(it["boxes"][0], 1.0, rnd, it["width"], it["height"])]
        out.append(decision_record(dict(it, boxes=boxes), d, reviewer="lead", source="bench",
                                   predicted={"boxes": [t["pred"]], "score": 0.5},
                                   role="adjudication", guideline="groundlabel-default@1"))
    return out


def precision(labels: list[dict], truth: dict) -> float:
    from grounding.agreement import box_iou

    ok = [len(r["boxes"]) == 1 and box_iou(r["boxes"][0], truth[r["item_id"]]["item"]["boxes"][0])
          >= 0.5 for r in labels]
    return round(sum(ok) / len(ok), 4) if ok else float("nan")


def paired(a: list[bool] | None, b: list[bool] | None) -> dict | None:
    """Exact sign test on the test images the two models answer differently: one-sided p that
    ``a`` is no better than ``b`` (McNemar's exact form)."""
    if a is None or b is None:
        return None
    from scipy.stats import binomtest

    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    p = binomtest(only_a, only_a + only_b, 0.5, alternative="greater").pvalue if only_a + only_b else 1.0
    return {"only_adjudicated_right": only_a, "only_latest_wins_right": only_b,
            "one_sided_p": round(p, 4)}


def _run_record(args) -> dict:
    """The command line that made a result, and the machine."""
    return {"command": "bench/bench_reviewers_retrain.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}


def remeasure(args) -> None:
    """The adapters of an earlier run, measured again (e.g. on a larger test set): the same
    paired comparison, no training."""
    from grounding.registry import AdapterRegistry
    from grounding.synth import SynthConfig
    from train.evaluate import SynthEvalConfig, evaluate_synthetic

    tmp = Path(args.reuse)
    sc = SynthConfig(min_objects=1, max_objects=1) if args.single else None
    evals, hits = {}, {}
    for name in ("base_model", "latest_wins", "adjudicated"):
        ad = None
        if name != "base_model":
            reg = AdapterRegistry(str(tmp / f"registry-{name}"))
            ad = reg.download(reg.production(), tmp / f"adapter-{name}")
        m = evaluate_synthetic(SynthEvalConfig(domain="shifted", n=args.n_eval, adapter=ad),
                               synth=sc, hits=True)
        evals[name], hits[name] = m["acc@0.5"], m["hits"]
        print(name, evals[name], flush=True)
    out = {**_run_record(args),
           "test_acc@0.5": evals,
           "paired": paired(hits["adjudicated"], hits["latest_wins"])}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--labels", type=int, default=500, help="Images reviewed.")
    ap.add_argument("--minutes", type=float, default=10.0, help="Training time cap per retrain.")
    ap.add_argument("--n-eval", type=int, default=200, help="Test images (shifted, seed 0).")
    ap.add_argument("--single", action="store_true", help="Single-object shifted images.")
    ap.add_argument("--seed", type=int, default=0, help="Seed of the reviewers' noise.")
    ap.add_argument("--out", default="bench/reviewers-retrain.json")
    ap.add_argument("--reuse", metavar="DIR", help="Only measure: the adapters an earlier run "
                    "left in DIR (its working folder, printed as 'work'), on --n-eval images.")
    args = ap.parse_args()
    if args.reuse:
        return remeasure(args)

    from grounding.convert import read_labels
    from grounding.registry import AdapterRegistry
    from grounding.store import ReviewStore
    from grounding.synth import SynthConfig, write_dataset
    from train.evaluate import SynthEvalConfig, evaluate_synthetic
    from train.retrain import RetrainConfig, retrain

    tmp = Path(tempfile.mkdtemp(prefix="gl-bench-reviewers-retrain-"))
    print("work", tmp, flush=True)
    sc = SynthConfig(min_objects=1, max_objects=1) if args.single else None
    data = write_dataset(tmp / "labels", args.labels, "shifted", seed=11, cfg=sc)
    items = read_labels(str(data), "seed").items
    from PIL import Image

    for it in items:  # seed JSONL leaves the size out: the image has it
        with Image.open(it["image"]) as im:
            it["width"], it["height"] = im.size
    if any(len(it["boxes"]) != 1 for it in items):
        raise SystemExit("every item must have one true box")
    records, truth = reviews(items, args.seed)

    arms = {}
    last = {}
    for r in records:
        last[r["item_id"]] = r
    noisy = ReviewStore(str(tmp / "latest_wins"))
    noisy.append(list(last.values()), source="bench")
    adj = ReviewStore(str(tmp / "adjudicated"))
    adj.append(records, source="bench")
    queue = adj.unresolved().to_pylist()
    adj.append(adjudications(queue, truth, args.seed), source="bench-adjudication")
    assert not len(adj.unresolved())

    base = evaluate_synthetic(SynthEvalConfig(domain="shifted", n=args.n_eval), synth=sc,
                              hits=True)
    evals, hits = {"base_model": base["acc@0.5"]}, {"base_model": base["hits"]}
    for name, st in (("latest_wins", noisy), ("adjudicated", adj)):
        labels = st.labels()
        cfg = RetrainConfig(store=st.uri, registry=str(tmp / f"registry-{name}"),
                            storage_path=str(tmp / f"ray-train-{name}"),
                            max_minutes=args.minutes)
        t0 = time.time()
        res = retrain(cfg)
        wall = time.time() - t0
        acc = None
        if res.get("adapter"):
            ad = AdapterRegistry(cfg.registry).download(res["adapter"], tmp / f"adapter-{name}")
            m = evaluate_synthetic(SynthEvalConfig(domain="shifted", n=args.n_eval, adapter=ad),
                                   synth=sc, hits=True)
            acc, hits[name] = m["acc@0.5"], m["hits"]
        arms[name] = {"train_labels": len(labels), "label_precision": precision(labels, truth),
                      "train_items": res.get("train_items"),
                      "heldout_items": res.get("heldout_items"),
                      "decision": res.get("decision"), "reasons": res.get("reasons"),
                      "retrain_wall_s": round(wall, 1), "test_acc@0.5": acc}
        print(name, json.dumps(arms[name]), flush=True)
    out = {**_run_record(args),
           "reviewers": {k: {"jitter_px": s, "wrong_decision_rate": e}
                         for k, (s, e) in REVIEWERS.items()},
           "items": len(items), "model_right": sum(t["right"] for t in truth.values()),
           "adjudicated_items": len({r["item_id"] for r in queue}), "test_acc@0.5": evals, "arms": arms,
           "paired": paired(hits.get("adjudicated"), hits.get("latest_wins"))}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
