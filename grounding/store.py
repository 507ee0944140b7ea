"""The reviewed-label store: an append-only Delta Lake table in object storage (or a folder).

One record per review decision. A decision is one of

* ``accept``: the prediction was right; ``boxes`` are the predicted boxes.
* ``correct``: the reviewer drew the right boxes (possibly none: "no such object").
* ``reject``: the item is unusable (ambiguous text, bad image); it is never trained on.
* ``auto``: no person looked: the prediction was auto-accepted because its calibrated score
  cleared a precision target (``groundlabel review export --auto-accept-precision``). It is not
  a training label unless asked for (the model would learn from itself), it never replaces a
  person's decision on the same item, and a person's later decision replaces it (the audit).

The store at ``uri`` is a Delta table (delta-rs, through `grounding.tables`): any Delta reader
(``deltalake.DeltaTable(uri)``, polars ``read_delta``, Spark, ``ray.data.read_delta``) reads it.
It is created empty as table version 0, so **store version v is Delta table version v**: the
first append is version 1. Every append is one Delta commit (the records as one or more Parquet
files plus a log entry ``_delta_log/NNN.json``, created conditionally by delta-rs: an exclusive
create locally, ``PUT If-None-Match`` on S3). Concurrent importers are resolved by the table's
conflict check (each append is a blind append: each gets its own version, nothing is lost or
doubled). Each append carries an application transaction ``store-append:<uuid>`` and a unique
commit id, so a commit re-sent after a lost response is refused by delta-rs and recognised as
ours (`grounding.tables.commit`), never committed twice. A store that ignores conditional
writes is refused before the first append (`grounding.atomic.probe`). A writer killed before
its commit leaves data files no log entry names: no reader sees them.

The table keeps its whole history (``delta.enableExpiredLogCleanup=false``) and its change data
feed (``delta.enableChangeDataFeed=true``): a version is a snapshot that never changes, so a
retraining can name exactly the labels it used. Never VACUUM a store after rewriting its files
(OPTIMIZE): old versions would lose their data. What each append added (records, items,
decisions, source, note, committed_at) is in its commit info (`ReviewStore.versions`).

Reading: ``snapshot(version)`` gives one decision per ``item_id``: its adjudication if it has
one; none while the people who reviewed it disagree (left out of training, calibration and the
gate until adjudicated: ``unresolved(version)`` is that queue, ``resolution(version)`` counts
it); else the latest (later commits win; within a commit, later rows win: ``row_in_commit``
keeps the order, which Delta readers do not; a person's decision always wins over ``auto``).
``annotations(version)`` gives every person's
current decision per item (several people may review one item: each keeps theirs, with
``reviewer``, ``reviewed_at`` and the ``guideline`` it was made under); ``history(version)``
gives every record, the audit trail.

Columns added later (`ADDED`, e.g. ``guideline``) are null in the rows of stores written
before them; such a store reads as is, and its next append adds the column (schema merge).

Stores of the old layout (``data/<uuid>.parquet`` + a commit log ``_log/NNNNNNNN.json``) are
read only by `migrate` (``groundlabel store migrate OLD NEW``), which keeps every version
number and record; opening one as a `ReviewStore` says so.

Boxes are ``[x1, y1, x2, y2]`` float pixels of the original image (xyxy).
"""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pyarrow as pa

from grounding import atomic, tables
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
    pa.field("guideline", pa.string(), metadata={
        "doc": "NAME@VERSION of the labeling guideline the decision was made under "
               "(grounding.guideline); null when not known (imports of plain label files, "
               "decisions before guidelines were recorded)"}),
    pa.field("role", pa.string(), metadata={
        "doc": "adjudication: settles the item for good (people disagreed); null: a review"}),
])
ROLES = ("adjudication",)  # the role column; null: an ordinary review
# Columns added after stores became Delta tables. A store made before one of them still
# opens and reads (the column is null in its rows); its next append adds the column to the
# table (a schema merge in that same commit), so no migration step is needed.
ADDED = ("guideline", "role")
# The table's columns: the records plus their order within an append, which Delta readers do
# not keep (later rows of an append win in a snapshot).
ORDER = "row_in_commit"
TABLE_SCHEMA = SCHEMA.append(pa.field(ORDER, pa.int32(), metadata={
    "doc": "0-based position of the record in its append (later rows win)"}))
