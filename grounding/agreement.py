"""Agreement between reviewers, measured on the reviewed-label store.

What is compared: every person's current decision per item (`ReviewStore.annotations`: a
person's latest decision; ``auto`` decisions are nobody's). An item decided by two or more
people is *overlapped*; each pair of people on it is one comparison. Items one person decided
say nothing about agreement and are left out.

Two measures, each overall, per guideline version, per person and per pair of people:

* **decisions** (accept / correct / reject): ``agreement``, the share of comparisons where both
  decided the same; ``kappa``, Cohen's kappa (`sklearn.metrics.cohen_kappa_score`), which
  discounts the agreement two people with those decision rates would reach by chance. Per pair
  it is the pair's own kappa. A group of several pairs pools its comparisons: per person, the
  person's decision against the other's; overall and per guideline, every comparison in both
  orders (so no one's name decides whose marginal is whose). Kappa is None where it is
  undefined (everyone used one decision: chance agreement is 1).
* **boxes**, on comparisons where neither rejected: both people's boxes matched one to one
  (the assignment with the largest total IoU, `scipy.optimize.linear_sum_assignment`), a match
  counting when its IoU >= ``iou`` (0.5). ``matched_share`` = 2 x matches / all boxes of both
  (1.0: every box of each has a partner); ``mean_iou`` of the matches; ``both_empty`` counts
  comparisons where both said "no such object" (agreement without a box to match).

A comparison belongs to a guideline version when both decisions were made under it; one made
under two versions is counted under ``"mixed"`` (and a decision without a recorded guideline
under ``"unknown"``).

Boxes are ``[x1, y1, x2, y2]`` in float pixels of the original image (xyxy; see
grounding/guidelines/default.md for which pixels are inside).
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict

IOU = 0.5


def box_iou(a: list[float], b: list[float]) -> float:
    """IoU of two xyxy pixel boxes (0 when both are empty)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_boxes(a: list, b: list, iou: float = IOU) -> list[float]:
    """The IoUs of a one-to-one matching of boxes ``a`` to boxes ``b`` (largest total IoU),
    keeping the matches with IoU >= ``iou``."""
    if not a or not b:
        return []
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    m = np.array([[box_iou(p, q) for q in b] for p in a])
    rows, cols = linear_sum_assignment(m, maximize=True)
    return [float(m[r, c]) for r, c in zip(rows, cols, strict=True) if m[r, c] >= iou]


def disagree(a: dict, b: dict, iou: float = IOU) -> bool:
    """Whether two people's decisions on an item disagree: one rejects and the other does not;
    or neither rejects and their boxes do not all match one to one at IoU >= ``iou`` (a box
    without a partner, including "no such object" against a box). Accept against correct with
    matching boxes agrees: both say the same boxes are right (what training uses)."""
    ra, rb = a["decision"] == "reject", b["decision"] == "reject"
    if ra or rb:
        return ra != rb
    ba, bb = a["boxes"] or [], b["boxes"] or []
    return len(ba) != len(bb) or len(match_boxes(ba, bb, iou)) != len(ba)


def distance(a: dict, b: dict, iou: float = IOU) -> float:
    """How far apart two people's decisions on an item are, 0 (the same) to 2: 2 when one
    rejects and the other does not; else 1 - (sum of matched IoUs) / (boxes of the larger set)
    (1: no box matched; 0 for two "no such object"); + 1 where they disagree
    (`disagree`), so every disagreement ranks above every agreement."""
    ra, rb = a["decision"] == "reject", b["decision"] == "reject"
    if ra or rb:
        return 0.0 if ra and rb else 2.0
    ba, bb = a["boxes"] or [], b["boxes"] or []
    n = max(len(ba), len(bb))
    base = 1.0 - (sum(match_boxes(ba, bb, iou)) / n) if n else 0.0
    return base + (1.0 if disagree(a, b, iou) else 0.0)


def worst(store, version: int | None = None, n: int = 6, iou: float = IOU) -> list[dict]:
    """The ``n`` pairs of people's decisions furthest apart (`distance`), disagreements only,
    worst first: ``{"item_id", "text", "image", "width", "height", "predicted_boxes",
    "distance", "a": record, "b": record}``."""
    per_item: dict[str, list[dict]] = defaultdict(list)
    for r in store.annotations(version).to_pylist():
        per_item[r["item_id"]].append(r)
    pairs = []
    for anns in per_item.values():
        anns = sorted(anns, key=lambda r: str(r["reviewer"]))
        for a, b in itertools.combinations(anns, 2):
            dist = distance(a, b, iou)
            if dist >= 1.0:
                pairs.append((dist, a, b))
    pairs.sort(key=lambda p: (-p[0], p[1]["item_id"]))
    return [{"item_id": a["item_id"], "text": a["text"], "image": a["image"],
             "width": a["width"], "height": a["height"],
             "predicted_boxes": a["predicted_boxes"] or b["predicted_boxes"],
             "distance": dist, "a": a, "b": b} for dist, a, b in pairs[:n]]


