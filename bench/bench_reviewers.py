"""Reviewers of known noise on a synthetic world: does agreement find the noise, and does gold
exclusion remove the noisy reviewer? (issue 33)

    PYTHONPATH=. .venv/bin/python bench/bench_reviewers.py --items 600 --seeds 5 --out bench/reviewers.json

The world: ``--items`` items on 200 x 200 images, one true box each (sides 20-80 px). The
model's box is right (the true box moved by N(0, 1 px)) with probability 0.6, else somewhere
else. Three reviewers label every item (full overlap), each with a known box jitter sigma (px,
added to every coordinate of a box they draw) and a known rate e of wrong decisions (they
reject a right prediction, or accept a wrong one). 10 % of the items are gold (their true box
known). Everything goes through a real reviewed-label store (a Delta table in a temporary
folder) and `grounding.agreement` / `grounding.gold` / the store's snapshot rule.

Recovering the decision error rates: for two reviewers who err independently, the pairwise
decision disagreement is about e_a + e_b (small e), so with three reviewers
e_a ~ (d_ab + d_ac - d_bc) / 2. Box noise shows as each pair's mean IoU of matched boxes.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile

REVIEWERS = {"alice": (1.0, 0.02), "bob": (2.0, 0.05), "carol": (12.0, 0.30)}
W = H = 200


def _box(rnd):
    w, h = rnd.uniform(20, 80), rnd.uniform(20, 80)
    x, y = rnd.uniform(0, W - w), rnd.uniform(0, H - h)
    return [x, y, x + w, y + h]


def _jitter(b, sigma, rnd):
    x1, y1, x2, y2 = (c + rnd.gauss(0, sigma) for c in b)
    x1, x2 = sorted((min(max(x1, 0.0), W), min(max(x2, 0.0), W)))
    y1, y2 = sorted((min(max(y1, 0.0), H), min(max(y2, 0.0), H)))
    return [x1, y1, x2, y2]


def decide(right: bool, pred, draw, e: float, rnd) -> tuple[str, list]:
    """A reviewer's decision on a prediction (``right`` or not) who errs with rate ``e``:
    accept a right one, else reject it; correct a wrong one with their own drawing (``draw()``),
    else accept it."""
    wrong = rnd.random() < e
    if right:
        return ("reject", []) if wrong else ("accept", [pred])
    return ("accept", [pred]) if wrong else ("correct", [draw()])


def world(n: int, seed: int):
    from grounding.agreement import box_iou
    from grounding.labels import item
    from grounding.store import decision_record

    rnd = random.Random(seed)
    records, truth = [], {}
    for k in range(n):
        true = _box(rnd)
        right = rnd.random() < 0.6
        pred = _jitter(true, 1.0, rnd) if right else _box(rnd)
        right = box_iou(pred, true) >= 0.5
        it = item(f"/synth/{k}.png", f"object {k}", [true], width=W, height=H, model="m",
                  prompt_version="p1")
        truth[it["item_id"]] = {"item": it, "right": right}
        order = list(REVIEWERS.items())
        rnd.shuffle(order)  # who decides last on an item is random
        for who, (sigma, e) in order:
            d, boxes = decide(right, pred, lambda: _jitter(true, sigma, rnd), e, rnd)  # noqa: B023
            rec = decision_record(dict(it, boxes=boxes), d, reviewer=who, source="bench",
                                  predicted={"boxes": [pred], "score": 0.5},
                                  guideline="groundlabel-default@1")
            records.append(rec)
    gold_ids = [i for i in truth if rnd.random() < 0.1]
    return records, truth, gold_ids


def label_precision(labels: list[dict], truth: dict) -> float:
    """Share of training labels whose box is the true box at IoU >= 0.5."""
    from grounding.agreement import disagree

    ok = [not disagree({"decision": "correct", "boxes": it["boxes"]},
                       {"decision": "correct", "boxes": truth[it["item_id"]]["item"]["boxes"]})
          for it in labels]
    return sum(ok) / len(ok) if ok else float("nan")


def latest_wins(records: list[dict]) -> list[dict]:
    """The rule before issue 33: the latest decision on an item is its label, whoever made
    it (accepted and corrected ones train)."""
    last = {}
    for r in records:
        last[r["item_id"]] = r
    return [r for r in last.values() if r["decision"] in ("accept", "correct")]


def one(n: int, seed: int, min_acc: float) -> dict:
    from grounding.agreement import agreement
    from grounding.gold import excluded_reviewers, score
    from grounding.store import ReviewStore

    records, truth, gold_ids = world(n, seed)
    with tempfile.TemporaryDirectory() as d:
        st = ReviewStore(f"{d}/store")
        st.append(records, source="bench")
        a = agreement(st)
        gold = {i: truth[i]["item"] for i in gold_ids}
        scores = score(st, gold)
        out = excluded_reviewers(st, gold, min_acc)
        before, after = st.labels(), st.labels(exclude=out)
        res_before, res_after = st.resolution(), st.resolution(exclude=out)
    d = {p: 1 - s["decisions"]["agreement"] for p, s in a["by_pair"].items()}
    ab, ac, bc = d["alice | bob"], d["alice | carol"], d["bob | carol"]
    recovered = {"alice": (ab + ac - bc) / 2, "bob": (ab + bc - ac) / 2,
                 "carol": (ac + bc - ab) / 2}
    return {"seed": seed, "recovered_error_rate": recovered,
            "pair": {p: {"decision_agreement": s["decisions"]["agreement"],
                         "kappa": s["decisions"]["kappa"],
                         "matched_share": s["boxes"]["matched_share"],
                         "mean_iou": s["boxes"]["mean_iou"]} for p, s in a["by_pair"].items()},
            "person_kappa": {p: s["decisions"]["kappa"] for p, s in a["by_person"].items()},
            "gold": scores, "excluded": sorted(out),
            "latest_wins": {"labels": len(latest_wins(records)),
                            "precision": label_precision(latest_wins(records), truth)},
            "before": {"labels": len(before), "precision": label_precision(before, truth),
                       "unresolved": res_before["unresolved"]},
            "after": {"labels": len(after), "precision": label_precision(after, truth),
                      "unresolved": res_after["unresolved"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=600)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--min-reviewer-accuracy", type=float, default=0.8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    runs = [one(args.items, s, args.min_reviewer_accuracy) for s in range(args.seeds)]

    def med(f):
        return statistics.median(f(r) for r in runs)

    summary = {
        "true": {w: {"sigma_px": s, "error_rate": e} for w, (s, e) in REVIEWERS.items()},
        "recovered_error_rate": {w: med(lambda r, w=w: r["recovered_error_rate"][w])
                                 for w in REVIEWERS},
        "pair_mean_iou": {p: med(lambda r, p=p: r["pair"][p]["mean_iou"])
                          for p in runs[0]["pair"]},
        "pair_matched_share": {p: med(lambda r, p=p: r["pair"][p]["matched_share"])
                               for p in runs[0]["pair"]},
        "person_kappa": {w: med(lambda r, w=w: r["person_kappa"][w]) for w in REVIEWERS},
        "gold_acc50": {w: med(lambda r, w=w: r["gold"][w]["acc50"]) for w in REVIEWERS},
        "excluded": {",".join(r["excluded"]) or "-": sum(
            x["excluded"] == r["excluded"] for x in runs) for r in runs},
        "precision_latest_wins": med(lambda r: r["latest_wins"]["precision"]),
        "labels_latest_wins": med(lambda r: r["latest_wins"]["labels"]),
        "precision_before": med(lambda r: r["before"]["precision"]),
        "precision_after": med(lambda r: r["after"]["precision"]),
        "labels_before": med(lambda r: r["before"]["labels"]),
        "labels_after": med(lambda r: r["after"]["labels"]),
        "unresolved_before": med(lambda r: r["before"]["unresolved"]),
        "unresolved_after": med(lambda r: r["after"]["unresolved"]),
    }
    doc = {"args": vars(args), "summary": summary, "runs": runs}
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
