"""The reviewed-label store: append-only, versioned Parquet in object storage (or a local folder).

One record per review decision. A decision is one of

* ``accept``: the prediction was right; ``boxes`` are the predicted boxes.
* ``correct``: the reviewer drew the right boxes (possibly none: "no such object").
* ``reject``: the item is unusable (ambiguous text, bad image); it is never trained on.
* ``auto``: no person looked: the prediction was auto-accepted because its calibrated score
  cleared a precision target (``groundlabel review export --auto-accept-precision``). It is not
  a training label unless asked for (the model would learn from itself), it never replaces a
  person's decision on the same item, and a person's later decision replaces it (the audit).

Layout under the store root::

    data/<uuid>.parquet      decision records of one append (immutable, never rewritten)
    _log/00000001.json       commit of version 1: which data file, how many records, by whom
    _log/00000002.json       ...

An append writes its data file first, then *creates* the next ``_log`` entry with an exclusive
create (`grounding.atomic`: a hard link of a complete temporary file locally, ``If-None-Match:
*`` on S3, 409 retried). Two importers racing for the same version number: one wins, the other
takes the next number. A store that ignores conditional writes is refused before the first
append. A crash before the commit leaves an
unreferenced data file that no reader sees, so the store is never torn and nothing committed is
lost. Version ``v`` is the first ``v`` commits: a snapshot that never changes, so a retraining
can name exactly the labels it used.

Reading: ``snapshot(version)`` gives the latest decision per ``item_id`` (later commits win;
within a commit, later rows win; a person's decision always wins over ``auto``);
``history(version)`` gives every record, the audit trail.

Boxes are ``[x1, y1, x2, y2]`` float pixels of the original image (xyxy).
"""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pyarrow as pa

from grounding import atomic
from grounding.labels import LINEAGE
from grounding.storage import StorageOptions, filesystem, join

DECISIONS = ("accept", "correct", "reject", "auto")
HUMAN = ("accept", "correct", "reject")
TRAIN = ("accept", "correct")

SCHEMA = pa.schema([
    pa.field("record_id", pa.string(), metadata={"doc": "unique id of this decision"}),
    pa.field("item_id", pa.string(), metadata={"doc": "the (image, text) item decided on"}),
    pa.field("decision", pa.string(), metadata={"doc": "accept | correct | reject | auto"}),
    pa.field("image", pa.string(), metadata={"doc": "image reference, never bytes"}),
    pa.field("width", pa.int32()), pa.field("height", pa.int32()),
    pa.field("text", pa.string()),
    pa.field("boxes", pa.list_(pa.list_(pa.float64())),
             metadata={"doc": "reviewed boxes, xyxy float pixels of the original image"}),
    pa.field("predicted_boxes", pa.list_(pa.list_(pa.float64()))),
    pa.field("predicted_score", pa.float64(), metadata={"doc": "raw answer score"}),
    pa.field("calibrated_score", pa.float64(),
             metadata={"doc": "calibrated P(right) when routed; null otherwise"}),
    pa.field("auto_precision", pa.float64(),
             metadata={"doc": "auto: the precision target it was accepted under"}),
    pa.field("calibration", pa.string(), metadata={"doc": "auto: id of the calibration used"}),
    pa.field("reviewer", pa.string()),
    pa.field("reviewed_at", pa.string(), metadata={"doc": "ISO 8601, UTC"}),
    pa.field("source", pa.string(), metadata={"doc": "label-studio, import:coco, ..."}),
    *[pa.field(k, pa.string()) for k in LINEAGE],
])


def _conform(t: pa.Table) -> pa.Table:
    """A data file as `SCHEMA`: files written before a column existed get it as nulls."""
    for f in SCHEMA:
        if f.name not in t.column_names:
            t = t.append_column(f.name, pa.nulls(len(t), f.type))
    return t.select(SCHEMA.names).cast(SCHEMA)


class StoreError(RuntimeError):
    """The store cannot do what was asked (unknown version, bad record ...)."""


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def decision_record(item: dict, decision: str, *, predicted: dict | None = None,
                    reviewer: str | None = None, reviewed_at: str | None = None,
                    source: str = "api", **route) -> dict:
    """A store record for a decision on a labeled item (`grounding.labels`).

    ``predicted`` is the labeled item of the prediction that was reviewed (lineage and predicted
    boxes come from it when given). ``route``: ``calibrated_score``, ``auto_precision`` and
    ``calibration`` of an auto-accepted or routed prediction.
    """
    if decision not in DECISIONS:
        raise StoreError(f"decision must be one of {DECISIONS}, got {decision!r}")
    pred = predicted or {}
    rec = {"record_id": uuid.uuid4().hex, "item_id": item["item_id"], "decision": decision,
           "image": item.get("image"), "width": item.get("width"), "height": item.get("height"),
           "text": item["text"], "boxes": [list(map(float, b)) for b in item.get("boxes") or []],
           "predicted_boxes": pred.get("boxes"), "predicted_score": pred.get("score"),
           "reviewer": reviewer, "reviewed_at": reviewed_at or _now(), "source": source,
           **{k: route.get(k) for k in ("calibrated_score", "auto_precision", "calibration")}}
    rec.update({k: item.get(k) or pred.get(k) for k in LINEAGE})
    return rec


