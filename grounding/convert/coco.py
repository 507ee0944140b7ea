"""COCO detection JSON, in the grounding layout of MDETR/GLIP ("mixed grounding" files).

``images``: one entry per item: ``id``, ``file_name`` (image reference), ``width``, ``height``,
``caption`` (the referring expression) and our ``item_id``. ``annotations``: one per box,
``bbox`` = ``[x, y, width, height]`` in pixels of the original image (COCO's xywh; we convert
to and from xyxy), ``category_id`` 1 (``"target"``), ``tokens_positive`` = the whole caption.

A plain COCO detection file (images without ``caption``) is read too: each (image, category)
becomes one item whose expression is the category name and whose boxes are that category's.
"""

from __future__ import annotations

import json

from grounding.convert import ReadResult, base_of, resolve
from grounding.labels import item, outside


def read(fs, path: str) -> ReadResult:
    base_dir, proto = base_of(fs, path)
    with fs.open(path, "rt", encoding="utf-8") as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as e:
            return ReadResult([], [{"where": path, "problems": [f"not JSON: {e.msg}"],
                                    "row": None}])
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        return ReadResult([], [{"where": path, "problems": ["not a COCO file (no 'images' list)"],
                                "row": None}])
    images = {}
    rejects = []
    for im in doc["images"]:
        problems = []
        if not isinstance(im, dict) or "id" not in im:
            rejects.append({"where": "images[]", "problems": ["image entry without id"], "row": im})
            continue
        if not im.get("file_name"):
            problems.append("no file_name")
        if not (isinstance(im.get("width"), int | float) and isinstance(im.get("height"), int | float)):
            problems.append("width/height missing")
        if problems:
            rejects.append({"where": f"image id {im['id']}", "problems": problems, "row": im})
        else:
            images[im["id"]] = im
    cats = {c["id"]: c.get("name") for c in doc.get("categories") or [] if isinstance(c, dict)}
    groups: dict[tuple, list] = {}
    bad_images = {r["row"].get("id") for r in rejects if isinstance(r["row"], dict)}
    for ann in doc.get("annotations") or []:
        where = f"annotation id {ann.get('id')}" if isinstance(ann, dict) else "annotations[]"
        if not isinstance(ann, dict):
            rejects.append({"where": where, "problems": ["not an object"], "row": ann})
            continue
        iid = ann.get("image_id")
        if iid not in images:
            if iid not in bad_images:
                rejects.append({"where": where, "problems": [
                    f"image_id {iid!r} is not in 'images' (dangling reference)"], "row": ann})
            continue
        im = images[iid]
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4
                and all(isinstance(v, int | float) for v in bbox) and bbox[2] >= 0 and bbox[3] >= 0):
            rejects.append({"where": where, "problems": [
                f"bbox must be [x, y, width, height] with width, height >= 0, got {bbox!r}"],
                "row": ann})
            continue
        x, y, w, h = (float(v) for v in bbox)
        box = [x, y, x + w, y + h]
        if outside(box, im["width"], im["height"]):
            rejects.append({"where": where, "problems": [
                f"box {box} reaches outside the {im['width']}x{im['height']} image"], "row": ann})
            continue
        if im.get("caption"):
            key = (iid, None)
        else:
            if ann.get("category_id") not in cats:
                rejects.append({"where": where, "problems": [
                    f"category_id {ann.get('category_id')!r} is not in 'categories'"], "row": ann})
                continue
            key = (iid, ann["category_id"])
        groups.setdefault(key, []).append((box, ann.get("score")))
    items = []
    for iid, im in images.items():
        keys = [k for k in groups if k[0] == iid]
        if im.get("caption"):
            keys = keys or [(iid, None)]  # a captioned image without boxes: "no such object"
        for key in keys:
            boxes = groups.get(key, [])
            text = im["caption"] if key[1] is None else str(cats[key[1]])
            scores = [s for _, s in boxes]
            items.append(item(resolve(im["file_name"], base_dir, proto), text,
                              [b for b, _ in boxes], width=int(im["width"]),
                              height=int(im["height"]),
                              item_id=im.get("item_id") if key[1] is None else None,
                              scores=scores if all(s is not None for s in scores) and scores else None,
                              score=im.get("score")))
    return ReadResult(items, rejects)


def write(items: list[dict], fs, path: str) -> None:
    from grounding.convert import fill_sizes

    problems = fill_sizes(items)
    if problems:
        from grounding.labels import LabelFormatError

        raise LabelFormatError(path, ["COCO needs image sizes: " + p for p in problems])
    images, anns = [], []
    for i, it in enumerate(items, 1):
        images.append({"id": i, "file_name": it["image"], "width": it["width"],
                       "height": it["height"], "caption": it["text"], "item_id": it["item_id"],
                       **({"score": it["score"]} if it.get("score") is not None else {})})
        for k, b in enumerate(it["boxes"]):
            ann = {"id": len(anns) + 1, "image_id": i, "category_id": 1,
                   "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                   "area": (b[2] - b[0]) * (b[3] - b[1]), "iscrowd": 0,
                   "tokens_positive": [[0, len(it["text"])]]}
            if it.get("scores"):
                ann["score"] = it["scores"][k]
            anns.append(ann)
    doc = {"info": {"description": "groundlabel export (MDETR/GLIP grounding layout)"},
           "images": images, "annotations": anns,
           "categories": [{"id": 1, "name": "target", "supercategory": "object"}]}
    with fs.open(path, "wt", encoding="utf-8") as f:
        json.dump(doc, f)
