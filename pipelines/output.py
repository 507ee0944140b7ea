"""A label job's output, as one object: the one place that knows its layout.

    OUTPUT/_job.json        the job record: job id, input URI and a fingerprint of each shard,
                            model, family, prompt version, the adapter resolved at the first start
    OUTPUT/_lease           the writer's lease (`grounding.lease`): one job writes at a time
    OUTPUT/parts/*.parquet  one row per input row (schema: `pipelines.schema.OUTPUT`)
    OUTPUT/_summary.json    rows, errors by code and class, speed, Acc@0.5, start-up of the last run
    OUTPUT/_startup/RUN/*.json  each inference actor's start-up marks in the last run

`JobOutput` resolves the output's filesystem once and is what the label job, resume, ``eval``,
``report`` and ``review export`` all go through. ``JobOutput(uri)`` also accepts one Parquet file
(a part, or a file copied out of a job): it then has that one part and no job record.

Exactly once, by construction rather than by bookkeeping:

* Every output row carries its input's ``row_id`` (``{shard}:{line}``).
* Parts are written by Ray Data's Parquet writer. A Parquet file is readable only once its
  footer is written, so a part is either complete or unreadable; an object store makes the
  whole object visible at once anyway.
* One writer: a job holds the output's lease (atomic create, heartbeat, atomic take-over when
  stale) from its first read of the output to its summary; a second job is refused (or waits).
* Before a run, `JobOutput.committed` reads the ``row_id`` column of every part and deletes only
  parts that are verifiably torn (no Parquet footer: the partial write of a killed run); any
  other read error stops the job. The read stage then skips those ids.
* A rerun checks that the input is the same (URI and every shard's fingerprint) and reuses the
  adapter resolved at the first start, so old ids never map onto new content.
* Rows with a *transient* error code (`grounding.errors`) are retried by a rerun: each part
  holding some is first rewritten without them (``P~r.parquet``, complete before ``P`` is
  deleted; a crash in between is repaired by `committed`), so the retried row replaces the old
  one and is never duplicated.

So a killed job, started again, writes exactly the rows that are missing. We chose this over Ray
Data's ``checkpoint_config`` because the output itself is the checkpoint (nothing separate can
drift from it), it works the same on local disks and object stores, a user can verify it with
one query (``count(*) == count(distinct row_id)``), and it needs no network file system shared
by the cluster for local paths.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from grounding.errors import TRANSIENT
from grounding.lease import Lease, LeaseHeld
from grounding.storage import StorageOptions, arrow_filesystem, filesystem, join

log = logging.getLogger(__name__)

JOB_RECORD = "_job.json"
SUMMARY = "_summary.json"
LEASE = "_lease"
PARTS = "parts"
STARTUP = "_startup"
REPLACEMENT = "~r"  # P~r.parquet: P rewritten without its transient rows
# What a resumed job must share with the run that started the output.
RESUME_KEYS = ("input", "model", "family", "prompt_version", "adapter_requested")


class OutputError(ValueError):
    """The output cannot be used as asked (another writer, another input, an unreadable part)."""


def is_torn(fs, path: str) -> bool:
    """True when a Parquet file is verifiably incomplete: too short, or no ``PAR1`` footer
    magic (a write killed before its footer). Raises on read errors (network, permissions)."""
    size = fs.info(path)["size"]
    if size < 12:
        return True
    with fs.open(path, "rb") as f:
        head = f.read(4)
        f.seek(size - 4)
        tail = f.read(4)
    return head != b"PAR1" or tail != b"PAR1"


class JobOutput:
    """The output folder (or single Parquet file) of a label job, on any filesystem."""

    def __init__(self, uri: str, storage: StorageOptions | None = None):
        self.uri = uri
        self.storage = storage or StorageOptions()
        self.fs, self.root = filesystem(uri, self.storage)
        self.scanned: set[str] = set()  # the parts the last `committed` read

    def __repr__(self) -> str:
        return f"JobOutput({self.uri!r})"

    # ---- layout -----------------------------------------------------------------------
    def is_file(self) -> bool:
        """True when the output is one Parquet file rather than a job folder."""
        return self.fs.isfile(self.root)

    def path(self, *parts: str) -> str:
        """Path (on `fs`) of a file inside the output."""
        return join(self.root, *parts)

    def uri_of(self, *parts: str) -> str:
        """URI of a file inside the output (what users and other tools are given)."""
        return join(self.uri, *parts)

    def parts(self) -> list[str]:
        """Paths of the Parquet parts, sorted."""
        if self.is_file():
            return [self.root]
        path = self.path(PARTS)
        if not self.fs.exists(path):
            return []
        return sorted(p for p in self.fs.find(path) if p.endswith(".parquet"))

    # ---- rows -------------------------------------------------------------------------
    def tables(self, columns: list[str] | None = None):
        """The parts one at a time, as pyarrow tables (only ``columns`` if given): what reads
        a whole output without holding it (the job summary). An unreadable part is an
        `OutputError` naming it (`_read_part`)."""
        for p in self.parts():
            yield self._read_part(p, columns)

    def read(self, columns: list[str] | None = None):
        """All parts as one pyarrow table (only ``columns`` if given)."""
        import pyarrow as pa

        from pipelines import schema

        tables = list(self.tables(columns))
        if not tables:
            sch = schema.OUTPUT if columns is None else pa.schema(
                [schema.OUTPUT.field(c) for c in columns])
            return sch.empty_table()
        return pa.concat_tables(tables)

    def _read_part(self, part: str, columns: list[str] | None = None):
        import pyarrow.parquet as pq

        try:
            with self.fs.open(part, "rb") as f:
                return pq.read_table(f, columns=columns)
        except Exception as e:  # noqa: BLE001 - reported whole, nothing deleted
            raise OutputError(f"cannot read part {part} of {self.uri}: {type(e).__name__}: {e}. "
                              "It is not torn (its Parquet footer is there), so it was not "
                              "deleted: fix access to it, or remove it by hand") from e

    def repair(self) -> list[str]:
        """Finish or undo an interrupted rewrite, and delete torn parts; returns what was
        removed. Only verifiably torn files are deleted (see `is_torn`)."""
        removed = []
        parts = set(self.parts())
        for part in sorted(parts):
            if not part.endswith(REPLACEMENT + ".parquet"):
                continue
            original = part[: -len(REPLACEMENT + ".parquet")] + ".parquet"
            if is_torn(self.fs, part):      # the rewrite itself was cut: keep the original
                self.fs.rm(part)
                removed.append(part)
            elif original in parts:         # the rewrite is complete: the original goes
                self.fs.rm(original)
                removed.append(original)
        for part in self.parts():
            if is_torn(self.fs, part):
                log.warning("removing torn part %s (no Parquet footer: a killed write)", part)
                self.fs.rm(part)
                removed.append(part)
        return removed

    def committed(self, repair: bool = True) -> dict[str, list[str]]:
        """Row ids already written, by shard (after `repair`, unless the caller just did it).
        Raises `OutputError` for a part that cannot be read although it is not torn (e.g.
        credentials, network)."""
        if repair:
            self.repair()
        done: dict[str, list[str]] = {}
        self.scanned = set(self.parts())  # exactly the parts these ids come from
        for part in sorted(self.scanned):
            t = self._read_part(part, ["row_id", "shard"])
            for rid, shard in zip(t.column("row_id").to_pylist(), t.column("shard").to_pylist(),
                                  strict=True):
                done.setdefault(shard, []).append(rid)
        return done

    def drop_transient(self) -> int:
        """Remove every row with a transient error code, so that a rerun labels it again;
        returns how many. Each affected part is rewritten whole (``P~r.parquet``) before the
        original is deleted: a crash in between leaves both, which `repair` resolves."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        dropped = 0
        for part in self.parts():
            t = self._read_part(part)
            bad = pc.fill_null(pc.is_in(t.column("error_code"),
                                        value_set=pa_array(sorted(TRANSIENT))), False)
            n = pc.sum(bad).as_py() or 0
            if not n:
                continue
            keep = t.filter(pc.invert(bad))
            if len(keep):
                repl = part[: -len(".parquet")] + REPLACEMENT + ".parquet"
                with self.fs.open(repl, "wb") as f:
                    pq.write_table(keep, f)
            self.fs.rm(part)
            dropped += n
        return dropped

    def write(self, ds, run: str | None = None) -> None:
        """Write a Ray Dataset of output rows as new parts (Ray Data's Parquet writer); with
        ``run``, each part's name starts with ``run-<run>_`` (see `drop_late_parts`)."""
        from ray.data.datasource import FilenameProvider

        afs, path = arrow_filesystem(self.uri_of(PARTS), self.storage)
        names = FilenameProvider(f"run-{run}", "parquet") if run else None
        ds.write_parquet(path, filesystem=afs, filename_provider=names)

    def drop_late_parts(self, before: set[str], run: str) -> list[str]:
        """Delete parts that are not in ``before`` (the parts `committed` read: `scanned`) and
        were not written by ``run``; returns them.

        A killed job's Ray workers can outlive its driver by a second or more and finish a
        part after a rerun has read what is committed (seen: a part landing 1.2 s after the
        kill). That rerun labels those rows again, so the late part would duplicate them: the
        rerun's own rows stand, the late part goes. Call it holding the lease, after `write`.
        """
        mine = f"run-{run}_"
        late = [p for p in self.parts() if p not in before and
                not p.rsplit("/", 1)[-1].startswith(mine)]
        for p in late:
            log.warning("removing part %s: written by a previous run's worker after this run "
                        "read the output (its rows were labeled again by this run)", p)
            self.fs.rm(p)
        return late

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

    def job_record(self) -> dict:
        """``_job.json``: job id, model, family, prompt version, adapter ({} if none)."""
        return {} if self.is_file() else self._read_json(JOB_RECORD)

    def start_job(self, lineage: dict, job_id: str | None, shards: dict[str, dict]) -> dict:
        """Create the job record, or check that a resumed run labels the same input with the
        same setup. ``lineage`` holds the input URI, model, family, prompt version, the adapter
        asked for and the one it resolved to; ``shards`` maps each shard to its fingerprint."""
        old = self.job_record()
        if old:
            for key in RESUME_KEYS:
                if key in old and old.get(key) != lineage.get(key):  # (older records lack some)
                    raise OutputError(
                        f"{self.uri} holds output of a job with {key}={old.get(key)!r}, this "
                        f"job has {lineage.get(key)!r}: resume with the same settings or use a "
                        f"new --output")
            changed = _shard_changes(old.get("shards") or {}, shards)
            if changed:
                raise OutputError(
                    f"{self.uri} holds output of {old.get('input')}, whose shards changed since "
                    f"the job started ({'; '.join(changed[:10])}): row ids would map onto other "
                    "rows. Label the new input into a new --output")
            return old
        rec = dict(lineage, job_id=job_id or uuid.uuid4().hex[:12],
                   created=datetime.now(UTC).isoformat(), shards=shards)
        self._write_json(JOB_RECORD, rec)
        return rec

    def lease(self, wait_s: float = 0.0, lease_s: float = 120.0) -> Lease:
        """Take the output's writer lease (waiting up to ``wait_s`` for another job)."""
        self.fs.makedirs(self.root, exist_ok=True)
        lease = Lease(self.fs, self.path(LEASE), f"job output {self.uri}", lease_s)
        try:
            return lease.acquire(wait_s)
        except LeaseHeld as e:
            raise OutputError(f"{e}: another label job is writing this output; wait for it "
                              "(--wait SECONDS) or use another --output") from None

    def part_times(self, parts: list[str]) -> list[float]:
        """When each of ``parts`` was written (epoch seconds, the filesystem's clock)."""
        out = []
        for p in parts:
            info = self.fs.info(p)
            t = info.get("mtime") or info.get("LastModified") or info.get("created")
            out.append(t.timestamp() if hasattr(t, "timestamp") else float(t))
        return out

    def startup_log(self, run: str) -> StartupLog:
        """Where this run's inference actors record their start-up; earlier runs' records
        are dropped (the caller holds the lease: no other run is writing)."""
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


def pa_array(values):
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
