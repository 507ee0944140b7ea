"""The gate's error rates over repeated nightly gates, before and after issue 29, in simulation.

A world: one production adapter (Acc@0.5 0.70) and ``--ticks`` nightly gates; each tick adds
``--images-per-tick`` held-out images of ``--per-image`` expressions and gates a fresh
candidate on every held-out item so far (the store grows; the old images stay). Hits come from
a latent Gaussian: each adapter's expressions of one image correlate ``rho`` (0: independent
items; 0.5: clustered), and the two adapters' image effects and item noises correlate 0.5.
Candidates: no better (0.70), 1 point worse (0.69), 5 points better (0.75).

Rules (both with the defaults --margin 0.02, --min-heldout 50, --confidence 0.95):

* **before**: the gate of commit 26a21f7 (exact McNemar on items, one-sided, at 0.05 every
  tick);
* **after**: train/gate.py now (exact sign test on per-image differences, the k-th gate
  against one production at 0.05 / (k (k + 1)), `spend`).

The rules are vectorised over runs here; for the first ``--check`` runs of every setting, each
tick's decision is also taken by the real functions (the old ones loaded from git, the new ones
imported) and must agree. A run stops at its first promotion. Reported: the share of runs with a
promotion within 1, 10 and 30 ticks, pooled over ``--repeats`` seeds (with its exact 95 %
interval) and the spread (min-max) of the repeats. Then the forgetting check alone: the share
of candidates it lets through at a true loss of 0, 5 and 8 points (margin 0.05), n = 30, 100,
300 earlier-label items, before (the observed drop) and after (the upper bound, min n 50).

Run::

    .venv/bin/python bench/bench_gate.py --runs 1000 --repeats 3 --out bench/gate.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.special import bdtrc
from scipy.stats import binomtest, norm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OLD_COMMIT = "26a21f7"
P_PROD, MARGIN, CONF, MIN_HELDOUT = 0.70, 0.02, 0.95, 50


def old_gate():
    """train/gate.py as of OLD_COMMIT, loaded from git as a module."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:train/gate.py"],
                         capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_gate.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_gate", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def simulate(rng, runs: int, ticks: int, per_tick: int, per: int, rho: float, p_cand: float,
             check: int = 0, old=None) -> dict:
    """First tick (1-based; 0: never) at which each run promoted, for both rules."""
    from train.gate import compare, decide, spend

    n_img = ticks * per_tick
    sr, sq = np.sqrt(rho), np.sqrt(1 - rho)
    a = rng.standard_normal((runs, n_img))
    e = rng.standard_normal((runs, n_img, per))
    prod = sr * a[..., None] + sq * e < norm.ppf(P_PROD)
    first = {"before": np.zeros(runs, int), "after": np.zeros(runs, int)}
    events = [[] for _ in range(check)]
    for t in range(1, ticks + 1):
        b = 0.5 * a + np.sqrt(0.75) * rng.standard_normal((runs, n_img))
        f = 0.5 * e + np.sqrt(0.75) * rng.standard_normal((runs, n_img, per))
        cand = sr * b[..., None] + sq * f < norm.ppf(p_cand)
        k = t * per_tick
        c, p = cand[:, :k], prod[:, :k]
        n = k * per
        wins = (c & ~p).sum(axis=(1, 2))
        losses = (p & ~c).sum(axis=(1, 2))
        lift_ok = (wins - losses) >= MARGIN * n - 1e-9
        # before: exact McNemar on items, at 0.05
        m = wins + losses
        p_old = np.where(m > 0, bdtrc(wins - 1, m, 0.5), 1.0)
        p_old = np.where(wins == 0, 1.0, p_old)
        ok_old = (p_old <= 1 - CONF + 1e-12) & lift_ok & (n >= MIN_HELDOUT)
        # after: sign test on per-image differences, at alpha / (t (t + 1)) (t-th gate: every
        # earlier one refused, or the run would have stopped)
        d = c.sum(axis=2).astype(int) - p.sum(axis=2)
        pos, neg = (d > 0).sum(axis=1), (d < 0).sum(axis=1)
        p_new = np.where(pos > 0, bdtrc(pos - 1, pos + neg, 0.5), 1.0)
        alpha_t = (1 - CONF) / (t * (t + 1))
        ok_new = (p_new <= alpha_t + 1e-12) & lift_ok & (n >= MIN_HELDOUT)
        for rule, ok in (("before", ok_old), ("after", ok_new)):
            first[rule][(first[rule] == 0) & ok] = t
        for r in range(check):  # the real functions agree, tick by tick, where still running
            units = np.repeat(np.arange(k), per)
            cv, pv = c[r].ravel(), p[r].ravel()
            rule = {"min_heldout": MIN_HELDOUT, "confidence": CONF, "margin": MARGIN,
                    "max_forgetting": 0.05}
            if first["before"][r] in (0, t):
                got = old.decide(old.compare(cv.tolist(), pv.tolist(), CONF), None, None,
                                 **rule)[0]
                assert got == bool(ok_old[r]), ("before", r, t)
            if first["after"][r] in (0, t):
                seq = spend(events[r], "prod", CONF)
                assert abs(seq["alpha"] - alpha_t) < 1e-15
                got = decide(compare(cv, pv, CONF, units), None, None, **rule,
                             alpha=seq["alpha"])[0]
                assert got == bool(ok_new[r]), ("after", r, t)
                events[r].append({"kind": "refuse", "metrics": {"sequential": seq}})
    return first


