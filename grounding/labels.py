"""Labeled items: the one record every label format converts to and from.

A *labeled item* is one (image, referring expression) pair with its boxes:

| field          | meaning                                                                   |
|----------------|---------------------------------------------------------------------------|
| item_id        | stable key of the pair: ``item_key(image, text)`` unless the source has its own |
| image          | image reference (URI or path); ``inline:sha256:...`` for inline images (never bytes) |
| width, height  | original image size in pixels (None when the source does not say)         |
| text           | the referring expression                                                  |
| boxes          | list of ``[x1, y1, x2, y2]``: float pixels of the ORIGINAL image, xyxy; may be empty ("no such object") |
| scores         | per-box confidence (0-1) for predictions, else None                      |
| score          | answer confidence of the whole prediction, else None                     |
| lineage        | job_id, row_id, model, adapter, prompt_version, family of the prediction, when known |

Every converter (`grounding.convert`) reads and writes lists of these dicts, so a box goes
through exactly one conversion per format, to or from original pixels.
"""

from __future__ import annotations

import hashlib
import math
import posixpath
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

LINEAGE = ("job_id", "row_id", "model", "adapter", "prompt_version", "family")
FIELDS = ("item_id", "image", "width", "height", "text", "boxes", "scores", "score", *LINEAGE)


class LabelFormatError(ValueError):
    """A label file that cannot be converted without losing or inventing labels.

    ``problems`` lists every problem found (``where: what``), not only the first, so a user
    can fix a file in one pass. Nothing is written when this is raised.
    """

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        head = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{source}: {len(problems)} problem(s):\n  {head}{more}")


def item_key(image: str | None, text: str) -> str:
    """Stable id of an (image, expression) pair: the same pair labeled by two jobs is one item."""
    h = hashlib.sha256(f"{image or ''}\x00{text.strip()}".encode()).hexdigest()
    return h[:24]


def inline_ref(data: bytes) -> str:
    """What stands in for inline image bytes in every output: their hash, never the bytes."""
    return "inline:sha256:" + hashlib.sha256(data).hexdigest()


def is_inline(ref: str | None) -> bool:
    """True for image references that ARE the image (data: URIs, base64 text)."""
    if not ref:
        return False
    from grounding.images import is_base64_image

    if ref.startswith("data:") or is_base64_image(ref):
        return True
    if "://" in ref[:16] or ref.startswith(("/", "./", "inline:")):
        return False
    return len(ref) > 512 or "." not in ref[-6:]  # as `grounding.formats` tells base64 text


def item(image: str | None, text: str, boxes: list[list[float]], *, width: int | None = None,
         height: int | None = None, item_id: str | None = None, scores: list[float] | None = None,
         score: float | None = None, **lineage: Any) -> dict:
    """A labeled item (see the module table); boxes are validated (4 finite numbers, x1<=x2,
    y1<=y2)."""
    rec = {"item_id": item_id or item_key(image, text), "image": image, "width": width,
           "height": height, "text": text, "boxes": [check_box(b) for b in boxes],
           "scores": scores, "score": score}
    rec.update({k: lineage.get(k) for k in LINEAGE})
    return rec


def check_box(b: Any) -> list[float]:
    """``[x1, y1, x2, y2]`` as floats; raises ValueError (expected vs got) on a wrong shape."""
    if not isinstance(b, list | tuple) or len(b) != 4:
        raise ValueError(f"a box is [x1, y1, x2, y2] (4 numbers), got {b!r}")
    try:
        v = [float(x) for x in b]
    except (TypeError, ValueError):
        raise ValueError(f"a box is 4 numbers, got {b!r}") from None
    if not all(math.isfinite(x) for x in v):
        raise ValueError(f"a box has non-finite coordinates: {b!r}")
    if v[0] > v[2] or v[1] > v[3]:
        raise ValueError(f"a box needs x1 <= x2 and y1 <= y2 (xyxy), got {b!r}")
    return v


