"""What a job produced: rows, errors by code, speed, and (with true boxes) Acc@0.5.

Used at the end of every job and by ``groundlabel eval``. Reads only a few columns of the
Parquet parts.
"""

from __future__ import annotations

import json
from collections import Counter

from grounding.storage import StorageOptions, filesystem, join


def read_output(output: str, opts: StorageOptions | None = None, columns: list[str] | None = None):
    """All parts of a job output (or one Parquet file) as one pyarrow table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines import schema
    from pipelines.stages.write import list_parts

    opts = opts or StorageOptions()
    fs, path = filesystem(output, opts)
    files = [path] if fs.isfile(path) else list_parts(output, opts)
    tables = []
    for p in files:
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(f, columns=columns))
    if not tables:
        sch = schema.OUTPUT if columns is None else pa.schema([schema.OUTPUT.field(c) for c in columns])
        return sch.empty_table()
    return pa.concat_tables(tables)


def metrics_from_rows(rows: list[dict], gold_by_key: dict | None = None) -> dict | None:
    """Acc@0.5 / mean IoU / parse-failure rate over rows that have a true box."""
    from grounding.boxes import Box
    from grounding.metrics import grounding_metrics

    pairs = []
    for r in rows:
        gold = (gold_by_key or {}).get(r.get("source_id") or r["row_id"], r.get("gold"))
        if gold is None:
            continue
        first = r["boxes"][0] if r.get("boxes") else None
        pred = Box.from_list([first[k] for k in ("x1", "y1", "x2", "y2")]) if first else None
        pairs.append((pred, Box.from_list(gold)))
    return grounding_metrics(pairs) if pairs else None


def summarize(output: str, opts: StorageOptions, elapsed: float | None = None,
              rows_before: int = 0, write: bool = True) -> dict:
    t = read_output(output, opts, ["row_id", "source_id", "status", "error_code", "boxes", "gold"])
    rows = t.to_pylist()
    ids = [r["row_id"] for r in rows]
    out = {
        "output": output,
        "rows": len(rows),
        "unique_rows": len(set(ids)),
        "labeled": sum(r["error_code"] is None for r in rows),
        "status": dict(Counter(r["status"] for r in rows)),
        "errors": dict(Counter(r["error_code"] for r in rows if r["error_code"])),
    }
    if elapsed is not None:
        new = len(rows) - rows_before
        out.update(rows_this_run=new, seconds=round(elapsed, 1),
                   rows_per_s=round(new / elapsed, 2) if elapsed > 0 else None)
    m = metrics_from_rows(rows)
    if m:
        out["metrics"] = m
    if write:
        fs, path = filesystem(join(output, "_summary.json"), opts)
        with fs.open(path, "w") as f:
            json.dump(out, f, indent=2)
    return out


def evaluate(pred: str, gold: str | None = None, opts: StorageOptions | None = None) -> dict:
    """Acc@0.5, mean IoU and parse-failure rate of a labeled output.

    True boxes come from ``gold`` (input shards in any input format, matched on the row's
    ``id`` if it has one, else on ``row_id``) or, without ``gold``, from the output's own
    ``gold`` column (the input's boxes carried through the job).
    """
    from grounding.formats import read_shard
    from pipelines.label import list_shards

    opts = opts or StorageOptions()
    rows = read_output(pred, opts, ["row_id", "source_id", "boxes", "gold", "width",
                                    "height"]).to_pylist()
    gold_by_key = None
    if gold:
        size = {r["row_id"]: (r["width"], r["height"]) for r in rows}
        gold_by_key = {}
        for uri, rel in list_shards(gold, opts):
            fs, path = filesystem(uri, opts)
            for g in read_shard(fs, path, rel):
                if g["gold"] is None or g["error_code"]:
                    continue
                box = g["gold"]
                if g["gold_type"] in ("norm1", "norm1000"):
                    w, h = size.get(g["row_id"]) or (None, None)
                    if w is None:
                        continue
                    k = 1.0 if g["gold_type"] == "norm1" else 1000.0
                    box = [box[0] * w / k, box[1] * h / k, box[2] * w / k, box[3] * h / k]
                gold_by_key[g["source_id"] or g["row_id"]] = box
        rows = [r for r in rows if (r["source_id"] or r["row_id"]) in gold_by_key]
    m = metrics_from_rows(rows, gold_by_key) or {"n": 0}
    return dict(m, pred=pred, gold=gold or "(the output's gold column)")
