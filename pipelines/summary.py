"""What a job produced: rows, errors by code, speed, and (with true boxes) Acc@0.5.

Used at the end of every job and by ``groundlabel eval``. Reads only a few columns of the
Parquet parts, through `pipelines.output.JobOutput`.

    groundlabel eval --pred runs/label-1                          # the output's gold column
    groundlabel eval --pred runs/label-1 --gold data/synth/data.jsonl
"""

from __future__ import annotations

from collections import Counter

from pydantic import Field

from grounding.errors import TRANSIENT
from grounding.settings import Settings
from grounding.storage import StorageOptions
from pipelines.output import JobOutput


class EvalConfig(Settings):
    """``groundlabel eval``: Acc@0.5, mean IoU and parse failures of a labeled output."""

    pred: str = Field(description="Job output folder (or one Parquet file).")
    gold: str | None = Field(None, description="Input shards with true boxes (default: the "
                             "output's own gold column, carried from the job input).")
    storage: StorageOptions = Field(default_factory=StorageOptions,
                                    description="Object storage.")


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


def summarize(output: JobOutput, elapsed: float | None = None, rows_before: int = 0,
              write: bool = True) -> dict:
    """Counts (and metrics) of everything in ``output``; written to ``_summary.json``."""
    t = output.read(["row_id", "source_id", "status", "error_code", "boxes", "gold"])
    rows = t.to_pylist()
    ids = [r["row_id"] for r in rows]
    out = {
        "output": output.uri,
        "rows": len(rows),
        "unique_rows": len(set(ids)),
        "labeled": sum(r["error_code"] is None for r in rows),
        "status": dict(Counter(r["status"] for r in rows)),
        "errors": dict(Counter(r["error_code"] for r in rows if r["error_code"])),
    }
    out["errors_transient"] = sum(v for k, v in out["errors"].items() if k in TRANSIENT)
    out["errors_permanent"] = sum(v for k, v in out["errors"].items() if k not in TRANSIENT)
    if elapsed is not None:
        new = len(rows) - rows_before
        out.update(rows_this_run=new, seconds=round(elapsed, 1),
                   rows_per_s=round(new / elapsed, 2) if elapsed > 0 else None)
    m = metrics_from_rows(rows)
    if m:
        out["metrics"] = m
    if write:
        output.write_summary(out)
    return out


def _gold_boxes(gold: str, storage: StorageOptions, size: dict) -> dict:
    """``{source_id or row_id: [x1, y1, x2, y2] in original pixels}`` from input shards."""
    from grounding.formats import read_shard
    from grounding.storage import filesystem
    from pipelines.stages.read import list_shards

    out = {}
    for uri, rel in list_shards(gold, storage):
        fs, path = filesystem(uri, storage)
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
            out[g["source_id"] or g["row_id"]] = box
    return out


def evaluate(cfg: EvalConfig) -> dict:
    """Acc@0.5, mean IoU and parse-failure rate of a labeled output.

    True boxes come from ``gold`` (input shards in any input format, matched on the row's
    ``id`` if it has one, else on ``row_id``) or, without ``gold``, from the output's own
    ``gold`` column (the input's boxes carried through the job).
    """
    rows = JobOutput(cfg.pred, cfg.storage).read(
        ["row_id", "source_id", "boxes", "gold", "width", "height"]).to_pylist()
    gold_by_key = None
    if cfg.gold:
        size = {r["row_id"]: (r["width"], r["height"]) for r in rows}
        gold_by_key = _gold_boxes(cfg.gold, cfg.storage, size)
        rows = [r for r in rows if (r["source_id"] or r["row_id"]) in gold_by_key]
    m = metrics_from_rows(rows, gold_by_key) or {"n": 0}
    return dict(m, pred=cfg.pred, gold=cfg.gold or "(the output's gold column)")
