"""Gold items: items with known boxes, mixed into review, that measure each reviewer.

A gold file is a label file in any format (`grounding.convert`) whose items hold the right
boxes (none: "no such object"). Gold items are recognised by ``item_id`` (the same
``(image, expression)`` is the same item), so nothing in a task tells a reviewer it is gold:
put the gold items into a labeling job's input, and their tasks look like every other.

Per reviewer, on the gold items they decided (their current decision,
`grounding.store.ReviewStore.annotations`):

* ``acc50``: the share where their boxes are the gold boxes: every box matched one to one at
  IoU >= 0.5 (`grounding.agreement.disagree`; one gold box: IoU >= 0.5 with it, Acc@0.5). A
  reject is wrong (gold items are labelable).
* ``decision_accuracy``: the share where their decision is the one due: ``accept`` when the
  model's predicted boxes already are the gold boxes (by the same rule), else ``correct``.

A reviewer with no gold item decided is not scored (and never left out for it).

Boxes are ``[x1, y1, x2, y2]`` in float pixels of the original image (xyxy; see
grounding/guidelines/default.md).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from grounding.agreement import IOU, disagree


class ReviewerFilter(BaseModel):
    """Reviewers judged on gold items: those below an accuracy are left out."""

    gold: str | None = Field(None, description="Gold file: items with known boxes that score "
                             "each reviewer (Acc@0.5 against the gold boxes).")
    gold_format: Literal["seed", "swift", "coco", "parquet", "labelstudio"] = Field(
        "seed", description="Format of --gold.", json_schema_extra={"metavar": "FORMAT"})
    min_reviewer_accuracy: float | None = Field(
        None, ge=0.0, le=1.0, description="Leave out every decision of the reviewers whose "
        "Acc@0.5 on the gold items is below this (needs --gold; reviewers without a gold item "
        "are kept). The output names them and counts their decisions.")

    @model_validator(mode="after")
    def _needs_gold(self) -> ReviewerFilter:
        if self.min_reviewer_accuracy is not None and not self.gold:
            raise ValueError("--min-reviewer-accuracy needs --gold (the items it is measured on)")
        return self

    def excluded(self, store, version: int | None = None, opts=None) -> tuple[set[str], dict]:
        """``(reviewers to leave out, what to report)``: nobody without a threshold."""
        if self.min_reviewer_accuracy is None:
            return set(), {}
        gold = load_gold(self.gold, self.gold_format, opts)
        scores = score(store, gold, version)
        out = {who for who, s in scores.items() if s["acc50"] < self.min_reviewer_accuracy}
        decisions = sum(r in out for r in store.annotations(version).column("reviewer")
                        .to_pylist())
        return out, {"excluded_reviewers": sorted(out), "excluded_decisions": decisions,
                     "min_reviewer_accuracy": self.min_reviewer_accuracy,
                     "reviewer_accuracy": {w: s["acc50"] for w, s in scores.items()}}


def load_gold(uri: str, fmt: str, opts=None) -> dict[str, dict]:
    """``{item_id: gold item}`` of a gold file in ``fmt`` (refused whole on any problem)."""
    from grounding.convert import read_labels

    return {it["item_id"]: it for it in read_labels(uri, fmt, opts).items}


def score(store, gold: dict[str, dict], version: int | None = None,
          iou: float = IOU) -> dict[str, dict]:
    """``{reviewer: {"gold_items", "acc50", "decision_accuracy"}}`` of every reviewer who
    decided a gold item (as of ``version``)."""
    per: dict[str, list[tuple[bool, bool]]] = {}
    for r in store.annotations(version).to_pylist():
        g = gold.get(r["item_id"])
        if g is None:
            continue
        truth = {"decision": "correct", "boxes": g["boxes"]}
        right = not disagree(r, truth, iou)
        due = ("accept" if r.get("predicted_boxes") is not None and not disagree(
            {"decision": "correct", "boxes": r["predicted_boxes"]}, truth, iou) else "correct")
        per.setdefault(str(r["reviewer"]), []).append((right, r["decision"] == due))
    return {who: {"gold_items": len(v), "acc50": sum(a for a, _ in v) / len(v),
                  "decision_accuracy": sum(d for _, d in v) / len(v)}
            for who, v in sorted(per.items())}


def excluded_reviewers(store, gold: dict[str, dict], min_accuracy: float,
                       version: int | None = None, iou: float = IOU) -> set[str]:
    """The reviewers whose Acc@0.5 on gold is below ``min_accuracy``."""
    return {who for who, s in score(store, gold, version, iou).items()
            if s["acc50"] < min_accuracy}
