"""A label job's output: a Delta Lake table, and the one object that knows its layout.

    OUTPUT/_delta_log/      the table's log (delta-rs): every commit, each with our record of it
    OUTPUT/part-*.parquet   data files; a file is rows only once a commit adds it
    OUTPUT/_summary.json    rows, errors by code and class, speed, Acc@0.5, start-up of the last run
    OUTPUT/_startup/RUN/    each inference actor's start-up marks in the last run
    OUTPUT/_lease           a courtesy: refuses a second job at once, guarantees nothing

Anyone reads an output with ordinary tools: ``polars.read_delta(OUTPUT)``,
``ray.data.read_delta(OUTPUT)``, deltalake's ``QueryBuilder().register("t", DeltaTable(OUTPUT))``.
(deltalake 1.6.6's ``to_pyarrow_table()`` reads too, but the interpreter may abort at exit
afterwards: delta-rs #2184, polars #24169; see `grounding.tables.scan`.) Columns:
`pipelines.schema`.

**Exactly once is enforced by the commit** (`grounding.tables.commit`), not by timing:

* An input row belongs to one *piece*: lines ``[k * piece_rows, (k + 1) * piece_rows)`` of its
  shard, fixed for the job. A commit adds one data file holding whole pieces, and sets, for
  each *chunk* of 32 pieces it touches, the application transaction
  ``{job_id}/{shard}#{chunk}`` to the bitmask of that chunk's committed pieces. Before
  committing, the writer reads the masks on its snapshot and refuses if one of its pieces is
  already set; a commit by anyone else that sets the same app id after that snapshot makes
  delta-rs refuse ours. So a piece is committed once, whoever sends it: a zombie worker, a
  paused driver, a retried request, a second job. The loser is told which rows.
* A row that failed with a *transient* error is labeled again by a rerun, and the data file
  holding it is replaced in one commit (remove the file, add it rewritten with the new row):
  never a delete followed by a write. The file's path is the key (it can be removed once).
* The job's identity (input, shards' fingerprints, ``--limit``, model, prompt, adapter and every
  setting that changes which rows are labeled or what they say) is the table's description,
  written by its first commit; a rerun with another one is refused, naming the setting.
* Every commit records what it covers (``commitInfo["groundlabel"]``: its file, the pieces by
  shard as ranges, rows, statuses, error codes, transient rows, Acc@0.5 sums). Resume plans
  from these records and the snapshot's file list, and the job summary is their sum: no data
  file is read to plan or to summarize, and the driver's memory grows with commits, not rows.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

from grounding.errors import TRANSIENT
from grounding.lease import Lease, LeaseHeld
from grounding.storage import StorageOptions, filesystem, join

log = logging.getLogger(__name__)

SUMMARY = "_summary.json"
LEASE = "_lease"
STARTUP = "_startup"
CHUNK = 32  # pieces per application transaction (its version is their bitmask)
# What a rerun must share with the run that created the output, and the flag that sets each.
IDENTITY = {"input": "--input", "limit": "--limit", "piece_rows": "--piece-rows",
            "model": "--model", "family": "--family", "prompt_version": "--prompt-template / "
            "--coords / the family's prompt", "adapter_requested": "--adapter",
            "constrained": "--constrained / --no-constrained",
            "max_new_tokens": "--max-new-tokens", "min_pixels": "--min-pixels",
            "max_pixels": "--max-pixels"}
# Table properties: keep every log entry (resume and the summary read the records in them).
TABLE_CONFIG = {"delta.enableExpiredLogCleanup": "false"}


class OutputError(ValueError):
    """The output cannot be used as asked (another job's, another input, a refused commit)."""


def line_of(row_id: str) -> int:
    """The shard line of a row id (``{shard}:{line}`` or ``{shard}:{line}.{k}`` for ms-swift)."""
    return int(row_id.rsplit(":", 1)[1].split(".", 1)[0])


def ranges(pieces) -> list[list[int]]:
    """Sorted piece numbers as half-open ranges ``[[a, b), ...]``."""
    out: list[list[int]] = []
    for p in sorted(set(pieces)):
        if out and out[-1][1] == p:
            out[-1][1] = p + 1
        else:
            out.append([p, p + 1])
    return out


def expand(rngs) -> list[int]:
    return [p for a, b in rngs for p in range(a, b)]


def app_id(job_id: str, shard: str, chunk: int) -> str:
    """The application transaction id of a chunk of 32 pieces of a shard."""
    return f"{job_id}/{shard}#{chunk}"


def file_record(t) -> dict:
    """What a data file holds, for its commit's record: rows, statuses, error codes, transient
    rows, Acc@0.5 sums and its pieces by shard. ``t`` has the output columns and ``piece``."""
    import pyarrow.compute as pc

    from grounding.boxes import Box

    codes = [c for c in t["error_code"].to_pylist() if c]
    hits = fails = n_gold = 0
    iou = 0.0
    gold_rows = t.filter(pc.is_valid(t["gold"])).select(["boxes", "gold"]).to_pylist()
    for r in gold_rows:
        n_gold += 1
        first = r["boxes"][0] if r["boxes"] else None
        if first is None:
            fails += 1
            continue
        v = Box.from_list([first[k] for k in ("x1", "y1", "x2", "y2")]).iou(
            Box.from_list(r["gold"]))
        iou += v
        hits += v >= 0.5
    pieces: dict[str, set[int]] = {}
    if "piece" in t.column_names:  # (a lone Parquet file has none)
        for shard, piece in zip(t["shard"].to_pylist(), t["piece"].to_pylist(), strict=True):
            pieces.setdefault(shard, set()).add(piece)
    return {"rows": t.num_rows, "labeled": t["error_code"].null_count,
            "status": dict(Counter(t["status"].to_pylist())), "errors": dict(Counter(codes)),
            "transient": sum(c in TRANSIENT for c in codes),
            "gold": {"n": n_gold, "hits": hits, "iou": iou, "fails": fails},
            "pieces": {s: ranges(p) for s, p in sorted(pieces.items())}}


def file_stats(t) -> str:
    """Delta statistics of a data file (numRecords; min, max and null count of the flat
    columns), so readers skip files by row id, shard, status or error code."""
    import pyarrow as pa
    import pyarrow.compute as pc

    lo, hi, nulls = {}, {}, {}
    for f in t.schema:
        col = t[f.name]
        if pa.types.is_list(f.type) or pa.types.is_struct(f.type):
            continue
        nulls[f.name] = col.null_count
        if col.null_count < len(col) and (pa.types.is_string(f.type) or
                                          pa.types.is_integer(f.type)):
            mm = pc.min_max(col).as_py()
            lo[f.name], hi[f.name] = mm["min"], mm["max"]
    return json.dumps({"numRecords": t.num_rows, "minValues": lo, "maxValues": hi,
                       "nullCount": nulls})


@dataclass
class Progress:
    """What the table holds, from the commit records of its current files (no data read)."""

    files: dict[str, dict] = field(default_factory=dict)   # file -> its record
    version: int = -1

    def done(self) -> dict[str, list[list[int]]]:
        """Committed pieces by shard, as ranges."""
        by: dict[str, list[int]] = {}
        for rec in self.files.values():
            for shard, rngs in rec["pieces"].items():
                by.setdefault(shard, []).extend(expand(rngs))
        return {s: ranges(p) for s, p in by.items()}

    def overlaps(self) -> int:
        """Pieces claimed by more than one file (0 unless someone bypassed the commit)."""
        seen: Counter = Counter()
        for rec in self.files.values():
            for shard, rngs in rec["pieces"].items():
                seen.update((shard, p) for p in expand(rngs))
        return sum(v - 1 for v in seen.values() if v > 1)

    @property
    def rows(self) -> int:
        return sum(r["rows"] for r in self.files.values())

    def transient_files(self) -> dict[str, int]:
        return {f: r["transient"] for f, r in self.files.items() if r.get("transient")}


class JobOutput:
    """The output table of a label job (or one Parquet file, read-only), on any filesystem."""

    def __init__(self, uri: str, storage: StorageOptions | None = None):
        self.uri = uri.rstrip("/")
        self.storage = storage or StorageOptions()
        self.fs, self.root = filesystem(self.uri, self.storage)

    def __repr__(self) -> str:
        return f"JobOutput({self.uri!r})"

    # ---- layout -----------------------------------------------------------------------
    def is_file(self) -> bool:
        """True when the output is one Parquet file rather than a job table."""
        return self.fs.isfile(self.root)

    def exists(self) -> bool:
        """True when a job has created the table."""
        from grounding import tables

        return not self.is_file() and tables.exists(self.uri, self.storage)

    def path(self, *parts: str) -> str:
        """Path (on `fs`) of a file inside the output."""
        return join(self.root, *parts)

    def uri_of(self, *parts: str) -> str:
        """URI of a file inside the output (what users and other tools are given)."""
        return join(self.uri, *parts)

    def table(self):
        """The table's newest snapshot (`deltalake.DeltaTable`)."""
        from grounding import tables

        try:
            return tables.open_table(self.uri, self.storage)
        except FileNotFoundError:
            raise OutputError(f"{self.uri} is not a label job's output (no Delta table there)"
                              ) from None

    # ---- rows -------------------------------------------------------------------------
    def read(self, columns: list[str] | None = None):
        """The current version's rows as one pyarrow table (only ``columns`` if given)."""
        import pyarrow as pa

        from pipelines import schema

        sch = schema.OUTPUT if columns is None else pa.schema(
            [schema.OUTPUT.field(c) for c in columns])
        if self.is_file():
            import pyarrow.parquet as pq

            with self.fs.open(self.root, "rb") as f:
                return pq.read_table(f, columns=columns)
        if not self.exists():
            return sch.empty_table()
        from grounding import tables

        t = tables.read_all(self.table(), columns)
        return sch.empty_table() if t is None else t.select(sch.names).cast(sch)

    # ---- identity ---------------------------------------------------------------------
    def job_record(self) -> dict:
        """The job's identity (the table's description): job id, input, shards, settings."""
        if self.is_file() or not self.exists():
            return {}
        desc = self.table().metadata().description or ""
        try:
            rec = json.loads(desc)
        except ValueError:
            return {}
        return rec if isinstance(rec, dict) else {}

    def start_job(self, identity: dict, job_id: str | None, shards: dict[str, dict]) -> dict:
        """Create the table (its description is the job's identity), or check that a rerun
        labels the same input with the same settings. ``identity`` holds the `IDENTITY` keys
        (and the adapter the first start resolved); ``shards`` maps each shard to its
        fingerprint. Returns the identity in force."""
        from grounding import atomic, tables
        from pipelines import schema

        if self.is_file():
            raise OutputError(f"--output {self.uri} is a file, not a folder for a job's table")
        if not self.exists():
            if self.fs.exists(self.path("parts")) or self.fs.exists(self.path("_job.json")):
                raise OutputError(
                    f"{self.uri} holds a label job output of the old layout (parts/, "
                    "_job.json); it is not resumed as a table: label into a new --output")
            self.fs.makedirs(self.root, exist_ok=True)
            atomic.probe(self.fs, self.root, f"job output {self.uri}")
            rec = dict(identity, job_id=job_id or uuid.uuid4().hex[:12],
                       created=datetime.now(UTC).isoformat(), shards=shards)
            tables.create(self.uri, schema.OUTPUT, self.storage, description=json.dumps(rec),
                          configuration=TABLE_CONFIG, record={"kind": "create"})
        old = self.job_record()
        for key, flag in IDENTITY.items():
            if old.get(key) != identity.get(key):
                raise OutputError(
                    f"{self.uri} holds output of a job with {key}={old.get(key)!r}, this job "
                    f"has {identity.get(key)!r} ({flag}): rerun with the same settings or use "
                    "a new --output")
        changed = _shard_changes(old.get("shards") or {}, shards)
        if changed:
            raise OutputError(
                f"{self.uri} holds output of {old.get('input')}, whose shards changed since "
                f"the job started ({'; '.join(changed[:10])}): row ids would map onto other "
                "rows. Label the new input into a new --output")
        return old

    # ---- what is committed ----------------------------------------------------------------
    def progress(self) -> Progress:
        """Records of the current version's files: the snapshot's file list (checkpoint and
        the log since) and the commit records (one log entry each). A file without a record
        (a compaction by another tool) is read to make one."""
        from grounding import tables

        if self.is_file():
            return Progress(files={self.root: dict(file_record(self.read()), file=self.root)})
        if not self.exists():
            return Progress()
        dt = self.table()
        current = set(tables.file_paths(dt))
        files: dict[str, dict] = {}
        for rec in tables.records(dt, storage=self.storage):  # newest first: a file's record is its adding commit
            f = rec.get("file")
            if f in current and f not in files:
                files[f] = rec
        for f in sorted(current - set(files)):
            t = self._read_file(f, with_piece=True)
            files[f] = dict(file_record(t), file=f, kind="foreign")
        return Progress(files=files, version=dt.version())

    def _read_file(self, rel: str, with_piece: bool = False, columns: list[str] | None = None):
        """One data file of the table (output columns, or ``columns``; with ``piece``
        recomputed from row ids and the job's piece size)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from pipelines import schema

        names = columns or schema.OUTPUT.names
        try:
            with self.fs.open(self.path(rel), "rb") as f:
                t = pq.read_table(f, columns=names)
        except Exception as e:  # noqa: BLE001 - reported whole, nothing deleted
            raise OutputError(f"cannot read data file {rel} of {self.uri}: "
                              f"{type(e).__name__}: {e}") from e
        t = t.select(names).cast(pa.schema([schema.OUTPUT.field(c) for c in names]))
        if with_piece:
            size = int(self.job_record().get("piece_rows") or 1)
            t = t.append_column("piece", pa.array(
                [line_of(r) // size for r in t["row_id"].to_pylist()], pa.int64()))
        return t

    def transient_rows(self, files: list[str]) -> dict[str, list[tuple[str, str]]]:
        """``{shard: [(row_id, file), ...]}``: the rows with a transient error in ``files``
        (read: only the files whose record counts some)."""
        import pyarrow.compute as pc

        out: dict[str, list[tuple[str, str]]] = {}
        for f in files:
            t = self._read_file(f, columns=["row_id", "shard", "error_code"])
            t = t.filter(pc.fill_null(pc.is_in(t["error_code"], value_set=_strings(
                sorted(TRANSIENT))), False))
            for rid, shard in zip(t["row_id"].to_pylist(), t["shard"].to_pylist(), strict=True):
                out.setdefault(shard, []).append((rid, f))
        return out

    # ---- commits ------------------------------------------------------------------------
    def commit_add(self, job_id: str, file: dict, record: dict):
        """Commit one written data file (``file``: path, size, stats) covering the pieces in
        ``record``; `grounding.tables.TableConflict` if any of them is already committed."""
        import time

        from deltalake.transaction import AddAction

        from grounding import tables
        from pipelines import schema

        masks: dict[str, int] = {}
        for shard, rngs in record["pieces"].items():
            for p in expand(rngs):
                key = app_id(job_id, shard, p // CHUNK)
                masks[key] = masks.get(key, 0) | (1 << (p % CHUNK))

        def txns(dt) -> dict[str, int]:
            out = {}
            for key, mask in masks.items():
                have = dt.transaction_version(key) or 0
                if have & mask:
                    shard, chunk = key[len(job_id) + 1:].rsplit("#", 1)
                    taken = [int(chunk) * CHUNK + b for b in range(CHUNK) if have & mask & 1 << b]
                    size = record.get("piece_rows", 1)
                    lines = ", ".join(f"{a * size}-{b * size - 1}" for a, b in ranges(taken))
                    raise tables.TableConflict(
                        f"rows of shard {shard!r} (lines {lines}) are "
                        f"already committed to {self.uri} by another writer (table version "
                        f"{dt.version()}): another job, or a run that outlived its take-over, "
                        "labeled them; this run's copy is not committed")
                out[key] = have | mask
            return out

        def do(dt, props):
            add = AddAction(path=file["path"], size=file["size"], partition_values={},
                            modification_time=int(time.time() * 1000), data_change=True,
                            stats=file["stats"])
            dt.create_write_transaction([add], mode="append", schema=schema.OUTPUT,
                                        commit_properties=props)

        return tables.commit(self.uri, self.storage, do, txns=txns,
                             record=dict(record, kind="add", file=file["path"]))

    def commit_replace(self, job_id: str, old: str, file: dict, record: dict):
        """Replace data file ``old`` by ``file`` (the same rows, its transient ones labeled
        again) in one commit; `grounding.tables.TableConflict` if ``old`` is no longer in the
        table (another writer replaced it first)."""
        import time

        from deltalake.transaction import AddAction, RemoveAction

        from grounding import tables
        from pipelines import schema

        def check(dt) -> None:
            if old not in set(tables.file_paths(dt)):
                raise tables.TableConflict(
                    f"data file {old} of {self.uri} was already replaced or removed by another "
                    f"writer (table version {dt.version()}): this run's retried rows are not "
                    "committed")

        def do(dt, props):
            now = int(time.time() * 1000)
            rm = RemoveAction(path=old, data_change=True, deletion_timestamp=now)
            add = AddAction(path=file["path"], size=file["size"], partition_values={},
                            modification_time=now, data_change=True, stats=file["stats"])
            dt.create_write_transaction([rm, add], mode="append", schema=schema.OUTPUT,
                                        commit_properties=props)

        return tables.commit(self.uri, self.storage, do, check=check,
                             txns=lambda dt: {f"{job_id}/replace/{old}": 1},
                             record=dict(record, kind="replace", file=file["path"],
                                         replaces=old))

    # ---- records ----------------------------------------------------------------------
    def _read_json(self, name: str) -> dict:
        try:
            with self.fs.open(self.path(name), "r") as f:
                d = json.load(f)
        except (FileNotFoundError, ValueError):
            return {}
        return d if isinstance(d, dict) else {}

    def _write_json(self, name: str, data: dict) -> None:
        self.fs.makedirs(self.path(name).rsplit("/", 1)[0], exist_ok=True)
        with self.fs.open(self.path(name), "w") as f:
            json.dump(data, f, indent=2)

    def lease(self, wait_s: float = 0.0, lease_s: float = 120.0) -> Lease:
        """Take the output's lease (waiting up to ``wait_s`` for another job): a courtesy that
        refuses a second job at once with a clear message. Nothing depends on it: the commits
        refuse a second writer's rows whatever the lease says."""
        self.fs.makedirs(self.root, exist_ok=True)
        lease = Lease(self.fs, self.path(LEASE), f"job output {self.uri}", lease_s)
        try:
            return lease.acquire(wait_s)
        except LeaseHeld as e:
            raise OutputError(f"{e}: another label job is writing this output; wait for it "
                              "(--wait SECONDS) or use another --output") from None

    def startup_log(self, run: str) -> StartupLog:
        """Where this run's inference actors record their start-up; earlier runs' records
        are dropped."""
        if self.fs.exists(self.path(STARTUP)):
            self.fs.rm(self.path(STARTUP), recursive=True)
        return StartupLog(self.uri, self.storage, run)

    def startup_records(self, run: str) -> list[dict]:
        """The start-up marks each inference actor of ``run`` recorded."""
        path = self.path(STARTUP, run)
        if not self.fs.exists(path):
            return []
        return [self._read_json(join(STARTUP, run, p.rsplit("/", 1)[-1]))
                for p in sorted(self.fs.find(path)) if p.endswith(".json")]

    def summary(self) -> dict:
        """``_summary.json`` of the last run ({} if none)."""
        return {} if self.is_file() else self._read_json(SUMMARY)

    def write_summary(self, summary: dict) -> None:
        self._write_json(SUMMARY, summary)


@dataclass(frozen=True)
class StartupLog:
    """Where one run's inference actors write their start-up marks (epoch seconds, by
    phase): small and picklable, so Ray ships it to the actors. See `JobOutput.startup_log`."""

    uri: str
    storage: StorageOptions
    run: str

    def record(self, marks: dict[str, float]) -> None:
        out = JobOutput(self.uri, self.storage)
        out._write_json(join(STARTUP, self.run, f"{uuid.uuid4().hex[:12]}.json"), marks)


def _strings(values):
    import pyarrow as pa

    return pa.array(values, pa.string())


def _shard_changes(old: dict[str, dict], new: dict[str, dict]) -> list[str]:
    """What differs between two ``{shard: fingerprint}`` maps, in words."""
    out = [f"{s}: new" for s in sorted(set(new) - set(old))]
    out += [f"{s}: gone" for s in sorted(set(old) - set(new))]
    for s in sorted(set(old) & set(new)):
        diff = [f"{k} {old[s].get(k)!r} -> {new[s].get(k)!r}" for k in sorted(set(old[s]) | set(new[s]))
                if old[s].get(k) != new[s].get(k)]
        if diff:
            out.append(f"{s}: " + ", ".join(diff))
    return out