def _kappa(x: list[str], y: list[str]) -> float | None:
    import warnings

    from sklearn.metrics import cohen_kappa_score

    if not x:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 0/0 where everyone used one decision: None below
        k = float(cohen_kappa_score(x, y))
    return k if math.isfinite(k) else None


class _Group:
    """The comparisons of one group (overall, a guideline, a person, a pair)."""

    def __init__(self) -> None:
        self.items: set[str] = set()
        self.x: list[str] = []
        self.y: list[str] = []
        self.box_pairs = self.both_empty = self.boxes = 0
        self.ious: list[float] = []

    def add(self, item: str, da: str, db: str, box: tuple | None) -> None:
        self.items.add(item)
        self.x.append(da)
        self.y.append(db)
        if box is not None:
            n, ious = box
            self.box_pairs += 1
            self.both_empty += n == 0
            self.boxes += n
            self.ious.extend(ious)

    def stats(self, symmetric: bool) -> dict:
        n = len(self.x)
        x, y = (self.x + self.y, self.y + self.x) if symmetric else (self.x, self.y)
        return {
            "pairs": n, "items": len(self.items),
            "decisions": {"agreement": (sum(p == q for p, q in zip(self.x, self.y, strict=True))
                                        / n) if n else None,
                          "kappa": _kappa(x, y)},
            "boxes": {"pairs": self.box_pairs, "both_empty": self.both_empty,
                      "matched_share": (2 * len(self.ious) / self.boxes) if self.boxes else None,
                      "mean_iou": (sum(self.ious) / len(self.ious)) if self.ious else None,
                      "matches": len(self.ious)},
        }


def _guideline(ga, gb) -> str:
    if ga is None or gb is None:
        return "unknown"
    return ga if ga == gb else "mixed"


def agreement(store, version: int | None = None, iou: float = IOU) -> dict:
    """Agreement between the people who reviewed the store's items, as of ``version`` (default:
    newest): ``overall``, ``by_guideline``, ``by_person``, ``by_pair`` (``"a | b"``, names in
    order), each with ``pairs`` (comparisons), ``items``, ``decisions`` and ``boxes`` (see the
    module docstring)."""
    if not 0.0 < iou <= 1.0:
        raise ValueError(f"iou must be in (0, 1], got {iou}")
    v = version if version is not None else store.latest()
    rows = store.annotations(version).to_pylist()
    per_item: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        per_item[r["item_id"]].append(r)
    overall, by_g, by_person, by_pair = _Group(), defaultdict(_Group), defaultdict(_Group), \
        defaultdict(_Group)
    overlapped = 0
    for item_id, anns in per_item.items():
        if len(anns) < 2:
            continue
        overlapped += 1
        anns = sorted(anns, key=lambda r: str(r["reviewer"]))
        for a, b in itertools.combinations(anns, 2):
            box = None
            if "reject" not in (a["decision"], b["decision"]):
                ba, bb = a["boxes"] or [], b["boxes"] or []
                box = (len(ba) + len(bb), match_boxes(ba, bb, iou))
            da, db = a["decision"], b["decision"]
            overall.add(item_id, da, db, box)
            by_g[_guideline(a["guideline"], b["guideline"])].add(item_id, da, db, box)
            by_pair[f"{a['reviewer']} | {b['reviewer']}"].add(item_id, da, db, box)
            by_person[str(a["reviewer"])].add(item_id, da, db, box)
            by_person[str(b["reviewer"])].add(item_id, db, da, box)
    return {
        "store": store.uri, "version": v, "iou": iou,
        "people": sorted({str(r["reviewer"]) for r in rows}),
        "overlapped_items": overlapped,
        # how the snapshot resolves items: agreed, adjudicated, unresolved (left out)
        "resolution": store.resolution(version),
        "overall": overall.stats(symmetric=True),
        "by_guideline": {g: s.stats(symmetric=True) for g, s in sorted(by_g.items())},
        "by_person": {p: s.stats(symmetric=False) for p, s in sorted(by_person.items())},
        "by_pair": {p: s.stats(symmetric=False) for p, s in sorted(by_pair.items())},
    }