PROPERTIES = {"delta.enableChangeDataFeed": "true",    # history(): each row with its version
              "delta.enableExpiredLogCleanup": "false"}  # every version stays readable


def _conform(t: pa.Table) -> pa.Table:
    """A table as `SCHEMA`: files written before a column existed get it as nulls; Delta's
    string views become plain strings."""
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
                    source: str = "api", guideline: str | None = None,
                    role: str | None = None, **route) -> dict:
    """A store record for a decision on a labeled item (`grounding.labels`).

    ``predicted`` is the labeled item of the prediction that was reviewed (lineage and predicted
    boxes come from it when given). ``guideline``: ``NAME@VERSION`` of the labeling guideline
    the decision was made under (`grounding.guideline`). ``role``: ``adjudication`` for a
    decision that settles an item people disagreed on (None: a review). ``route``:
    ``calibrated_score``, ``auto_precision`` and ``calibration`` of an auto-accepted or routed
    prediction.
    """
    if decision not in DECISIONS:
        raise StoreError(f"decision must be one of {DECISIONS}, got {decision!r}")
    if role is not None and role not in ROLES:
        raise StoreError(f"role must be one of {ROLES} or None, got {role!r}")
    pred = predicted or {}
    rec = {"record_id": uuid.uuid4().hex, "item_id": item["item_id"], "decision": decision,
           "image": item.get("image"), "width": item.get("width"), "height": item.get("height"),
           "text": item["text"], "boxes": [list(map(float, b)) for b in item.get("boxes") or []],
           "predicted_boxes": pred.get("boxes"), "predicted_score": pred.get("score"),
           "reviewer": reviewer, "reviewed_at": reviewed_at or _now(), "source": source,
           "guideline": guideline, "role": role,
           **{k: route.get(k) for k in ("calibrated_score", "auto_precision", "calibration")}}
    rec.update({k: item.get(k) or pred.get(k) for k in LINEAGE})
    return rec


def _counts(records: list[dict]) -> dict:
    """What an append adds, for its commit record."""
    return {"records": len(records), "items": len({r["item_id"] for r in records}),
            "decisions": {d: sum(r["decision"] == d for r in records) for d in DECISIONS}}


def _with_order(t: pa.Table) -> pa.Table:
    return t.append_column(TABLE_SCHEMA.field(ORDER), pa.array(range(len(t)), pa.int32()))


def _write(dtable, data, **kw) -> None:
    """The write of one commit (a seam: tests replay a lost response through it)."""
    from deltalake import write_deltalake

    write_deltalake(dtable, data, **kw)


def _layout(fs, root: str) -> str | None:
    """``delta`` (a ``_delta_log/``), ``old`` (only an old-layout ``_log/``) or None."""
    try:
        fs.invalidate_cache(root)
    except Exception:  # noqa: BLE001 - a cache miss is only slower
        pass
    if fs.exists(join(root, "_delta_log")):
        return "delta"
    if fs.exists(join(root, "_log")):
        return "old"
    return None


def _migrate_hint(uri: str) -> str:
    return (f"{uri} is a reviewed-label store of the old layout (data/*.parquet + _log/); "
            f"stores are Delta tables now. Convert it once, keeping every version: "
            f"`groundlabel store migrate {uri} NEW`, then use NEW")


def _delta_types(schema: pa.Schema) -> dict[str, str]:
    from deltalake import Schema

    return {f.name: str(f.type) for f in Schema.from_arrow(schema).fields}


def _check_is_store(dtable, uri: str) -> None:
    """Refuse a Delta table whose columns are not a store's (another table on the path)."""
    want = _delta_types(TABLE_SCHEMA)
    got = {f.name: str(f.type) for f in dtable.schema().fields}
    missing = [n for n in want if n not in got and n not in ADDED]
    extra = [n for n in got if n not in want]
    typed = [f"{n} ({got[n]}, not {want[n]})" for n in want if n in got and got[n] != want[n]]
    if missing or extra or typed:
        why = "; ".join(f"{what}: {', '.join(names)}" for what, names in
                        (("missing", missing), ("not a store's", extra), ("other types", typed))
                        if names)
        raise StoreError(f"{uri} is a Delta table but not a reviewed-label store ({why})")