class ReviewStore:
    """Append-only, versioned reviewed labels at ``uri`` (``s3://bucket/prefix`` or a folder)."""

    def __init__(self, uri: str, opts: StorageOptions | None = None):
        self.uri = uri.rstrip("/")
        self.opts = opts or StorageOptions()
        self.fs, self.root = filesystem(self.uri, self.opts)

    # -- writing -------------------------------------------------------------------------
    def append(self, records: list[dict], *, source: str, note: str | None = None,
               max_tries: int = 1000) -> int:
        """Commit ``records`` (see `decision_record`) as one new version; returns its number."""
        import pyarrow.parquet as pq

        if not records:
            raise StoreError("nothing to append: no records")
        for r in records:
            if r.get("decision") not in DECISIONS:
                raise StoreError(f"record {r.get('record_id')}: decision {r.get('decision')!r} "
                                 f"is not one of {DECISIONS}")
        table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in SCHEMA} for r in records],
                                     schema=SCHEMA)
        atomic.probe(self.fs, self.root, f"reviewed-label store {self.uri}")
        data = f"data/{uuid.uuid4().hex}.parquet"
        self.fs.makedirs(join(self.root, "data"), exist_ok=True)
        self.fs.makedirs(join(self.root, "_log"), exist_ok=True)
        with self.fs.open(join(self.root, data), "wb") as f:
            pq.write_table(table, f)
        version = self.latest() + 1
        for _ in range(max_tries):
            entry = {"version": version, "data": data, "records": len(records),
                     "items": len({r["item_id"] for r in records}),
                     "decisions": {d: sum(r["decision"] == d for r in records) for d in DECISIONS},
                     "source": source, "note": note, "committed_at": _now()}
            try:
                # The exclusive create IS the commit: exactly one writer gets each version.
                atomic.create(self.fs, self._log(version), json.dumps(entry).encode())
                return version
            except FileExistsError:
                version += 1
        raise StoreError(f"could not commit after {max_tries} tries (too many writers?)")

    # -- reading -------------------------------------------------------------------------
    def _log(self, version: int) -> str:
        return join(self.root, "_log", f"{version:08d}.json")

    def versions(self) -> list[dict]:
        """Every commit, oldest first."""
        log = join(self.root, "_log")
        if not self.fs.exists(log):
            return []
        self.fs.invalidate_cache(log)
        out = []
        for p in sorted(self.fs.ls(log, detail=False)):
            if p.endswith(".json"):
                out.append(json.loads(self.fs.cat_file(p)))
        return out

    def latest(self) -> int:
        """The newest version number (0 for an empty store)."""
        v = self.versions()
        return v[-1]["version"] if v else 0

    def history(self, version: int | None = None) -> pa.Table:
        """Every record committed up to ``version`` (default: newest), in commit order, with a
        ``version`` column: the audit trail."""
        import pyarrow.parquet as pq

        commits = self.versions()
        if version is not None:
            if not any(c["version"] == version for c in commits):
                known = f"1..{commits[-1]['version']}" if commits else "none"
                raise StoreError(f"{self.uri} has no version {version} (versions: {known})")
            commits = [c for c in commits if c["version"] <= version]
        tables = []
        for c in commits:
            with self.fs.open(join(self.root, c["data"]), "rb") as f:
                t = _conform(pq.read_table(f))
            tables.append(t.append_column("version", pa.array([c["version"]] * len(t), pa.int64())))
        if not tables:
            return SCHEMA.append(pa.field("version", pa.int64())).empty_table()
        return pa.concat_tables(tables)

    def snapshot(self, version: int | None = None, decisions: tuple[str, ...] = DECISIONS) -> pa.Table:
        """The latest decision per item as of ``version`` (default: newest), then filtered to
        ``decisions`` (``("accept", "correct")`` gives training labels)."""
        hist = self.history(version)
        latest: dict[str, int] = {}
        human: set[str] = set()
        for i, (item, d) in enumerate(zip(hist.column("item_id").to_pylist(),
                                          hist.column("decision").to_pylist(), strict=True)):
            if d == "auto" and item in human:
                continue  # a machine never overrules a person
            latest[item] = i  # later rows (later commits, later in a commit) win
            if d != "auto":
                human.add(item)
        keep = sorted(latest.values())
        t = hist.take(pa.array(keep, pa.int64()))
        if set(decisions) != set(DECISIONS):
            mask = [d in decisions for d in t.column("decision").to_pylist()]
            t = t.filter(pa.array(mask))
        return t

    def labels(self, version: int | None = None, include_auto: bool = False) -> list[dict]:
        """Training labels as labeled items (`grounding.labels`): accepted and corrected items
        of a snapshot (and auto-accepted ones with ``include_auto``)."""
        rows = self.snapshot(version, TRAIN + (("auto",) if include_auto else ())).to_pylist()
        return [{k: r.get(k) for k in ("item_id", "image", "width", "height", "text", "boxes",
                                        *LINEAGE)} | {"scores": None, "score": None}
                for r in rows]
