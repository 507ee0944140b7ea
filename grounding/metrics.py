"""Grounding metrics, RefCOCO convention.

Acc@0.5: one predicted box per expression (the first one the model gave), a hit when its IoU with
the gold box is >= 0.5. A parse failure or an error counts as a miss. Mean IoU counts misses as
0. Boxes are xyxy in pixels of the same (original) image.
"""

from __future__ import annotations

from collections.abc import Iterable

from grounding.boxes import Box


def grounding_metrics(pairs: Iterable[tuple[Box | None, Box]], threshold: float = 0.5) -> dict:
    """``pairs`` of (first predicted box or None, gold box) -> acc, mean IoU, failure rate."""
    n = hits = fails = 0
    total_iou = 0.0
    for pred, gold in pairs:
        n += 1
        if pred is None:
            fails += 1
            continue
        v = pred.iou(gold)
        total_iou += v
        hits += v >= threshold
    d = max(n, 1)
    return {"n": n, f"acc@{threshold}": hits / d, "mean_iou": total_iou / d,
            "parse_fail_rate": fails / d}
