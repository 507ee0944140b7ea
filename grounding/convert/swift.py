"""ms-swift grounding JSONL: one line per image, its expressions and boxes in ``objects``.

``{"messages": [{"role": "user", "content": "<image>Find <ref-object>"},
{"role": "assistant", "content": "<bbox>"}], "images": [IMAGE],
"objects": {"ref": [TEXT, ...], "bbox": [[x1, y1, x2, y2], ...], "bbox_type": "real"}}``

ms-swift fills the placeholders in order: each ``<ref-object>`` takes the next ``ref``, each
``<bbox>`` the next ``bbox``. We write one user/assistant turn per item, with as many
``<bbox>`` as the item has boxes (an item with none answers ``None``), and read the turns back
the same way. Lines without placeholders pair ``ref[k]`` with ``bbox[k]``. ``bbox_type``
``real`` is pixels of the original image, ``[x1, y1, x2, y2]`` (xyxy); ``norm1`` (0-1) is read
too, with sizes from the image header (to a millionth of a pixel, `grounding.labels.snap`).

Edges, as the shipped guideline states them (grounding/guidelines/default.md): pixels are
continuous, ``x2``/``y2`` are the far edges (one past the last pixel inside), so a box touching
the right and bottom borders of a ``W`` x ``H`` image ends at ``x2 = W``, ``y2 = H``.
"""

from __future__ import annotations

import json

from grounding.convert import ReadResult, base_of, fill_sizes, jsonl_objects, resolve
from grounding.labels import item, snap

PROMPT = "Find <ref-object>"


def _pairs(obj: dict) -> list[tuple[str, list]]:
    """(ref, boxes) in placeholder order."""
    objects = obj.get("objects") or {}
    refs, boxes = list(objects.get("ref") or []), list(objects.get("bbox") or [])
    msgs = obj.get("messages") or []
    n_ref = sum(str(m.get("content", "")).count("<ref-object>") for m in msgs
                if isinstance(m, dict))
    if not n_ref:
        merged: dict[str, list] = {}
        for k, ref in enumerate(refs):
            merged.setdefault(ref, []).extend([boxes[k]] if k < len(boxes) else [])
        return list(merged.items())
    out: list[tuple[str, list]] = []
    ri = bi = 0
    for m in msgs:
        if not isinstance(m, dict):
            continue
        content = str(m.get("content", ""))
        if m.get("role") == "user":
            for _ in range(content.count("<ref-object>")):
                out.append((refs[ri] if ri < len(refs) else None, []))
                ri += 1
        elif m.get("role") == "assistant" and out:
            for _ in range(content.count("<bbox>")):
                out[-1][1].append(boxes[bi] if bi < len(boxes) else None)
                bi += 1
    return out


def read(fs, path: str) -> ReadResult:
    base_dir, proto = base_of(fs, path)
    items, rejects = [], []
    for where, obj in jsonl_objects(fs, path, rejects):
        problems, found = _parse(obj, base_dir, proto)
        if problems:
            rejects.append({"where": where, "problems": problems, "row": obj})
        else:
            items.extend(found)
    norm = [it for it in items if it.pop("_norm1", False)]
    problems = fill_sizes(norm)
    for it in norm:
        if it.get("width"):
            w, h = it["width"], it["height"]
            it["boxes"] = [[snap(b[0] * w), snap(b[1] * h), snap(b[2] * w), snap(b[3] * h)]
                           for b in it["boxes"]]
    if problems:
        rejects.append({"where": path, "problems": problems, "row": None})
        items = [it for it in items if it not in norm or it.get("width")]
    return ReadResult(items, rejects)


def _parse(obj, base_dir: str, proto: str) -> tuple[list[str], list[dict]]:
    if not isinstance(obj, dict) or "objects" not in obj:
        return ["not an ms-swift grounding row (no 'objects')"], []
    images = obj.get("images") or []
    if len(images) != 1:
        return [f"expected exactly 1 image, got {len(images)}"], []
    image = images[0].get("path") if isinstance(images[0], dict) else images[0]
    if not image:
        return ["image is missing"], []
    btype = (obj.get("objects") or {}).get("bbox_type", "real")
    if btype not in ("real", "norm1"):
        return [f"bbox_type must be real or norm1, got {btype!r}"], []
    problems, out = [], []
    for ref, boxes in _pairs(obj):
        if not isinstance(ref, str) or not ref.strip():
            problems.append(f"a <ref-object> has no ref text ({ref!r})")
            continue
        if any(b is None for b in boxes):
            problems.append(f"ref {ref!r}: more <bbox> placeholders than boxes")
            continue
        try:
            it = item(resolve(image, base_dir, proto), ref, boxes)
        except ValueError as e:
            problems.append(f"ref {ref!r}: {e}")
            continue
        if btype == "norm1":
            it["_norm1"] = True
        out.append(it)
    return problems, out


def write(items: list[dict], fs, path: str) -> None:
    by_image: dict[str, list[dict]] = {}
    for it in items:
        by_image.setdefault(it["image"], []).append(it)
    with fs.open(path, "wt", encoding="utf-8") as f:
        for image, group in by_image.items():
            msgs, refs, boxes = [], [], []
            for k, it in enumerate(group):
                msgs.append({"role": "user", "content": ("<image>" if k == 0 else "") + PROMPT})
                msgs.append({"role": "assistant",
                             "content": "".join("<bbox>" for _ in it["boxes"]) or "None"})
                refs.append(it["text"])
                boxes.extend(it["boxes"])
            row = {"messages": msgs, "images": [image],
                   "objects": {"ref": refs, "bbox": boxes, "bbox_type": "real"}}
            f.write(json.dumps(row) + "\n")