def is_store(uri: str, opts: StorageOptions | None = None) -> bool:
    """True for a folder/prefix holding a store: a Delta table with the store's columns, or an
    old-layout store (which `ReviewStore` refuses with how to migrate it)."""
    fs, root = filesystem(uri, opts)
    if not fs.isdir(root):
        return False
    kind = _layout(fs, root)
    if kind == "delta":
        try:
            _check_is_store(tables.open_table(uri, opts), uri)
        except (StoreError, FileNotFoundError):
            return False
    return kind is not None


class ReviewStore:
    """Append-only, versioned reviewed labels at ``uri`` (``s3://bucket/prefix`` or a folder):
    a Delta table whose version v is store version v."""

    def __init__(self, uri: str, opts: StorageOptions | None = None):
        self.uri = uri.rstrip("/")
        self.opts = opts or StorageOptions()
        self.fs, self.root = filesystem(self.uri, self.opts)
        if _layout(self.fs, self.root) == "old":
            raise StoreError(_migrate_hint(self.uri))

    # -- the table -----------------------------------------------------------------------
    def _table(self):
        """The newest snapshot of the table, or None when there is no table yet."""
        try:
            dtable = tables.open_table(self.uri, self.opts)
        except FileNotFoundError:
            return None
        _check_is_store(dtable, self.uri)
        return dtable

    def _writable(self):
        """The table, created empty (version 0) if there is none; the storage probed."""
        atomic.probe(self.fs, self.root, f"reviewed-label store {self.uri}")
        dtable = self._table()
        if dtable is None:
            tables.create(self.uri, TABLE_SCHEMA, self.opts, configuration=PROPERTIES,
                          description="groundlabel reviewed-label store: one row per review "
                                      "decision; store version = table version",
                          record={"kind": "create"})
            dtable = self._table()  # ours, or a concurrent creator's
            if dtable is None:
                raise StoreError(f"could not create the store table at {self.uri}")
        return dtable

    def _commit(self, table: pa.Table, record: dict, app_id: str,
                version: int | None = None) -> int:
        """Commit ``table`` (`TABLE_SCHEMA`) as one append carrying app transaction ``app_id``;
        returns its version. ``version``: it must become exactly that version (migration), else
        `StoreError`."""
        from deltalake import CommitProperties

        self._writable()

        def check(dtable) -> None:
            if dtable.transaction_version(app_id) is not None:
                raise tables.TableConflict(f"{app_id} is already committed")
            if version is not None and dtable.version() != version - 1:
                raise tables.TableConflict(
                    f"the table is at version {dtable.version()}, not {version - 1}, so this "
                    f"commit cannot become version {version} (another writer committed to it)")

        def do(dtable, props) -> None:
            if version is not None:  # no rebase onto a concurrent commit: the number is fixed
                props = CommitProperties(custom_metadata=props.custom_metadata,
                                         app_transactions=props.app_transactions,
                                         max_commit_retries=0)
            # A store made before a column of `ADDED` gets it with this commit.
            have = {f.name for f in dtable.schema().fields}
            merge = {"schema_mode": "merge"} if set(TABLE_SCHEMA.names) - have else {}
            _write(dtable, table, mode="append", commit_properties=props, **merge)

        try:
            done = tables.commit(self.uri, self.opts, do, record=record,
                                 txns=lambda _: {app_id: 1}, check=check)
        except tables.TableConflict as e:
            landed = self._version_of(app_id)
            if landed is not None and version in (None, landed):
                return landed  # ours, found only on a later try
            raise StoreError(f"could not commit to {self.uri}: {e}") from e
        if version is not None and done.version != version:
            raise StoreError(f"{self.uri}: commit {app_id} became version {done.version}, not "
                             f"{version} (another writer committed meanwhile)")
        return done.version

    def _version_of(self, app_id: str) -> int | None:
        for rec in self.versions():
            if rec.get("app_id") == app_id:
                return rec["version"]
        return None

    # -- writing -------------------------------------------------------------------------
    def append(self, records: list[dict], *, source: str, note: str | None = None,
               app_id: str | None = None) -> int:
        """Commit ``records`` (see `decision_record`) as one new version; returns its number.

        ``app_id``: the commit's application transaction id (default: a fresh one). A caller
        that derives it from what it appends makes a retried or concurrent identical append
        land once: the second finds the id in the log and returns the first's version."""
        if not records:
            raise StoreError("nothing to append: no records")
        for r in records:
            if r.get("decision") not in DECISIONS:
                raise StoreError(f"record {r.get('record_id')}: decision {r.get('decision')!r} "
                                 f"is not one of {DECISIONS}")
        table = _with_order(pa.Table.from_pylist(
            [{f.name: r.get(f.name) for f in SCHEMA} for r in records], schema=SCHEMA))
        app_id = app_id or f"store-append:{uuid.uuid4().hex}"
        record = {"kind": "append", "app_id": app_id, **_counts(records), "source": source,
                  "note": note, "committed_at": _now()}
        return self._commit(table, record, app_id)

    # -- reading -------------------------------------------------------------------------
    def record_ids(self) -> set[str]:
        """The ``record_id`` of every record committed (one column read, not the history)."""
        dtable = self._table()
        if dtable is None or not dtable.version():
            return set()
        return set(dtable.to_pyarrow_table(columns=["record_id"]).column("record_id")
                   .to_pylist())

    def versions(self) -> list[dict]:
        """Every append, oldest first: ``version`` (the table version), ``records``, ``items``,
        ``decisions``, ``source``, ``note``, ``committed_at`` (and ``migrated_from`` for a
        migrated version), from the commits' records."""
        dtable = self._table()
        if dtable is None:
            return []
        # history() of the newest table: a time-travelled table's history has wrong versions
        # (delta-rs 1.6.6).
        recs = [r for r in tables.records(dtable, storage=self.opts) if r["version"] >= 1 and "records" in r]
        return sorted(recs, key=lambda r: r["version"])

    def latest(self) -> int:
        """The newest version number (0 for an empty store)."""
        dtable = self._table()
        return dtable.version() if dtable is not None else 0

    def history(self, version: int | None = None) -> pa.Table:
        """Every record committed up to ``version`` (default: newest), in commit order, with a
        ``version`` column: the audit trail."""
        import pyarrow.compute as pc

        dtable = self._table()
        latest = dtable.version() if dtable is not None else 0
        if version is not None and not 1 <= version <= latest:
            known = f"1..{latest}" if latest else "none"
            raise StoreError(f"{self.uri} has no version {version} (versions: {known})")
        version = latest if version is None else version
        empty = SCHEMA.append(pa.field("version", pa.int64())).empty_table()
        if not version:
            return empty
        # The change data feed gives each row with the version that added it; only inserts
        # are decisions (a store is never updated or deleted from).
        raw = pa.table(dtable.load_cdf(starting_version=1, ending_version=version))
        t = _conform(raw).append_column("version", raw.column("_commit_version").cast(pa.int64()))
        t = t.append_column(ORDER, raw.column(ORDER))
        t = t.filter(pc.equal(raw.column("_change_type").cast(pa.string()), "insert"))
        t = t.sort_by([("version", "ascending"), (ORDER, "ascending")]).drop_columns([ORDER])
        return t if len(t) else empty

    def _hist(self, version: int | None, exclude) -> pa.Table:
        """The history, without the decisions of the reviewers in ``exclude``."""
        hist = self.history(version)
        if exclude:
            keep = [w not in exclude for w in hist.column("reviewer").to_pylist()]
            hist = hist.filter(pa.array(keep, pa.bool_()))
        return hist

    def annotations(self, version: int | None = None) -> pa.Table:
        """Every person's current decision per item as of ``version`` (default: newest): for
        each (``item_id``, ``reviewer``), that person's latest review (later commits, later
        rows win: a person who decides again changes their mind). ``auto`` decisions are
        nobody's and adjudications are no review: both are left out; decisions without a
        ``reviewer`` count as one unknown person. What agreement between people is measured on
        (`grounding.agreement`); ordered as the history, with its ``version`` column."""
        hist = self.history(version)
        return hist.take(pa.array(sorted(
            i for per in _resolve(hist)[1].values() for i in per.values()), pa.int64()))

    def snapshot(self, version: int | None = None, decisions: tuple[str, ...] = DECISIONS,
                 exclude: frozenset | set = frozenset()) -> pa.Table:
        """One decision per item as of ``version`` (default: newest), then filtered to
        ``decisions`` (``("accept", "correct")`` gives training labels).

        The rule, per item:

        1. its latest ``adjudication``, if it has one (later reviews do not undo it);
        2. else, when two or more people reviewed it and any two of their current decisions
           disagree (`grounding.agreement.disagree`: one rejects and the other does not, or
           their boxes do not all match one to one at IoU >= 0.5), **no decision**: the item is
           left out (of training, calibration and the gate's held-out set) until adjudicated;
           `unresolved` lists it, `resolution` counts it;
        3. else the latest person's decision (later commits win, later rows of a commit win);
        4. ``auto`` only where no person has decided.

        Nothing is lost: `annotations` gives each person's current decision, `history` every
        record. ``exclude``: reviewers whose decisions are left out first (as if they had never
        decided: `grounding.gold.excluded_reviewers`)."""
        hist = self._hist(version, exclude)
        keep, _, _ = _resolve(hist)
        t = hist.take(pa.array(sorted(keep.values()), pa.int64()))
        if set(decisions) != set(DECISIONS):
            mask = [d in decisions for d in t.column("decision").to_pylist()]
            t = t.filter(pa.array(mask, pa.bool_()))
        return t

    def unresolved(self, version: int | None = None) -> pa.Table:
        """The current decisions of the people who disagree on an item that has no adjudication
        yet (every such item's, all of them), as of ``version``: the adjudication queue."""
        hist = self.history(version)
        _, per_person, open_items = _resolve(hist)
        return hist.take(pa.array(sorted(i for item in open_items
                                         for i in per_person[item].values()), pa.int64()))

    def resolution(self, version: int | None = None,
                   exclude: frozenset | set = frozenset()) -> dict:
        """How the snapshot's rule resolved the items as of ``version``: ``items`` (decided by
        anyone), ``overlapped`` (reviewed by two or more people), ``agreed`` (overlapped, no
        adjudication, no disagreement), ``adjudicated``, ``unresolved`` (left out); without
        the reviewers in ``exclude``."""
        hist = self._hist(version, exclude)
        keep, per_person, open_items = _resolve(hist)
        roles = hist.column("role").to_pylist()
        adjudicated = sum(roles[i] == "adjudication" for i in keep.values())
        overlapped = {item for item, per in per_person.items() if len(per) >= 2}
        return {"version": version if version is not None else self.latest(),
                "items": len(keep) + len(open_items), "overlapped": len(overlapped),
                "agreed": len({item for item in overlapped if item not in open_items
                               and roles[keep[item]] != "adjudication"}),
                "adjudicated": adjudicated, "unresolved": len(open_items)}

    def labels(self, version: int | None = None, include_auto: bool = False,
               exclude: frozenset | set = frozenset()) -> list[dict]:
        """Training labels as labeled items (`grounding.labels`): accepted and corrected items
        of a snapshot (and auto-accepted ones with ``include_auto``), without the decisions of
        the reviewers in ``exclude``."""
        rows = self.snapshot(version, TRAIN + (("auto",) if include_auto else ()),
                             exclude).to_pylist()
        return [{k: r.get(k) for k in ("item_id", "image", "width", "height", "text", "boxes",
                                        *LINEAGE)} | {"scores": None, "score": None}
                for r in rows]


