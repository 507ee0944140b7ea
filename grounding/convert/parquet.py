"""Parquet: one item per row, the columns of `grounding.labels` (``boxes``: a list of
``[x1, y1, x2, y2]`` (xyxy) pixels of the original image, stored as they are).

Edges, as the shipped guideline states them (grounding/guidelines/default.md): pixels are
continuous, ``x2``/``y2`` are the far edges (one past the last pixel inside), so a box touching
the right and bottom borders of a ``W`` x ``H`` image ends at ``x2 = W``, ``y2 = H``.
"""

from __future__ import annotations

import pyarrow as pa

from grounding.convert import ReadResult, base_of, resolve
from grounding.labels import LINEAGE, item

SCHEMA = pa.schema([
    ("item_id", pa.string()), ("image", pa.string()), ("width", pa.int32()),
    ("height", pa.int32()), ("text", pa.string()), ("boxes", pa.list_(pa.list_(pa.float64()))),
    ("scores", pa.list_(pa.float64())), ("score", pa.float64()),
    *[(k, pa.string()) for k in LINEAGE],
])


def read(fs, path: str) -> ReadResult:
    import pyarrow.parquet as pq

    base_dir, proto = base_of(fs, path)
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    missing = [c for c in ("image", "text", "boxes") if c not in table.column_names]
    if missing:
        return ReadResult([], [{"where": path, "problems": [f"missing columns {missing}; "
                                f"expected at least image, text, boxes"], "row": None}])
    items, rejects = [], []
    for i, r in enumerate(table.to_pylist()):
        problems = []
        if not isinstance(r.get("text"), str) or not r["text"].strip():
            problems.append("text is missing or empty")
        if not r.get("image"):
            problems.append("image is missing")
        if not problems:
            try:
                items.append(item(resolve(r["image"], base_dir, proto), r["text"],
                                  r.get("boxes") or [], width=r.get("width"),
                                  height=r.get("height"), item_id=r.get("item_id"),
                                  scores=r.get("scores"), score=r.get("score"),
                                  **{k: r.get(k) for k in LINEAGE}))
                continue
            except ValueError as e:
                problems.append(str(e))
        rejects.append({"where": f"row {i}", "problems": problems,
                        "row": {k: v for k, v in r.items() if not isinstance(v, bytes)}})
    return ReadResult(items, rejects)


def write(items: list[dict], fs, path: str) -> None:
    import pyarrow.parquet as pq

    t = pa.Table.from_pylist([{f.name: it.get(f.name) for f in SCHEMA} for it in items],
                             schema=SCHEMA)
    with fs.open(path, "wb") as f:
        pq.write_table(t, f)