def outside(box: list[float], width: int | None, height: int | None, tol: float = 0.5) -> bool:
    """True when ``box`` reaches more than ``tol`` pixels outside a ``width`` x ``height`` image."""
    if width is None or height is None:
        return False
    return (box[0] < -tol or box[1] < -tol or box[2] > width + tol or box[3] > height + tol)


# Pixels are read back from derived numbers (COCO's width, Label Studio's percent, 0-1 and
# 0-1000 coordinates) to this many decimals: floats cannot always give x1 + (x2 - x1) == x2 or
# (x1 / W * 100) * W / 100 == x1 back, and a box at the border must come back at the border.
DECIMALS = 6


def snap(v: float) -> float:
    """A pixel coordinate computed from a derived number, to `DECIMALS` (a millionth of a
    pixel): a box with up to 6 decimals round-trips exactly through every format."""
    return round(float(v), DECIMALS) + 0.0  # + 0.0: never -0.0


def clamp(box: list[float], width: int, height: int) -> list[float]:
    """Box clipped to the image (used only within the tolerance of `outside`)."""
    return [min(max(box[0], 0.0), width), min(max(box[1], 0.0), height),
            min(max(box[2], 0.0), width), min(max(box[3], 0.0), height)]


def from_job_rows(rows: list[dict]) -> list[dict]:
    """Labeled items of a job output's rows (predictions); error rows are left out."""
    out = []
    for r in rows:
        if r.get("error_code"):
            continue
        boxes = [[b["x1"], b["y1"], b["x2"], b["y2"]] for b in r.get("boxes") or []]
        scores = [b.get("score") for b in r.get("boxes") or []]
        it = item(r.get("image"), r["text"], boxes, width=r.get("width"),
                  height=r.get("height"), scores=scores or None, score=r.get("score"),
                  **{k: r.get(k) for k in LINEAGE})
        if r.get("calibrated_score") is not None:  # the job's own calibration, when it had one
            it["calibrated"] = r["calibrated_score"]
        out.append(it)
    return out


# Query parameters of pre-signed links (S3 v2/v4, GCS, Azure SAS): they change per link but
# name the same object, so they are no part of an image's identity.
_SIGNING = ("x-amz-", "x-goog-", "signature", "expires", "awsaccesskeyid", "googleaccessid",
            "sig", "se", "sp", "sv", "sr", "st", "skoid", "sktid", "skt", "ske", "sks", "skv")


def image_key(ref: str | None) -> str | None:
    """The normalised image reference an item is split by (None when the item has none).

    Local paths: ``file://`` dropped, ``.``/``..``/``//`` collapsed (never resolved against the
    working directory, which differs between processes). URIs: scheme and host lower-cased,
    the path collapsed, the query kept without the signing parameters of pre-signed links.
    ``inline:sha256:...`` (images sent as bytes) is already their content hash.
    """
    if not ref or not ref.strip():
        return None
    ref = ref.strip()
    if ref.startswith("file://"):
        ref = ref[len("file://"):]
    if "://" not in ref[:16]:
        return posixpath.normpath(ref) if not ref.startswith("inline:") else ref
    u = urlsplit(ref)
    query = urlencode(sorted((k, v) for k, v in parse_qsl(u.query, keep_blank_values=True)
                             if not k.lower().startswith(_SIGNING)))
    path = posixpath.normpath(u.path) if u.path not in ("", "/") else u.path
    return urlunsplit((u.scheme.lower(), u.netloc.lower(), path, query, ""))


def image_unit(item: dict) -> float:
    """Where ``item``'s image falls in [0, 1): sha256 of its `image_key` (its item_id when it
    has no image). The same in every process and store version; every item of one image gets
    the same number, so splits by it (the gate's held-out set, calibration's) never put one
    image on both sides."""
    key = image_key(item.get("image")) or f"item:{item['item_id']}"
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
