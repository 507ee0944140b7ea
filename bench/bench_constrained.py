"""What constrained decoding buys and costs: parse failures, Acc@0.5, rows/s, "no object"
answers and score separation, with and without the family's answer grammar, on the base,
shifted and robust test sets, through one vLLM engine.

Both modes run on the same engine in the same process, interleaved (off, on, off, on, ...), so
the rows/s ratio compares like with like; each is repeated and reported as median and range.

Run::

    .venv/bin/python bench/bench_constrained.py --n 200 --repeats 3 --out bench/constrained.json

Scores: the geometric-mean probability of the box's digit tokens (as in label jobs). "AUROC"
is the chance that a random hit scores above a random miss: constraining the format must not
make misses look confident.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def _quartiles(xs: list[float]) -> list[float] | None:
    if len(xs) < 4:
        return None
    return [round(v, 3) for v in statistics.quantiles(xs, n=4)]


def _auroc(hits: list[float], misses: list[float]) -> float | None:
    if not hits or not misses:
        return None
    from scipy.stats import mannwhitneyu

    u = mannwhitneyu(hits, misses).statistic
    return round(float(u) / (len(hits) * len(misses)), 3)


def run(model: str, n: int, repeats: int, batch: int) -> dict:
    from grounding.boxes import Box
    from grounding.engines import EngineConfig, EngineInput, load_engine
    from grounding.engines.grounder import Grounder
    from grounding.metrics import grounding_metrics
    from grounding.synth import chance_accuracy, iter_samples

    engine = load_engine(EngineConfig(model=model))
    g = Grounder(engine)
    out: dict = {"model": model, "n": n, "repeats": repeats, "batch": batch, "sets": {}}
    for domain in ("base", "shifted", "robust"):
        samples = list(iter_samples(n, domain, seed=1000))
        res: dict = {"chance": round(chance_accuracy(samples), 3)}
        for mode in ("off", "on"):
            res[mode] = {"rows_per_s": []}
        warm = [EngineInput(g.prompt(s.text), s.image) for s in samples[:batch]]
        engine.generate(warm)  # first calls of a set pay for image-size warm-up: not timed
        engine.generate([EngineInput(w.prompt, w.image, None, g.family.grammar) for w in warm])
        for _ in range(repeats):
            for mode in ("off", "on"):
                grammar = g.family.grammar if mode == "on" else None
                inputs = [EngineInput(g.prompt(s.text), s.image, None, grammar) for s in samples]
                t0 = time.perf_counter()
                gens = []
                for i in range(0, n, batch):
                    gens += engine.generate(inputs[i:i + batch])
                res[mode]["rows_per_s"].append(n / (time.perf_counter() - t0))
                results = [g.finish(gen, s.size) for gen, s in zip(gens, samples, strict=True)]
                pairs = [(r.boxes[0] if r.boxes else None, Box.from_list(s.bbox))
                         for r, s in zip(results, samples, strict=True)]
                m = grounding_metrics(pairs)
                hit = [p is not None and p.iou(gold) >= 0.5 for p, gold in pairs]
                scores = [r.score for r in results]
                res[mode].update(
                    acc=round(m["acc@0.5"], 3), parse_fail=round(m["parse_fail_rate"], 3),
                    no_object=round(sum(r.status == "empty" for r in results) / n, 3),
                    truncated=round(sum(r.status == "truncated" for r in results) / n, 3),
                    score_hits=_quartiles([s for s, h in zip(scores, hit, strict=True)
                                           if h and s is not None]),
                    score_misses=_quartiles([s for s, h, r in zip(scores, hit, results,
                                                                  strict=True)
                                             if not h and r.boxes and s is not None]),
                    auroc=_auroc([s for s, h in zip(scores, hit, strict=True) if h and s],
                                 [s for s, h, r in zip(scores, hit, results, strict=True)
                                  if not h and r.boxes and s]))
        # the ratio of each repeat's pair (run back to back), then median and range
        ratios = [on / off for on, off in zip(res["on"]["rows_per_s"], res["off"]["rows_per_s"],
                                               strict=True)]
        res["speed_ratio_on_off"] = {"median": round(statistics.median(ratios), 3),
                                     "min": round(min(ratios), 3), "max": round(max(ratios), 3)}
        for mode in ("off", "on"):
            rs = res[mode]["rows_per_s"]
            res[mode]["rows_per_s"] = {"median": round(statistics.median(rs), 1),
                                       "min": round(min(rs), 1), "max": round(max(rs), 1)}
        out["sets"][domain] = res
        print(json.dumps({domain: res}), flush=True)
    engine.close()
    return out


def main() -> None:
    from grounding.paths import DEFAULT_MODEL

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", default="bench/constrained.json")
    args = ap.parse_args()
    res = run(args.model, args.n, args.repeats, args.batch)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
