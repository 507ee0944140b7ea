"""What review routing saves, measured, before and after issue #29: the share of a job's rows
auto-accepted at a precision target, and how often the promise is broken: the job's own
realised precision below the target ("job below"), and the population precision of the
accepted score range below it ("population below"; the domain's rows stand for the
population, or the simulated truth).

Methods: **before** is `grounding/calibration.py` at ``--before`` (calibrated score, isotonic fit
on half the reviews split by item, Clopper-Pearson on the other half, walk started among the
held-out rows); **after** is the current code (raw score, every review, images as the unit,
betting test, walk on the job's score quantiles), with the default population promise and with
``--per-job``; face value accepts rows whose (calibrated or raw) score is >= the target.

Worlds: ``--domains`` (``base`` and ``shifted`` by default; ``robust`` too), ``--n`` synthetic
images per domain labeled once through vLLM (the bundled model, constrained decoding; a row is right when its first box has IoU >= 0.5 with
the true box; one expression per image); ``clustered``, simulated (5 expressions per image,
latent within-image correlation 0.5, P(right | s) = s**3, as in the tests). Per seed the images
are shuffled: ``--reviews`` rows' images play the reviewed ones, the rest is the job.

Run::

    .venv/bin/python bench/bench_calibration.py --rows bench/calibration.json --seeds 100 \
        --out bench/calibration-29.json    # routing only, on the rows labeled earlier
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

TARGETS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
METHODS = ("before: calibrated+bound", "after: raw+betting", "after: raw+betting --per-job",
           "calibrated (face value)", "raw (face value)")
BEFORE = "26a21f7"   # the commit before #29's routing: its grounding/calibration.py


def _before_module(ref: str):
    """grounding/calibration.py as it was at ``ref`` (git), loaded as a module of its own."""
    import subprocess
    import types

    src = subprocess.run(["git", "show", f"{ref}:grounding/calibration.py"], check=True,
                         capture_output=True, text=True).stdout
    mod = types.ModuleType("calibration_before")
    mod.__dict__["__name__"] = "calibration_before"
    import sys

    sys.modules["calibration_before"] = mod
    exec(compile(src, f"{ref}:grounding/calibration.py", "exec"), mod.__dict__)
    return mod


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


def clustered_world(n: int, seed: int, m: int = 5, rho: float = 0.5) -> list[dict]:
    """The simulated clustered world of `tests/review/test_calibration.py`: images of ``m``
    expressions, raw score s = U**0.3, P(right | s) = s**3, rows of one image tied by a
    Gaussian copula (latent correlation ``rho``). ``p`` is each row's true P(right)."""
    import numpy as np
    from scipy.stats import norm

    rng = np.random.default_rng(seed)
    k = n // m
    s = rng.random(k * m) ** 0.3
    z = (np.sqrt(rho) * np.repeat(rng.standard_normal(k), m)
         + np.sqrt(1 - rho) * rng.standard_normal(k * m))
    hit = z < norm.ppf(np.clip(s ** 3, 1e-12, 1 - 1e-12))
    return [{"item_id": f"w{seed}:{i}", "image": f"w{seed}/img{i // m}", "score": float(v),
             "hit": bool(h), "p": float(v) ** 3} for i, (v, h) in enumerate(zip(s, hit, strict=True))]


def route_once(rows: list[dict], reviews: int, seed: int, old, population=None) -> dict:
    """One split of ``rows`` into reviewed and job rows (by image); every method at every
    target. ``population``: rows standing for "rows drawn like the reviewed ones" (default:
    all of ``rows``); with a ``p`` field its mean is used (the simulated truth)."""
    import numpy as np

    from grounding import calibration as new

    rows = [r for r in rows if r["score"] is not None]
    images = sorted({r.get("image") or r["item_id"] for r in rows})
    random.Random(seed).shuffle(images)
    per = len(rows) / max(1, len(images))
    rev_imgs = set(images[:round(reviews / per)])
    reviewed = [r for r in rows if (r.get("image") or r["item_id"]) in rev_imgs]
    job = [r for r in rows if (r.get("image") or r["item_id"]) not in rev_imgs]
    pop = population if population is not None else rows
    ps = np.array([r["score"] for r in pop])
    ptruth = np.array([r.get("p", r["hit"]) for r in pop], float)
    okey, nkey = old.Key(model="bench", prompt_version="bench"), new.Key(model="bench",
                                                                          prompt_version="bench")
    cal_o = old.fit([old.Outcome(item_id=f"{seed}:{r['item_id']}", key=okey, score=r["score"],
                                 hit=r["hit"]) for r in reviewed])
    cal_n = new.fit([new.Outcome(item_id=f"{seed}:{r['item_id']}", key=nkey, score=r["score"],
                                 hit=r["hit"], unit=r.get("image")) for r in reviewed])
    s = np.array([r["score"] for r in job])
    hit = np.array([r["hit"] for r in job])
    units = [r.get("image") or r["item_id"] for r in job]
    grid = np.linspace(0, 1, 100_001)
    out: dict = {"targets": {}, "job_rows": len(job), "job_hit_rate": float(hit.mean())}
    for t in TARGETS:
        cuts = {}
        thr = old.choose_threshold(cal_o, t)
        if thr.threshold is not None:  # the calibrated threshold as a raw one (monotone)
            okg = cal_o(grid) >= thr.threshold - 1e-12
            cuts["before: calibrated+bound"] = float(grid[np.argmax(okg)]) if okg.any() else None
        for name, pj in (("after: raw+betting", False), ("after: raw+betting --per-job", True)):
            th = new.choose_threshold(cal_n, t, job_scores=s, job_units=units, per_job=pj)
            cuts[name] = th.threshold
        masks = {m: (s >= c - 1e-12) if c is not None else np.zeros(len(s), bool)
                 for m, c in cuts.items()}
        masks.setdefault("before: calibrated+bound", np.zeros(len(s), bool))
        masks["calibrated (face value)"] = cal_n(s) >= t
        masks["raw (face value)"] = s >= t
        res = {}
        for m, mask in masks.items():
            c = cuts.get(m)
            if m == "calibrated (face value)":
                pmask = cal_n(ps) >= t
            elif m == "raw (face value)":
                pmask = ps >= t
            else:
                pmask = ps >= c - 1e-12 if c is not None else np.zeros(len(ps), bool)
            res[m] = {"share": float(mask.mean()), "n": int(mask.sum()),
                      "precision": float(hit[mask].mean()) if mask.any() else None,
                      "population": float(ptruth[pmask].mean()) if pmask.any() else None}
        out["targets"][str(t)] = res
    return out


