"""Seed JSONL: one item per line.

``{"id": ..., "image": ..., "text": ..., "bbox": [x1, y1, x2, y2], "bboxes": [[...], ...],
"bbox_type": "real", "width": W, "height": H, "score": s, "job_id": ...}``

``bbox`` is the first box (what labeling jobs read as the true box); ``bboxes`` holds all of
them and wins when both are present. Boxes are xyxy pixels of the original image
(``bbox_type`` ``real``), or 0-1 (``norm1``) / 0-1000 (``norm1000``) of it, which need
``width`` and ``height`` (read back to a millionth of a pixel, `grounding.labels.snap`).

Edges, as the shipped guideline states them (grounding/guidelines/default.md): pixels are
continuous, ``x2``/``y2`` are the far edges (one past the last pixel inside), so a box touching
the right and bottom borders of a ``W`` x ``H`` image ends at ``x2 = W``, ``y2 = H``.
"""

from __future__ import annotations

import json

from grounding.convert import ReadResult, base_of, jsonl_objects, resolve
from grounding.labels import LINEAGE, item, snap

SCALE = {"real": None, "norm1": 1.0, "norm1000": 1000.0}


def parse_row(obj, where: str, base_dir: str, proto: str) -> tuple[dict | None, list[str]]:
    if not isinstance(obj, dict):
        return None, [f"expected a JSON object, got {type(obj).__name__}"]
    problems = []
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        problems.append("text is missing or empty")
    if not obj.get("image"):
        problems.append("image is missing")
    raw = obj.get("bboxes")
    if raw is None:
        raw = [obj["bbox"]] if obj.get("bbox") is not None else []
    btype = obj.get("bbox_type", "real")
    w, h = obj.get("width"), obj.get("height")
    if btype not in SCALE:
        problems.append(f"bbox_type must be one of {list(SCALE)}, got {btype!r}")
    elif SCALE[btype] and not (w and h):
        problems.append(f"bbox_type {btype} needs width and height")
    boxes = []
    for b in raw if isinstance(raw, list) else [raw]:
        try:
            if btype in SCALE and SCALE[btype] and w and h:
                k = SCALE[btype]
                b = [snap(b[0] * w / k), snap(b[1] * h / k), snap(b[2] * w / k), snap(b[3] * h / k)]
            boxes.append(b)
        except (TypeError, IndexError, KeyError):
            problems.append(f"bbox is not 4 numbers: {b!r}")
    if problems:
        return None, problems
    try:
        rec = item(resolve(obj["image"], base_dir, proto), text, boxes, width=w, height=h,
                   item_id=_str(obj.get("id")), score=obj.get("score"),
                   scores=obj.get("scores"), **{k: obj.get(k) for k in LINEAGE})
    except ValueError as e:
        return None, [str(e)]
    return rec, []


def _str(v) -> str | None:
    return None if v is None else str(v)


def read(fs, path: str) -> ReadResult:
    base_dir, proto = base_of(fs, path)
    items, rejects = [], []
    for where, obj in jsonl_objects(fs, path, rejects):
        rec, problems = parse_row(obj, where, base_dir, proto)
        if problems:
            rejects.append({"where": where, "problems": problems, "row": obj})
        else:
            items.append(rec)
    return ReadResult(items, rejects)


def to_row(it: dict) -> dict:
    row = {"id": it["item_id"], "image": it["image"], "text": it["text"]}
    if len(it["boxes"]) >= 1:
        row["bbox"] = it["boxes"][0]
    row["bboxes"] = it["boxes"]
    row["bbox_type"] = "real"
    for k in ("width", "height", "score", "scores", *LINEAGE):
        if it.get(k) is not None:
            row[k] = it[k]
    return row


def write(items: list[dict], fs, path: str) -> None:
    with fs.open(path, "wt", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(to_row(it)) + "\n")