def _resolve(hist: pa.Table) -> tuple[dict[str, int], dict[str, dict], set[str]]:
    """The snapshot's rule (`ReviewStore.snapshot`) on a history: ``(row kept per item,
    {item: {reviewer: row of their current review}}, items left unresolved)``."""
    from grounding.agreement import disagree

    items = hist.column("item_id").to_pylist()
    decisions = hist.column("decision").to_pylist()
    who = hist.column("reviewer").to_pylist()
    roles = hist.column("role").to_pylist()
    adjudicated: dict[str, int] = {}
    person: dict[str, int] = {}   # the latest review by anyone
    auto: dict[str, int] = {}
    per_person: dict[str, dict] = {}
    for i, (item, d, w, role) in enumerate(zip(items, decisions, who, roles, strict=True)):
        if role == "adjudication":
            adjudicated[item] = i
        elif d == "auto":
            auto[item] = i
        else:
            person[item] = i
            per_person.setdefault(item, {})[w] = i
    boxes = None
    open_items: set[str] = set()
    for item, per in per_person.items():
        if len(per) < 2 or item in adjudicated:
            continue
        if boxes is None:
            boxes = hist.column("boxes").to_pylist()
        rows = [{"decision": decisions[i], "boxes": boxes[i]} for i in per.values()]
        if any(disagree(a, b) for k, a in enumerate(rows) for b in rows[k + 1:]):
            open_items.add(item)
    keep = {**auto, **person, **adjudicated}  # later dicts win: adjudication > person > auto
    for item in open_items:
        del keep[item]
    return keep, per_person, open_items


