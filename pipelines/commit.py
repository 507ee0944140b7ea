"""The last step of a label job: Ray Data's output rows -> data files -> commits, as rows finish.

Ray Data streams the parsed rows; the driver takes its output block by block (references
only: `Dataset.iter_internal_ref_bundles`, no row passes through the driver) and, every
``commit_rows`` rows or ``commit_seconds`` seconds, whichever comes first, hands the blocks
to a Ray task (`write_group`) that writes one Parquet data file of the *complete* pieces among
them and returns its description; the driver then commits it (`JobOutput.commit_add`). A
piece whose rows have not all come back yet (its rows travel in several blocks) is carried,
as an object reference, into the next group. So every commit holds whole pieces, the files
hold ``commit_rows`` rows or more (fewer only when ``commit_seconds`` ran out first), and a
killed job loses at most the rows since its last commit.

Rows labeled again after a transient error (``retry_of``: the file holding the old row) are
grouped by that file; once all of a file's retried rows are back, the task writes the file
anew with them in place and the driver commits the replacement (`JobOutput.commit_replace`).
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass

from grounding.storage import StorageOptions


@dataclass(frozen=True)
class WriteSpec:
    """What a write task needs: where the table is, whose run it is (file names)."""

    uri: str
    storage: StorageOptions
    run: str
    piece_rows: int
    commit_rows: int = 4096


def _write_file(spec: WriteSpec, t) -> dict:
    """Write ``t`` (output columns) as a new data file in the table folder; its description."""
    import io

    import pyarrow.parquet as pq

    from grounding.storage import filesystem, join
    from pipelines.output import file_stats

    fs, root = filesystem(spec.uri, spec.storage)
    name = f"part-{spec.run}-{uuid.uuid4().hex[:16]}.parquet"
    buf = io.BytesIO()
    pq.write_table(t, buf)
    data = buf.getvalue()
    with fs.open(join(root, name), "wb") as f:
        f.write(data)
    return {"path": name, "size": len(data), "stats": file_stats(t)}


def write_group(spec: WriteSpec, leftover, *blocks):
    """A Ray task: the complete pieces of ``leftover`` + ``blocks`` (each a table, or a
    `BlockSlice` of one) become one new data file, and each file whose retried rows
    are all back is written anew; returns ``(proposals, leftover)``, the commits to make and
    the rows still waiting for the rest of their piece."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipelines import schema
    from pipelines.output import JobOutput, file_record, line_of

    parts = [leftover] if leftover is not None and leftover.num_rows else []
    for b in blocks:
        if isinstance(b, BlockSlice):
            import ray

            b = ray.get(b.ref).slice(b.start, b.end - b.start)
        if b.num_rows:
            parts.append(b.select(schema.PARSED.names).cast(schema.PARSED))
    if not parts:
        return [], schema.PARSED.empty_table()
    # One row per row id before counting: a block handed on twice (a task retried after its
    # worker died) must not make a piece look whole while one of its rows is still missing.
    t = _dedupe(pa.concat_tables(parts))
    retry = pc.is_valid(t["retry_of"])
    new, again = t.filter(pc.invert(retry)), t.filter(retry)
    proposals, waiting = [], []

    # New rows: a piece is complete when as many rows as the read stage emitted are here.
    n = Counter(zip(new["shard"].to_pylist(), new["piece"].to_pylist(), strict=True))
    need = dict(zip(zip(new["shard"].to_pylist(), new["piece"].to_pylist(), strict=True),
                    new["piece_n"].to_pylist(), strict=True))
    complete = {k for k, c in n.items() if c >= need[k]}
    keys = list(zip(new["shard"].to_pylist(), new["piece"].to_pylist(), strict=True))
    mask = pa.array([k in complete for k in keys], pa.bool_())
    done = new.filter(mask)
    waiting.append(new.filter(pc.invert(mask)))
    if done.num_rows:
        done = done.sort_by([("shard", "ascending"), ("piece", "ascending")])
        for part in _files_of(done, spec.commit_rows):
            rec = dict(file_record(part), piece_rows=spec.piece_rows, run=spec.run)
            proposals.append({"kind": "add", "file": _write_file(spec, part.select(
                schema.OUTPUT.names)), "record": rec})

    # Retried rows: a file is rewritten once all of its retried rows are here.
    files = again["retry_of"].to_pylist()
    have = Counter(files)
    need_f = dict(zip(files, again["piece_n"].to_pylist(), strict=True))
    out = JobOutput(spec.uri, spec.storage)
    for f in sorted(have):
        rows = again.filter(pc.equal(again["retry_of"], f))
        if have[f] < need_f[f]:
            waiting.append(rows)
            continue
        old = out._read_file(f)
        keep = old.filter(pc.invert(pc.is_in(old["row_id"], value_set=rows["row_id"])))
        piece = pa.array([None] * keep.num_rows, pa.int64())
        merged = pa.concat_tables([keep.append_column("piece", piece),
                                   rows.select([*schema.OUTPUT.names, "piece"])])
        # Pieces of the kept rows: from their row ids and the job's piece size.
        merged = merged.set_column(merged.schema.get_field_index("piece"), "piece", pa.array(
            [line_of(r) // spec.piece_rows for r in merged["row_id"].to_pylist()], pa.int64()))
        rec = dict(file_record(merged), piece_rows=spec.piece_rows, run=spec.run,
                   retried=rows.num_rows)
        proposals.append({"kind": "replace", "old": f, "record": rec,
                          "file": _write_file(spec, merged.select(schema.OUTPUT.names))})
    rest = [w for w in waiting if w.num_rows]
    return proposals, (pa.concat_tables(rest) if rest else schema.PARSED.empty_table())


def _files_of(t, rows: int):
    """``t`` (sorted by shard and piece) cut at piece boundaries into files of at least
    ``rows`` rows (the last one may be smaller): Ray Data may hand over more rows at once
    than one commit should hold."""
    keys = list(zip(t["shard"].to_pylist(), t["piece"].to_pylist(), strict=True))
    start = 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or (i - start >= rows and keys[i] != keys[i - 1]):
            yield t.slice(start, i - start)
            start = i


def _dedupe(t):
    """One row per row id (first wins): Ray Data hands a row on once, but a task retried
    after a worker died can produce a block twice."""
    import pyarrow as pa

    seen, keep = set(), []
    for rid in t["row_id"].to_pylist():
        keep.append(rid not in seen)
        seen.add(rid)
    return t if all(keep) else t.filter(pa.array(keep))


class Committer:
    """Consumes a dataset of parsed rows on the driver and commits it to the job's table."""

    def __init__(self, output, job_id: str, spec: WriteSpec, *, commit_rows: int,
                 commit_seconds: float, on_commit=None):
        self.output = output
        self.job_id = job_id
        self.spec = spec
        self.commit_rows = commit_rows
        self.commit_seconds = commit_seconds
        self.on_commit = on_commit
        self.commits: list[dict] = []
        self.first_commit_at: float | None = None

    def run(self, ds) -> list[dict]:
        """Drain ``ds`` into commits; returns this run's commit records."""
        import ray

        write = ray.remote(write_group).options(num_returns=2, num_cpus=0.25)
        bundles: queue.Queue = queue.Queue(maxsize=64)
        stop = threading.Event()
        end = object()

        def feed():
            it = ds.iter_internal_ref_bundles()
            try:
                for b in it:
                    while not stop.is_set():
                        try:
                            bundles.put(b, timeout=0.5)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        break
                bundles.put(end)
            except BaseException as e:  # noqa: BLE001 - re-raised on the driver's thread
                bundles.put(e)
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()

        feeder = threading.Thread(target=feed, name="groundlabel-commit-feed", daemon=True)
        feeder.start()
        pending: list = []
        rows = 0
        since: float | None = None
        leftover = None
        try:
            finished = False
            while not finished:
                try:
                    item = bundles.get(timeout=1.0)
                except queue.Empty:
                    item = None
                if item is end:
                    finished = True
                elif isinstance(item, BaseException):
                    raise item
                elif item is not None:
                    for entry, sl in zip(item.blocks, item.slices, strict=True):
                        pending.append(entry.ref if sl is None else
                                       BlockSlice(entry.ref, sl.start_offset, sl.end_offset))
                    rows += item.num_rows() or 0
                    since = since or time.time()
                due = rows >= self.commit_rows or (
                    since is not None and time.time() - since >= self.commit_seconds)
                if pending and (due or finished):
                    leftover = self._flush(write, leftover, pending)
                    pending, rows, since = [], 0, None
            if leftover is not None:
                left = self._not_committed(ray.get(leftover))
                if left.num_rows:
                    raise RuntimeError(
                        f"{left.num_rows} row(s) of {len(set(left['piece'].to_pylist()))} "
                        "piece(s) never came back from the pipeline whole; they are not "
                        "committed: rerun the same command to label them")
        finally:
            stop.set()
        return self.commits

    def _not_committed(self, left):
        """Rows left over at the end, less copies of rows of pieces this run committed (a
        block handed on twice)."""
        import pyarrow as pa

        done = {(s, p) for c in self.commits if c.get("kind") == "add"
                for s, rngs in c["pieces"].items() for a, b in rngs for p in range(a, b)}
        keep = [(s, p) not in done for s, p in zip(left["shard"].to_pylist(),
                                                   left["piece"].to_pylist(), strict=True)]
        return left.filter(pa.array(keep, pa.bool_()))

    def _flush(self, write, leftover, pending):
        import ray

        proposals_ref, leftover = write.remote(self.spec, leftover, *pending)
        for p in ray.get(proposals_ref):
            if p["kind"] == "add":
                c = self.output.commit_add(self.job_id, p["file"], p["record"])
            else:
                c = self.output.commit_replace(self.job_id, p["old"], p["file"], p["record"])
            rec = dict(p["record"], kind=p["kind"], replaces=p.get("old"), version=c.version,
                       recovered=c.recovered, file=p["file"]["path"])
            self.first_commit_at = self.first_commit_at or time.time()
            self.commits.append(rec)
            if self.on_commit:
                self.on_commit(rec)
        return leftover


@dataclass(frozen=True)
class BlockSlice:
    """Rows ``[start, end)`` of a block: a Ray Data bundle may hand on part of a block. Ray
    resolves only top-level references of a task's arguments, so the task gets this one."""

    ref: object
    start: int
    end: int


def commit_rows(output, job: dict, t, run: str = "direct") -> list[dict]:
    """Commit a table of output rows through the same path as a job's writer (`write_group`,
    then `JobOutput.commit_add`), with no Ray: for importing rows labeled elsewhere, tests and
    the bookkeeping benchmark. Every piece of ``t`` must be whole (all its rows in ``t``)."""
    import pyarrow as pa

    from pipelines import schema
    from pipelines.output import line_of

    size = int(job["piece_rows"])
    t = t.select(schema.OUTPUT.names).cast(schema.OUTPUT)
    if t["shard"].null_count:  # the shard is the row id's prefix
        t = t.set_column(t.schema.get_field_index("shard"), "shard", pa.array(
            [r.rsplit(":", 1)[0] for r in t["row_id"].to_pylist()], pa.string()))
    pieces = [line_of(r) // size for r in t["row_id"].to_pylist()]
    n = Counter(zip(t["shard"].to_pylist(), pieces, strict=True))
    t = (t.append_column("piece", pa.array(pieces, pa.int64()))
         .append_column("piece_n", pa.array([n[k] for k in zip(t["shard"].to_pylist(), pieces,
                                                                strict=True)], pa.int32()))
         .append_column("retry_of", pa.nulls(t.num_rows, pa.string())))
    proposals, left = write_group(WriteSpec(output.uri, output.storage, run, size), None, t)
    assert not left.num_rows
    out = []
    for p in proposals:
        c = output.commit_add(job["job_id"], p["file"], p["record"])
        out.append(dict(p["record"], version=c.version, recovered=c.recovered))
    return out
