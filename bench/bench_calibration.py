"""What review routing saves, measured: the share of a job's rows auto-accepted at a precision
target, and the realised precision of those rows against the truth, for the calibrated score
with a lower confidence bound (what ``review export --auto-accept-precision`` does), and for
baselines: the raw score with the same bound, each score taken at face value (accept when it
is >= the target), and a random choice of the same size as ours.

Synthetic jobs with true boxes: ``--n`` images per domain (base and shifted) are labeled once
through vLLM (the bundled model, constrained decoding, as label jobs do). A row is right when
its first box has IoU >= 0.5 with the true box (single-object sets, so this is the
`grounding.calibration` rule). Then, per seed, the rows are shuffled and split: ``--reviews``
of them play the reviewed rows (their truth is what people would have said), the rest are the
job being routed. Realised precision is counted on the job's rows only.

Run::

    .venv/bin/python bench/bench_calibration.py --n 2000 --reviews 1000 --seeds 10 \\
        --out bench/calibration.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

TARGETS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
METHODS = ("calibrated+bound", "raw+bound", "calibrated (face value)", "raw (face value)",
           "random (same size)")


def label(model: str, domain: str, n: int, batch: int) -> tuple[list[dict], float]:
    from grounding.boxes import Box
    from grounding.engines import EngineConfig, EngineInput, load_engine
    from grounding.engines.grounder import Grounder
    from grounding.synth import iter_samples

    global _ENGINE
    if _ENGINE is None:
        _ENGINE = Grounder(load_engine(EngineConfig(model=model)))
    g = _ENGINE
    samples = list(iter_samples(n, domain, seed=7000))
    t0 = time.perf_counter()
    rows = []
    for i in range(0, n, batch):
        part = samples[i:i + batch]
        gens = g.engine.generate([EngineInput(g.prompt(s.text), s.image, None, g.grammar)
                                  for s in part])
        for j, (gen, s) in enumerate(zip(gens, part, strict=True)):
            r = g.finish(gen, s.size)
            hit = bool(r.boxes) and r.boxes[0].iou(Box.from_list(s.bbox)) >= 0.5
            rows.append({"item_id": f"{domain}:{i + j}", "score": r.score, "hit": hit})
    return rows, n / (time.perf_counter() - t0)


_ENGINE = None


def route_once(rows: list[dict], reviews: int, seed: int) -> dict:
    """One split of ``rows`` into reviewed and job rows; every method at every target."""
    import numpy as np

    from grounding.calibration import Calibration, Key, Outcome, choose_threshold, fit

    key = Key(model="bench", prompt_version="bench")
    rng = random.Random(seed)
    rows = [r for r in rows if r["score"] is not None]
    rng.shuffle(rows)
    reviewed, job = rows[:reviews], rows[reviews:]
    cal = fit([Outcome(item_id=f"{seed}:{r['item_id']}", key=key, score=r["score"], hit=r["hit"])
               for r in reviewed])
    # the raw score under the same bound: an identity "calibration" whose held-out part is
    # every reviewed row (nothing needs fitting)
    ident = Calibration(id="identity", key=key, method="isotonic", x=[0.0, 1.0], y=[0.0, 1.0],
                        n_fit=0, holdout_scores=[r["score"] for r in reviewed],
                        holdout_hits=[r["hit"] for r in reviewed], fitted_at="-")
    s = np.array([r["score"] for r in job])
    hit = np.array([r["hit"] for r in job])
    p = cal(s)
    q = cal.quality()
    out: dict = {"ece_raw": q["ece_raw"], "ece_calibrated": q["ece_calibrated"], "targets": {}}
    for t in TARGETS:
        thr_c = choose_threshold(cal, t)
        thr_r = choose_threshold(ident, t, holdout=1.0)
        masks = {
            "calibrated+bound": (p >= thr_c.threshold - 1e-12) if thr_c.threshold is not None
            else np.zeros(len(s), bool),
            "raw+bound": (s >= thr_r.threshold - 1e-12) if thr_r.threshold is not None
            else np.zeros(len(s), bool),
            "calibrated (face value)": p >= t,
            "raw (face value)": s >= t,
        }
        k = int(masks["calibrated+bound"].sum())
        rnd = np.zeros(len(s), bool)
        rnd[np.random.default_rng(seed).choice(len(s), k, replace=False)] = True
        masks["random (same size)"] = rnd
        out["targets"][str(t)] = {
            m: {"share": float(mask.mean()), "n": int(mask.sum()),
                "precision": float(hit[mask].mean()) if mask.any() else None}
            for m, mask in masks.items()}
    out["job_rows"], out["job_hit_rate"] = len(job), float(hit.mean())
    return out


def summarise(runs: list[dict]) -> dict:
    out = {}
    for t in TARGETS:
        out[str(t)] = {}
        for m in METHODS:
            shares = [r["targets"][str(t)][m]["share"] for r in runs]
            precs = [r["targets"][str(t)][m]["precision"] for r in runs]
            got = [x for x in precs if x is not None]
            out[str(t)][m] = {
                "share_median": statistics.median(shares), "share_min": min(shares),
                "share_max": max(shares),
                "precision_median": statistics.median(got) if got else None,
                "precision_min": min(got) if got else None,
                "seeds_with_rows": len(got),
                "seeds_below_target": sum(x < t for x in got)}
    return out


def main() -> None:
    from grounding.engines import EngineConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=EngineConfig().model)
    ap.add_argument("--n", type=int, default=2000, help="Images labeled per domain.")
    ap.add_argument("--reviews", type=int, default=1000, help="Of which play reviewed rows.")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default="bench/calibration.json")
    ap.add_argument("--rows", help="Reuse the labeled rows of an earlier --out (routing only).")
    a = ap.parse_args()
    earlier = json.load(open(a.rows))["domains"] if a.rows else None
    res: dict = {"command": "bench/bench_calibration.py " + " ".join(
        f"--{k} {v}" for k, v in vars(a).items() if k != "model"), "model": a.model,
        "targets": TARGETS, "domains": {}}
    for domain in ("base", "shifted"):
        if earlier:
            rows, rps = earlier[domain]["labeled"], earlier[domain]["rows_per_s"]
        else:
            rows, rps = label(a.model, domain, a.n, a.batch)
        runs = [route_once(rows, a.reviews, seed) for seed in range(a.seeds)]
        res["domains"][domain] = {
            "rows": len(rows), "rows_per_s": round(rps, 1),
            "hit_rate": sum(r["hit"] for r in rows) / len(rows),
            "ece_raw": [round(r["ece_raw"], 4) for r in runs],
            "ece_calibrated": [round(r["ece_calibrated"], 4) for r in runs],
            "summary": summarise(runs), "runs": runs, "labeled": rows}
        print(f"[{domain}] {len(rows)} rows, right {res['domains'][domain]['hit_rate']:.3f}",
              flush=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    for domain, d in res["domains"].items():
        print(f"\n{domain}: right {d['hit_rate']:.3f}; ECE raw {d['ece_raw']} -> calibrated "
              f"{d['ece_calibrated']}")
        print("| target | method | auto-accepted share (median, range) | realised precision "
              "(median, min) | seeds below target |")
        print("|---|---|---|---|---|")
        for t, per in d["summary"].items():
            for m, v in per.items():
                prec = ("-" if v["precision_median"] is None else
                        f"{v['precision_median']:.3f} ({v['precision_min']:.3f})")
                print(f"| {t} | {m} | {v['share_median']:.3f} ({v['share_min']:.3f}-"
                      f"{v['share_max']:.3f}) | {prec} | {v['seeds_below_target']}/"
                      f"{v['seeds_with_rows']} |")


if __name__ == "__main__":
    main()