def forgetting(rng, draws: int, old) -> list[dict]:
    """Forgetting check alone, before (observed drop <= 0.05) and after (upper 0.95 bound of
    the drop <= 0.05, at least --min-forgetting 50 items): share of candidates let through,
    production 0.80 on earlier labels, the candidate losing ``loss``, by the real functions."""
    from train.gate import compare, decide

    rule = {"min_heldout": 1, "confidence": CONF, "margin": 0.0, "max_forgetting": 0.05}
    better = [True] * 60, [False] * 60
    rows = []
    for world, per, rho in (("independent", 1, 0.0), ("clustered", 5, 0.5)):
        for n in (30, 100, 300):
            for loss in (0.0, 0.05, 0.08):
                passed = {"before": 0, "after": 0}
                for _ in range(draws):
                    g = n // per
                    a = rng.standard_normal(g)
                    bb = 0.5 * a + np.sqrt(0.75) * rng.standard_normal(g)
                    e = rng.standard_normal((g, per))
                    f = 0.5 * e + np.sqrt(0.75) * rng.standard_normal((g, per))
                    prod = (np.sqrt(rho) * a[:, None] + np.sqrt(1 - rho) * e
                            < norm.ppf(0.80)).ravel()
                    cand = (np.sqrt(rho) * bb[:, None] + np.sqrt(1 - rho) * f
                            < norm.ppf(0.80 - loss)).ravel()
                    units = np.repeat(np.arange(g), per)
                    r_old = old.decide(old.compare(*better), old.compare(
                        cand.tolist(), prod.tolist()), None, **rule)[1]
                    r_new = decide(compare(*better), compare(cand, prod, CONF, units), None,
                                   **rule)[1]
                    passed["before"] += not any("forget" in r for r in r_old)
                    passed["after"] += not any("forget" in r or "too few" in r for r in r_new)
                for rule_name, x in passed.items():
                    ci_ = binomtest(x, draws).proportion_ci(0.95, "exact")
                    rows.append({"world": world, "n": n, "true_loss": loss, "rule": rule_name,
                                 "passed": x / draws, "ci95": [ci_.low, ci_.high],
                                 "draws": draws})
                print(f"forgetting {world:11s} n={n:3d} loss={loss:.2f}  passed before "
                      f"{passed['before'] / draws:.3f}  after {passed['after'] / draws:.3f}",
                      flush=True)
    return rows


def rates(first: np.ndarray, horizons=(1, 10, 30)) -> dict:
    return {h: float(((first > 0) & (first <= h)).mean()) for h in horizons}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=1000, help="runs per repeat and setting")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ticks", type=int, default=30)
    ap.add_argument("--images-per-tick", type=int, default=20)
    ap.add_argument("--per-image", type=int, default=5)
    ap.add_argument("--check", type=int, default=3,
                    help="runs per setting whose decisions the real functions retake")
    ap.add_argument("--forgetting-draws", type=int, default=1000,
                    help="draws per setting of the forgetting check (0: skip it)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    old = old_gate()
    worlds = {"independent": 0.0, "clustered": 0.5}
    cands = {"no better (0.70)": 0.70, "1 point worse (0.69)": 0.69,
             "5 points better (0.75)": 0.75}
    out = {"machine": f"{platform.processor() or platform.machine()}, "
                      f"{__import__('os').cpu_count()} CPUs", "args": vars(args),
           "old_commit": OLD_COMMIT, "results": []}
    t0 = time.time()
    for wi, (world, rho) in enumerate(worlds.items()):
        for ci, (cand, pc) in enumerate(cands.items()):
            per_rep = {"before": [], "after": []}
            pooled = {"before": [], "after": []}
            for rep in range(args.repeats):
                rng = np.random.default_rng([wi, ci, rep])
                first = simulate(rng, args.runs, args.ticks, args.images_per_tick,
                                 args.per_image, rho, pc, args.check if rep == 0 else 0, old)
                for rule in per_rep:
                    per_rep[rule].append(rates(first[rule]))
                    pooled[rule].append(first[rule])
            for rule in per_rep:
                allf = np.concatenate(pooled[rule])
                row = {"world": world, "candidate": cand, "rule": rule, "runs": len(allf)}
                for h in (1, 10, 30):
                    x = int(((allf > 0) & (allf <= h)).sum())
                    ci_ = binomtest(x, len(allf)).proportion_ci(0.95, "exact")
                    reps = [r[h] for r in per_rep[rule]]
                    row[f"within_{h}"] = {"rate": x / len(allf), "ci95": [ci_.low, ci_.high],
                                          "repeats_min": min(reps), "repeats_max": max(reps)}
                out["results"].append(row)
                w = row["within_30"]
                print(f"{world:11s} {cand:24s} {rule:6s} within 1: "
                      f"{row['within_1']['rate']:.3f}  within 10: {row['within_10']['rate']:.3f}"
                      f"  within 30: {w['rate']:.3f} ({w['repeats_min']:.3f}-"
                      f"{w['repeats_max']:.3f})", flush=True)
    if args.forgetting_draws:
        out["forgetting"] = forgetting(np.random.default_rng(29), args.forgetting_draws, old)
    out["seconds"] = round(time.time() - t0, 1)
    print(f"{out['seconds']} s")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
