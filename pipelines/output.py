"""A label job's output, as one object: the one place that knows its layout.

    OUTPUT/_job.json        the job record: job id, model, family, prompt version, adapter
    OUTPUT/parts/*.parquet  one row per input row (schema: `pipelines.schema.OUTPUT`)
    OUTPUT/_summary.json    rows, errors by code, speed, Acc@0.5 of the last run

`JobOutput` resolves the output's filesystem once and is what the label job, resume, ``eval``,
``report`` and ``review export`` all go through. ``JobOutput(uri)`` also accepts one Parquet file
(a part, or a file copied out of a job): it then has that one part and no job record.

Exactly once, by construction rather than by bookkeeping:

* Every output row carries its input's ``row_id`` (``{shard}:{line}``).
* Parts are written by Ray Data's Parquet writer. A Parquet file is readable only once its
  footer is written, so a part is either complete or unreadable; an object store makes the
  whole object visible at once anyway.
* Before a run, `JobOutput.committed` reads the ``row_id`` column of every readable part and
  deletes the unreadable ones (the partial writes of a killed run). The read stage then skips
  those ids.

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
from datetime import UTC, datetime

from grounding.storage import StorageOptions, arrow_filesystem, filesystem, join

log = logging.getLogger(__name__)

JOB_RECORD = "_job.json"
SUMMARY = "_summary.json"
PARTS = "parts"
# What a resumed job must share with the run that started the output.
RESUME_KEYS = ("model", "family", "prompt_version", "default_adapter")


class JobOutput:
    """The output folder (or single Parquet file) of a label job, on any filesystem."""

    def __init__(self, uri: str, storage: StorageOptions | None = None):
        self.uri = uri
        self.storage = storage or StorageOptions()
        self.fs, self.root = filesystem(uri, self.storage)

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
    def read(self, columns: list[str] | None = None):
        """All parts as one pyarrow table (only ``columns`` if given)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from pipelines import schema

        tables = []
        for p in self.parts():
            with self.fs.open(p, "rb") as f:
                tables.append(pq.read_table(f, columns=columns))
        if not tables:
            sch = schema.OUTPUT if columns is None else pa.schema(
                [schema.OUTPUT.field(c) for c in columns])
            return sch.empty_table()
        return pa.concat_tables(tables)

    def committed(self) -> dict[str, list[str]]:
        """Row ids already written, by shard; unreadable (partial) parts are deleted."""
        import pyarrow.parquet as pq

        done: dict[str, list[str]] = {}
        for part in self.parts():
            try:
                with self.fs.open(part, "rb") as f:
                    t = pq.read_table(f, columns=["row_id", "shard"])
            except Exception as e:  # noqa: BLE001 - any unreadable part is a partial write
                log.warning("removing partial part %s (%s)", part, e)
                self.fs.rm(part)
                continue
            for rid, shard in zip(t.column("row_id").to_pylist(), t.column("shard").to_pylist(),
                                  strict=True):
                done.setdefault(shard, []).append(rid)
        return done

    def write(self, ds) -> None:
        """Write a Ray Dataset of output rows as new parts (Ray Data's Parquet writer)."""
        afs, path = arrow_filesystem(self.uri_of(PARTS), self.storage)
        ds.write_parquet(path, filesystem=afs)

    # ---- records ----------------------------------------------------------------------
    def _read_json(self, name: str) -> dict:
        try:
            with self.fs.open(self.path(name), "r") as f:
                d = json.load(f)
        except (FileNotFoundError, ValueError):
            return {}
        return d if isinstance(d, dict) else {}

    def _write_json(self, name: str, data: dict) -> None:
        self.fs.makedirs(self.root, exist_ok=True)
        with self.fs.open(self.path(name), "w") as f:
            json.dump(data, f, indent=2)

    def job_record(self) -> dict:
        """``_job.json``: job id, model, family, prompt version, adapter ({} if none)."""
        return {} if self.is_file() else self._read_json(JOB_RECORD)

    def start_job(self, lineage: dict, job_id: str | None, input_uri: str) -> dict:
        """Create the job record, or check that a resumed run labels with the same setup."""
        old = self.job_record()
        if old:
            for key in RESUME_KEYS:
                if old.get(key) != lineage.get(key):
                    raise ValueError(
                        f"{self.uri} holds output of a job with {key}={old.get(key)!r}, this "
                        f"job has {lineage.get(key)!r}: resume with the same settings or use a "
                        f"new --output")
            return old
        rec = dict(lineage, job_id=job_id or uuid.uuid4().hex[:12],
                   created=datetime.now(UTC).isoformat(), input=input_uri)
        self._write_json(JOB_RECORD, rec)
        return rec

    def summary(self) -> dict:
        """``_summary.json`` of the last run ({} if none)."""
        return {} if self.is_file() else self._read_json(SUMMARY)

    def write_summary(self, summary: dict) -> None:
        self._write_json(SUMMARY, summary)