# -- the old layout, read only to migrate it --------------------------------------------------
def _old_log(uri: str, opts: StorageOptions | None) -> list[dict]:
    """The commits of an old-layout store (``_log/NNNNNNNN.json``), oldest first."""
    fs, root = filesystem(uri, opts)
    log = join(root, "_log")
    try:
        fs.invalidate_cache(root)
    except Exception:  # noqa: BLE001 - a cache miss is only slower
        pass
    if not fs.isdir(log):
        raise StoreError(f"{uri}: no old-layout store there (no _log/ commit log)")
    entries = [json.loads(fs.cat_file(p)) for p in sorted(fs.ls(log, detail=False))
               if p.endswith(".json")]
    got = [e.get("version") for e in entries]
    if got != list(range(1, len(entries) + 1)):
        raise StoreError(f"{uri}: the old commit log is not versions 1..{len(entries)} in a row "
                         f"(found {got}); nothing migrated")
    return entries


def _old_data(uri: str, opts: StorageOptions | None, entry: dict) -> pa.Table:
    """The records of one old commit, as `SCHEMA` (columns a file predates as nulls)."""
    import pyarrow.parquet as pq

    fs, root = filesystem(uri, opts)
    with fs.open(join(root, entry["data"]), "rb") as f:
        t = _conform(pq.read_table(f))
    if len(t) != entry["records"]:
        raise StoreError(f"{uri}: version {entry['version']} commits {entry['records']} records "
                         f"but {entry['data']} holds {len(t)}")
    return t