def summarise(runs: list[dict]) -> dict:
    out = {}
    for t in TARGETS:
        out[str(t)] = {}
        for m in METHODS:
            cells = [r["targets"][str(t)][m] for r in runs]
            shares = [c["share"] for c in cells]
            job = [c["precision"] for c in cells if c["precision"] is not None]
            popu = [c["population"] for c in cells if c["population"] is not None]
            out[str(t)][m] = {
                "share_mean": statistics.fmean(shares), "share_median": statistics.median(shares),
                "share_min": min(shares), "share_max": max(shares),
                "seeds": len(cells), "seeds_with_rows": len(job),
                "job_below": sum(x < t for x in job),
                "population_below": sum(x < t for x in popu)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="Model to label with (default: the bundled).")
    ap.add_argument("--n", type=int, default=2000, help="Images labeled per domain.")
    ap.add_argument("--reviews", type=int, default=1000, help="Of which play reviewed rows.")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default="bench/calibration.json")
    ap.add_argument("--rows", help="Reuse the labeled rows of an earlier --out (routing only).")
    ap.add_argument("--before", default=BEFORE, help="Git commit whose calibration.py is "
                    "'before'.")
    ap.add_argument("--domains", default="base,shifted", help="Synthetic domains to label "
                    "(comma-separated: base, shifted, robust).")
    ap.add_argument("--clustered", type=int, default=2000, help="Rows of the simulated "
                    "clustered world (5 per image, correlation 0.5); 0 = skip it.")
    a = ap.parse_args()
    old = _before_module(a.before)
    earlier = json.load(open(a.rows))["domains"] if a.rows else None
    res: dict = {"command": "bench/bench_calibration.py " + " ".join(
        f"--{k} {v}" for k, v in vars(a).items() if k != "model" and v is not None),
        "model": a.model, "targets": TARGETS, "domains": {}}
    worlds = a.domains.split(",") + (["clustered"] if a.clustered else [])
    for domain in worlds:
        t0 = time.perf_counter()
        if domain == "clustered":
            rows, rps = clustered_world(a.clustered, 0), None
            runs = [route_once(clustered_world(a.clustered, 1 + seed), a.reviews, seed, old,
                               population=clustered_world(20_000, 10_000))
                    for seed in range(a.seeds)]
        else:
            if earlier:
                rows, rps = earlier[domain]["labeled"], earlier[domain]["rows_per_s"]
            else:
                from grounding.engines import EngineConfig

                rows, rps = label(a.model or EngineConfig().model, domain, a.n, a.batch)
            runs = [route_once(rows, a.reviews, seed, old) for seed in range(a.seeds)]
        res["domains"][domain] = {
            "rows": len(rows), "rows_per_s": rps,
            "hit_rate": sum(r["hit"] for r in rows) / len(rows),
            "summary": summarise(runs), "route_s": round(time.perf_counter() - t0, 1),
            "runs": runs, "labeled": rows if domain != "clustered" else []}
        print(f"[{domain}] {len(rows)} rows, right {res['domains'][domain]['hit_rate']:.3f}, "
              f"{res['domains'][domain]['route_s']} s", flush=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    for domain, d in res["domains"].items():
        print(f"\n{domain}: right {d['hit_rate']:.3f}, {a.seeds} seeds")
        print("| target | method | auto-accepted share: mean (min-max) | seeds with rows | "
              "job below target | population below target |")
        print("|---|---|---|---|---|---|")
        for t, per in d["summary"].items():
            for m, v in per.items():
                print(f"| {t} | {m} | {v['share_mean']:.3f} ({v['share_min']:.3f}-"
                      f"{v['share_max']:.3f}) | {v['seeds_with_rows']}/{v['seeds']} | "
                      f"{v['job_below']} | {v['population_below']} |")


if __name__ == "__main__":
    main()
