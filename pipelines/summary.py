"""What a job produced: rows, errors by code, speed, and (with true boxes) Acc@0.5.

Used at the end of every job (a sum over the output table's commit records, no data read) and
by ``groundlabel eval`` (reads the boxes), through `pipelines.output.JobOutput`.

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


def _pairs(rows, gold_by_key: dict | None = None):
    """(first predicted box or None, true box) of each row that has a true box; boxes are xyxy
    in pixels of the original image, as the output stores them."""
    from grounding.boxes import Box

    for r in rows:
        gold = (gold_by_key or {}).get(r.get("source_id") or r["row_id"], r.get("gold"))
        if gold is None:
            continue
        first = r["boxes"][0] if r.get("boxes") else None
        pred = Box.from_list([first[k] for k in ("x1", "y1", "x2", "y2")]) if first else None
        yield pred, Box.from_list(gold)


def metrics_from_rows(rows: list[dict], gold_by_key: dict | None = None) -> dict | None:
    """Acc@0.5 / mean IoU / parse-failure rate over rows that have a true box."""
    from grounding.metrics import grounding_metrics

    m = grounding_metrics(_pairs(rows, gold_by_key))
    return m if m["n"] else None


# Start-up phases: (name, from mark, to mark). Driver marks come from `pipelines.label.label`,
# actor marks from `pipelines.stages.infer.Infer` (the actor that wrote rows first).
PHASES = (
    ("python_and_imports", "process_start", "label_called"),
    ("plan", "label_called", "planned"),
    ("ray_init", "planned", "ray_connected"),
    ("dataset_planning", "ray_connected", "pipeline_started"),
    ("actor_scheduling", "pipeline_started", "actor_init"),
    ("vllm_import", "actor_init", "vllm_imported"),
    ("engine_init", "vllm_imported", "engine_started"),
    ("adapters", "engine_started", "engine_ready"),
    ("wait_for_rows", "engine_ready", "first_rows_in"),
    ("first_block", "first_rows_in", "first_rows_out"),
    ("to_first_part", "first_rows_out", "first_part"),
)


def startup_breakdown(marks: dict[str, float | None], actors: list[dict]) -> dict:
    """Where a job's start went: seconds per phase, and each mark's time since the start.

    ``marks`` are the driver's (epoch seconds), ``actors`` each inference actor's own; the
    actor that wrote rows first stands for the pool (the first part waits for it). Phases
    overlap nothing on the driver's side; actor phases run while the driver waits in
    ``dataset_planning``/``actor_scheduling``, so only the actor's part of the chain is shown.
    A worker process Ray started before the actor shows as ``worker_process`` < ``actor_init``.
    """
    first = min(actors, key=lambda a: a.get("first_rows_out", float("inf")), default={})
    t = {k: v for k, v in {**marks, **first}.items() if v is not None}
    origin = t["process_start"]
    out: dict = {"origin": "process start" if origin < t["label_called"] else "label() call",
                 "to_first_part_s": round(t["first_part"] - origin, 2) if "first_part" in t
                 else None,
                 "phases_s": {}, "timeline_s": {}, "actors": len(actors)}
    for name, a, b in PHASES:
        if a in t and b in t:
            out["phases_s"][name] = round(t[b] - t[a], 2)
    for k, v in sorted(t.items(), key=lambda kv: kv[1]):
        out["timeline_s"][k] = round(v - origin, 2)
    return out


def summarize(output: JobOutput, elapsed: float | None = None, rows_before: int = 0,
              write: bool = True, startup: dict | None = None) -> dict:
    """Counts (and metrics) of the output table's current version, written to
    ``_summary.json`` with the run's start-up breakdown (`startup_breakdown`) when given.

    A sum over the commit records of the current files (`JobOutput.progress`): no data file is
    read, so it takes the same memory at 1,000 rows as at 100 million. ``unique_rows`` counts
    rows of distinct pieces (a piece is committed once, so it equals ``rows`` unless someone
    wrote to the table around our commits); ``table_rows`` is the table's own count (file
    statistics), a cross-check."""
    from grounding import tables

    prog = output.progress()
    status: Counter = Counter()
    errors: Counter = Counter()
    gold: Counter = Counter()
    labeled = 0
    for rec in prog.files.values():
        status.update(rec["status"])
        errors.update(rec["errors"])
        gold.update(rec["gold"])
        labeled += rec["labeled"]
    n = prog.rows
    overlap_rows = prog.overlaps()
    out = {
        "output": output.uri,
        "table_version": prog.version,
        "rows": n,
        "unique_rows": n if not overlap_rows else None,
        "table_rows": tables.row_count(output.table()) if output.exists() else n,
        "labeled": labeled,
        "status": dict(status),
        "errors": dict(errors),
    }
    if overlap_rows:
        out["pieces_claimed_twice"] = overlap_rows
    out["errors_transient"] = sum(v for k, v in out["errors"].items() if k in TRANSIENT)
    out["errors_permanent"] = sum(v for k, v in out["errors"].items() if k not in TRANSIENT)
    if elapsed is not None:
        new = n - rows_before
        out.update(rows_this_run=new, seconds=round(elapsed, 1),
                   rows_per_s=round(new / elapsed, 2) if elapsed > 0 else None)
    if gold["n"]:
        d = gold["n"]
        out["metrics"] = {"n": d, "acc@0.5": gold["hits"] / d, "mean_iou": gold["iou"] / d,
                          "parse_fail_rate": gold["fails"] / d}
    if startup is not None:
        out["startup"] = startup
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