def migrate(old: str, new: str, opts: StorageOptions | None = None) -> dict:
    """Convert the old-layout store at ``old`` into a Delta store at ``new``: old version k
    becomes version k, the same records in the same order, its commit record keeping source,
    note and the original ``committed_at`` (``migrated_from``: old version and data file).

    Resumable and idempotent: each version's commit carries app transaction ``migrate:<k>``
    and must become version k; a rerun skips the versions already in ``new`` (checked to be
    this migration's) and goes on. Refused when ``new`` holds anything else.
    """
    opts = opts or StorageOptions()
    if tables.table_uri(old) == tables.table_uri(new):
        raise StoreError(f"{old} and {new} are the same place: migrate into a new location")
    log = _old_log(old, opts)
    store = ReviewStore(new, opts)
    done = store.versions()
    dtable = store._table()
    for rec in done:
        src, k = rec.get("migrated_from") or {}, rec["version"]
        if src.get("version") != k or k > len(log) or src.get("data") != log[k - 1]["data"]:
            raise StoreError(f"{new} already holds a store that is not this migration of {old} "
                             f"(its version {k}, source {rec.get('source')!r}, is not old version {k})")
    if dtable is not None and dtable.version() != len(done):
        raise StoreError(f"{new} already holds commits that are not this migration of {old} "
                         f"(table version {dtable.version()}, {len(done)} migrated versions)")
    records = 0
    for entry in log[len(done):]:
        k = entry["version"]
        table = _with_order(_old_data(old, opts, entry))
        rows = table.select(["item_id", "decision"]).to_pylist()
        record = {"kind": "migrate", "app_id": f"migrate:{k}", **_counts(rows),
                  "source": entry.get("source"), "note": entry.get("note"),
                  "committed_at": entry.get("committed_at"),
                  "migrated_from": {"store": old, "version": k, "data": entry["data"]},
                  "migrated_at": _now()}
        store._commit(table, record, f"migrate:{k}", version=k)
        records += len(table)
    return {"from": old, "to": new, "versions": len(log), "migrated": len(log) - len(done),
            "skipped": len(done), "records": records, "latest": store.latest()}
