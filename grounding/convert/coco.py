"""COCO detection JSON, in the grounding layout of MDETR/GLIP ("mixed grounding" files).

``images``: one entry per item: ``id``, ``file_name`` (image reference), ``width``, ``height``,
``caption`` (the referring expression) and our ``item_id``. ``annotations``: one per box,
``bbox`` = ``[x, y, width, height]`` in pixels of the original image (COCO's xywh), which is
``[x1, y1, x2 - x1, y2 - y1]`` of our xyxy box (`to_xywh` / `from_xywh`), ``category_id`` 1
(``"target"``), ``tokens_positive`` = the whole caption.

Edges, as the shipped guideline states them (grounding/guidelines/default.md): pixels are
continuous, ``x2``/``y2`` are the far edges (one past the last pixel inside), so a box touching
the right border of a ``W``-wide image has ``x + width = W``. Read boxes are rounded to a
millionth of a pixel (`grounding.labels.snap`): the round trip is exact.

A plain COCO detection file (images without ``caption``) is read too: each (image, category)
becomes one item whose expression is the category name and whose boxes are that category's.
"""

from __future__ import annotations

import json

from grounding.convert import ReadResult, base_of, resolve
from grounding.labels import item, outside, snap


def read(fs, path: str) -> ReadResult:
    base_dir, proto = base_of(fs, path)
    doc = _load(fs, path)
    if isinstance(doc, ReadResult):
        return doc
    images, rejects = _index_images(doc["images"])
    cats = _index_categories(doc)
    groups, tainted = _group_annotations(doc, images, cats, rejects)
    return ReadResult(_items(images, cats, groups, tainted, base_dir, proto, rejects), rejects)


def _reject(where: str, problem: str, row) -> dict:
    return {"where": where, "problems": [problem], "row": row}


def _load(fs, path: str) -> dict | ReadResult:
    """The top-level JSON object, or a ReadResult refusing the whole file."""
    with fs.open(path, "rt", encoding="utf-8") as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as e:
            return ReadResult([], [_reject(path, f"not JSON: {e.msg}", None)])
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        return ReadResult([], [_reject(path, "not a COCO file (no 'images' list)", None)])
    return doc


def _index_images(entries: list) -> tuple[dict, list[dict]]:
    """Usable images by id (in file order), and the rejected image entries."""
    images, rejects = {}, []
    for im in entries:
        if not isinstance(im, dict) or "id" not in im:
            rejects.append(_reject("images[]", "image entry without id", im))
            continue
        problems = _image_problems(im)
        if problems:
            rejects.append({"where": f"image id {im['id']}", "problems": problems, "row": im})
        else:
            images[im["id"]] = im
    return images, rejects


def _image_problems(im: dict) -> list[str]:
    problems = []
    if not im.get("file_name"):
        problems.append("no file_name")
    if not (isinstance(im.get("width"), int | float) and isinstance(im.get("height"), int | float)):
        problems.append("width/height missing")
    return problems


def _index_categories(doc: dict) -> dict:
    """Category names by id."""
    return {c["id"]: c.get("name") for c in doc.get("categories") or [] if isinstance(c, dict)}


def _group_annotations(doc: dict, images: dict, cats: dict,
                       rejects: list[dict]) -> tuple[dict, dict]:
    """Boxes (with their scores) per item key: ``(image id, None)`` for a captioned image,
    ``(image id, category id)`` in plain COCO detection. Bad annotations go to ``rejects``;
    ``tainted`` counts them per item key (such an item is not imported with its other boxes)."""
    groups: dict[tuple, list] = {}
    tainted: dict[tuple, int] = {}
    # Annotations of a rejected image are not reported again as dangling.
    bad_images = {r["row"].get("id") for r in rejects if isinstance(r["row"], dict)}
    for ann in doc.get("annotations") or []:
        placed = _place(ann, images, cats, bad_images)
        if isinstance(placed, dict):
            rejects.append(placed)
            key = _key(ann, images, cats)
            if key is not None:
                tainted[key] = tainted.get(key, 0) + 1
        elif placed is not None:
            key, box = placed
            groups.setdefault(key, []).append((box, ann.get("score")))
    return groups, tainted


