"""Label formats in and out: one module per format, one record (`grounding.labels`) between them.

| format        | file                  | boxes on disk                         | sizes on disk | one row is          |
|---------------|-----------------------|---------------------------------------|---------------|---------------------|
| ``seed``      | JSONL                 | ``bbox``/``bboxes`` xyxy pixels       | optional      | an item             |
| ``swift``     | ms-swift JSONL        | ``objects.bbox`` xyxy, ``bbox_type`` real (or norm1 in) | no | an image, its refs |
| ``coco``      | COCO detection JSON   | ``bbox`` xywh pixels                  | yes           | an annotation       |
| ``parquet``   | Parquet               | ``boxes`` list of xyxy pixels         | yes           | an item             |
| ``labelstudio``| Label Studio JSON    | ``value`` x/y/width/height in percent of ``original_width/height`` | yes | a task |

Readers are strict with structure: they collect every problem and raise one
`grounding.labels.LabelFormatError`, writing nothing, unless asked to skip invalid rows (then
they return the rejects too, so nothing is lost). Writers never write image bytes unless
``embed_images`` is asked for (then a metadata-free PNG, as a ``data:`` URI).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from grounding.storage import StorageOptions, filesystem


@dataclass
class ReadResult:
    """What a reader found: usable items, and the rejected rows with their problems."""

    items: list[dict]
    rejects: list[dict]  # {"where": ..., "problems": [...], "row": original JSON-able row}


def _registry() -> dict[str, tuple[Callable, Callable]]:
    from grounding.convert import coco, labelstudio, parquet, seed, swift

    return {"seed": (seed.read, seed.write), "swift": (swift.read, swift.write),
            "coco": (coco.read, coco.write), "parquet": (parquet.read, parquet.write),
            "labelstudio": (labelstudio.read, labelstudio.write)}


FORMATS = ("seed", "swift", "coco", "parquet", "labelstudio")


def read_labels(uri: str, fmt: str, opts: StorageOptions | None = None,
                skip_invalid: bool = False, **kw) -> ReadResult:
    """Labeled items of a file in ``fmt``. Raises LabelFormatError on any problem unless
    ``skip_invalid`` (then problems come back as ``rejects``)."""
    from grounding.labels import LabelFormatError

    reader = _registry()[_check(fmt)][0]
    fs, path = filesystem(uri, opts)
    if not fs.exists(path):
        raise FileNotFoundError(f"{uri}: no such file")
    res = reader(fs, path, **kw)
    _check_inside(res)
    if res.rejects and not skip_invalid:
        raise LabelFormatError(uri, [f"{r['where']}: {p}" for r in res.rejects
                                     for p in r["problems"]])
    return res


def _check_inside(res: ReadResult) -> None:
    """Every reader's items, checked against their image size where it is known: a box more
    than 0.5 px outside the image is a problem (the item is refused, never bent to fit); within
    that tolerance (rounding) it is clipped to the image."""
    from grounding.labels import clamp, outside

    kept = []
    for it in res.items:
        w, h = it.get("width"), it.get("height")
        bad = [b for b in it["boxes"] if outside(b, w, h)]
        if bad:
            res.rejects.append({"where": f"item {it['item_id']}", "problems": [
                f"box {[round(c, 1) for c in b]} reaches outside the {w}x{h} image"
                for b in bad], "row": {k: v for k, v in it.items() if not k.startswith("_")}})
            continue
        if w and h:
            it["boxes"] = [clamp(b, w, h) for b in it["boxes"]]
        kept.append(it)
    res.items[:] = kept


def write_labels(items: list[dict], uri: str, fmt: str, opts: StorageOptions | None = None,
                 embed_images: bool = False, blur_faces: bool = False, **kw) -> str:
    """Write labeled items to ``uri`` in ``fmt``; returns ``uri``. ``blur_faces`` blurs faces
    in the embedded images (`grounding.faces`)."""
    writer = _registry()[_check(fmt)][1]
    if blur_faces and not embed_images:
        raise ValueError("--blur-faces needs --embed-images: without it no image bytes are "
                         "written, only references")
    if embed_images:
        pngs = embed_all(items, uri, opts, blur_faces)
        if fmt == "labelstudio":
            kw["image_url"] = pngs.__getitem__  # keeps our ref in data.image_ref
        else:
            items = [dict(it, image=pngs[it["image"]]) for it in items]
    fs, path = filesystem(uri, opts)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    writer(items, fs, path, **kw)
    return uri


def _check(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return fmt


def embedded(ref: str | None, opts: StorageOptions | None = None,
             blur_faces: bool = False) -> str | None:
    """The image as a ``data:image/png`` URI of a fresh RGB PNG: pixels only, no EXIF/GPS;
    with ``blur_faces``, detected faces blurred (`grounding.faces.blur_faces`)."""
    import base64
    import io

    from grounding.images import decode, read_bytes

    if not ref or ref.startswith("inline:") or (ref.startswith("data:") and not blur_faces):
        return ref  # inline: no bytes kept; data: already bytes, unchanged unless blurred
    img = decode(read_bytes(ref, opts)).convert("RGB")
    if blur_faces:
        from grounding.faces import blur_faces as blur

        img, _ = blur(img)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def embed_all(items: list[dict], where: str, opts: StorageOptions | None = None,
              blur_faces: bool = False) -> dict:
    """``{ref: data URI}`` for every item's image; raises LabelFormatError listing every image
    that cannot be read (nothing is written then)."""
    from grounding.images import ImageError
    from grounding.labels import LabelFormatError

    out, problems = {}, []
    for it in items:
        ref = it["image"]
        if ref in out:
            continue
        try:
            out[ref] = embedded(ref, opts, blur_faces)
        except ImageError as e:
            problems.append(f"item {it['item_id']}: cannot embed its image: {e}")
    if problems:
        raise LabelFormatError(where, problems)
    return out


def fill_sizes(items: list[dict], opts: StorageOptions | None = None) -> list[str]:
    """Fill missing width/height from the image headers, as displayed (EXIF orientation
    applied: the frame boxes are drawn in); returns problems for images that cannot be read."""
    from grounding.images import ImageError, displayed_size, read_bytes

    problems = []
    for it in items:
        if it.get("width") and it.get("height"):
            continue
        ref = it.get("image")
        try:
            if not ref or ref.startswith("inline:"):
                raise ImageError("missing", "no readable image reference")
            it["width"], it["height"] = displayed_size(read_bytes(ref, opts))
        except (ImageError, OSError) as e:
            problems.append(f"item {it['item_id']} ({ref}): image size unknown: {e}")
    return problems


def resolve(ref: str | None, base_dir: str, proto: str) -> str | None:
    """An image reference from a label file, with relative paths taken from the file's folder."""
    if not ref or not isinstance(ref, str):
        return ref
    if ref.startswith(("data:", "inline:", "/")) or "://" in ref[:16]:
        return ref
    base = base_dir if proto in ("file", "local") else f"{proto}://{base_dir}"
    return f"{base.rstrip('/')}/{ref}"


def jsonl_objects(fs, path: str, rejects: list[dict]):
    """``(where, object)`` per non-empty JSONL line; a line that is not JSON becomes a reject."""
    import json

    with fs.open(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"line {i}", json.loads(line)
            except json.JSONDecodeError as e:
                rejects.append({"where": f"line {i}", "problems": [f"not JSON: {e.msg}"],
                                "row": line.rstrip("\n")})


def base_of(fs, path: str) -> tuple[str, str]:
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return (path.rsplit("/", 1)[0] if "/" in path else "."), proto
