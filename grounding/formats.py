"""Input rows for labeling jobs: seed JSONL, ms-swift grounding JSONL and Parquet.

Every format becomes the same *input row* (a dict):

| column      | meaning                                                                    |
|-------------|----------------------------------------------------------------------------|
| row_id      | ``"{shard}:{line}"`` (``"{shard}:{line}.{k}"`` for the k-th ms-swift ref); unique and stable across runs, the key of exactly-once |
| shard       | input file, relative to the input root                                     |
| source_id   | the row's own ``id`` field, if it had one                                  |
| image       | image reference: ``s3://`` URI, local path (relative paths are taken from the shard's folder), ``data:`` URI or base64 text; None when ``image_bytes`` is set |
| image_bytes | inline image bytes (Parquet binary column), else None                      |
| text        | the referring expression                                                   |
| gold        | true box ``[x1, y1, x2, y2]`` if given, else None                          |
| gold_type   | ``"real"`` (pixels of the original image) or ``"norm1"`` (0-1 of the image, ms-swift) or ``"norm1000"`` |
| adapter     | per-row LoRA adapter name, or None for the job default                     |
| error_code / error | set when the line itself is unusable (bad JSON, no text ...)       |

Formats:

* seed JSONL: ``{"id"?, "image": ..., "text": ..., "bbox"?: [x1,y1,x2,y2], "adapter"?: ...}``
* ms-swift grounding JSONL: ``{"messages": [...], "images": [...], "objects": {"ref": [...],
  "bbox": [[...]], "bbox_type": "real"|"norm1", "image_id": [...]}}``; one row per ref.
* Parquet: the seed columns; ``image`` may be a binary column (inline bytes).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

INPUT_EXTS = (".jsonl", ".json", ".parquet")


def _row(shard: str, key: str, **kw: Any) -> dict:
    row = {"row_id": f"{shard}:{key}", "shard": shard, "source_id": None, "image": None,
           "image_bytes": None, "text": None, "gold": None, "gold_type": "real",
           "adapter": None, "error_code": None, "error": None}
    row.update(kw)
    return row


def _resolve(image: Any, shard_dir: str) -> tuple[str | None, bytes | None]:
    if isinstance(image, bytes | bytearray):
        return None, bytes(image)
    if isinstance(image, dict):  # {"bytes": ..., "path": ...} as HF datasets write it
        if image.get("bytes"):
            return None, bytes(image["bytes"])
        image = image.get("path")
    if not isinstance(image, str) or not image:
        return None, None
    from grounding.images import is_base64_image

    if is_base64_image(image):
        return image, None
    if image.startswith("data:") or "://" in image[:16] or image.startswith("/"):
        return image, None
    if len(image) > 512 or "." not in image[-6:]:  # base64 text, not a file name
        return image, None
    return f"{shard_dir.rstrip('/')}/{image}", None


def _gold(v: Any) -> list[float] | None:
    if v is None:
        return None
    return [float(x) for x in v]


def rows_from_json(obj: Any, shard: str, line: int, shard_dir: str) -> list[dict]:
    """Input rows of one JSON line (seed or ms-swift)."""
    if not isinstance(obj, dict):
        return [_row(shard, str(line), error_code="bad_row",
                     error=f"expected a JSON object, got {type(obj).__name__}")]
    if "objects" in obj and "images" in obj:
        return _ms_swift(obj, shard, line, shard_dir)
    img, raw = _resolve(obj.get("image"), shard_dir)
    row = _row(shard, str(line), source_id=_str(obj.get("id")), image=img, image_bytes=raw,
               text=obj.get("text"), adapter=obj.get("adapter"),
               gold_type=obj.get("bbox_type", "real"))
    try:
        row["gold"] = _gold(obj.get("bbox"))
    except (TypeError, ValueError):
        row.update(error_code="bad_bbox", error=f"bbox is not a list of numbers: {obj.get('bbox')!r}")
    return [_check(row)]


def _str(v: Any) -> str | None:
    return None if v is None else str(v)


def _ms_swift(obj: dict, shard: str, line: int, shard_dir: str) -> list[dict]:
    objects = obj.get("objects") or {}
    refs = objects.get("ref") or []
    boxes = objects.get("bbox") or []
    images = obj.get("images") or []
    image_ids = objects.get("image_id") or [0] * len(refs)
    btype = objects.get("bbox_type", "real")
    if not refs:
        return [_row(shard, f"{line}.0", error_code="no_text", error="ms-swift row has no refs")]
    out = []
    for k, ref in enumerate(refs):
        idx = image_ids[k] if k < len(image_ids) else 0
        image = images[idx] if isinstance(idx, int) and 0 <= idx < len(images) else None
        if isinstance(image, dict):
            image = image.get("path") or image.get("bytes")
        img, raw = _resolve(image, shard_dir)
        row = _row(shard, f"{line}.{k}", image=img, image_bytes=raw, text=ref, gold_type=btype)
        try:
            row["gold"] = _gold(boxes[k]) if k < len(boxes) else None
        except (TypeError, ValueError):
            row.update(error_code="bad_bbox", error=f"bbox is not a list of numbers: {boxes[k]!r}")
        out.append(_check(row))
    return out


def _check(row: dict) -> dict:
    if row["error_code"]:
        return row
    if row["image"] is None and row["image_bytes"] is None:
        row.update(error_code="no_image", error="row names no image")
    elif not isinstance(row["text"], str) or not row["text"].strip():
        row.update(error_code="empty_text", error="referring expression is empty")
    elif row["gold"] is not None and len(row["gold"]) != 4:
        row.update(error_code="bad_bbox",
                   error=f"bbox needs 4 numbers [x1, y1, x2, y2], got {len(row['gold'])}")
    return row


def read_shard(fs, path: str, shard: str) -> Iterator[dict]:
    """Input rows of one shard file, in file order. Unusable lines become error rows."""
    shard_dir = path.rsplit("/", 1)[0] if "/" in path else "."
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if proto not in ("file", "local"):
        shard_dir = f"{proto}://{shard_dir}"
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        for i, rec in enumerate(table.to_pylist()):
            yield from rows_from_json(rec, shard, i, shard_dir)
        return
    with fs.open(path, "rt", encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield _row(shard, str(i), error_code="bad_json", error=f"line {i + 1}: {e.msg}")
                continue
            yield from rows_from_json(obj, shard, i, shard_dir)