def _key(ann, images: dict, cats: dict) -> tuple | None:
    """The item a (refused) annotation belongs to, when that can be told."""
    if not isinstance(ann, dict) or ann.get("image_id") not in images:
        return None
    iid = ann["image_id"]
    if images[iid].get("caption"):
        return (iid, None)
    return (iid, ann["category_id"]) if ann.get("category_id") in cats else None


def _place(ann, images: dict, cats: dict, bad_images: set):
    """``(key, xyxy box)`` of one annotation, or its reject, or None to skip it silently."""
    where = f"annotation id {ann.get('id')}" if isinstance(ann, dict) else "annotations[]"
    if not isinstance(ann, dict):
        return _reject(where, "not an object", ann)
    iid = ann.get("image_id")
    if iid not in images:
        if iid not in bad_images:
            return _reject(where, f"image_id {iid!r} is not in 'images' (dangling reference)", ann)
        return None
    im = images[iid]
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4
            and all(isinstance(v, int | float) for v in bbox) and bbox[2] >= 0 and bbox[3] >= 0):
        return _reject(where, "bbox must be [x, y, width, height] with width, height >= 0, "
                       f"got {bbox!r}", ann)
    box = from_xywh(bbox)
    if outside(box, im["width"], im["height"]):
        return _reject(where, f"box {box} reaches outside the {im['width']}x{im['height']} image",
                       ann)
    if im.get("caption"):
        return (iid, None), box
    if ann.get("category_id") not in cats:
        return _reject(where, f"category_id {ann.get('category_id')!r} is not in 'categories'",
                       ann)
    return (iid, ann["category_id"]), box


def _items(images: dict, cats: dict, groups: dict, tainted: dict, base_dir, proto,
           rejects: list[dict]) -> list[dict]:
    """Items in image order, then in the order each image's keys first appeared. An item with
    a refused box is refused whole: without it, its other boxes (or none: "no such object")
    would say something the file did not."""
    items = []
    for iid, im in images.items():
        keys = [k for k in groups if k[0] == iid] + [k for k in tainted if k[0] == iid]
        keys = list(dict.fromkeys(keys))
        if im.get("caption"):
            keys = keys or [(iid, None)]  # a captioned image without boxes: "no such object"
        for key in keys:
            if key in tainted:
                what = f"image id {iid}" + (f", category {key[1]}" if key[1] is not None else "")
                rejects.append(_reject(what, f"{tainted[key]} of its boxes were refused (see "
                                       "above); the rest alone would be a different label, so "
                                       "the item is not imported", im))
                continue
            items.append(_item(im, key, groups.get(key, []), cats, base_dir, proto))
    return items


def _item(im: dict, key: tuple, boxes: list, cats: dict, base_dir, proto) -> dict:
    """One item: the caption (grounding layout) or the category name (plain detection)."""
    text = im["caption"] if key[1] is None else str(cats[key[1]])
    scores = [s for _, s in boxes]
    return item(resolve(im["file_name"], base_dir, proto), text,
                [b for b, _ in boxes], width=int(im["width"]),
                height=int(im["height"]),
                item_id=im.get("item_id") if key[1] is None else None,
                scores=scores if all(s is not None for s in scores) and scores else None,
                score=im.get("score"))


def to_xywh(b: list[float]) -> list[float]:
    """COCO's ``[x, y, width, height]`` of an xyxy box: ``[x1, y1, x2 - x1, y2 - y1]``."""
    return [b[0], b[1], b[2] - b[0], b[3] - b[1]]


def from_xywh(v: list[float]) -> list[float]:
    """The xyxy box of COCO's ``[x, y, width, height]``, to a millionth of a pixel."""
    x, y, w, h = (float(c) for c in v)
    return [snap(x), snap(y), snap(x + w), snap(y + h)]


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
                   "bbox": to_xywh(b),
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
