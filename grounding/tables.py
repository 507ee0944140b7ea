"""Delta Lake tables (delta-rs), in one place: how to reach one, and how to commit to one so
that a commit happens exactly once.

A job output (`pipelines.output`) and the reviewed-label store (`grounding.store`) are Delta
tables: a table's whole state is its log, ``_delta_log/NNN.json``, and a writer commits by
creating the next log entry *conditionally* (delta-rs: an exclusive create locally,
``PUT If-None-Match: *`` on S3). Readers need nothing of ours: ``deltalake.DeltaTable(uri)``,
polars ``read_delta``, ``ray.data.read_delta`` and Spark read the same table.

What this module adds on top is what delta-rs leaves to the application:

* **Idempotency keys.** Every commit carries application transaction ids
  (``txn`` actions: ``Transaction(app_id, version)``). delta-rs refuses a commit whose app id
  another commit set after the snapshot it was built on (``CommitFailedError: Concurrent
  transaction``); a commit built on a snapshot that already holds the key is refused by the
  caller's ``check`` (measured: an app id alone is not a uniqueness constraint, a later commit
  from a fresh snapshot with the same id is accepted). Together: a commit whose key is taken is
  refused, whoever sends it.
* **Our own lost response.** On S3 a commit whose 200 response was lost is re-sent by the client
  and answered 412: our own log entry then looks like someone else's, and delta-rs reports a
  conflict. Every commit carries a unique ``commit_id`` in its commit info; after any failure
  `commit` reads the log entries written since its snapshot, and if one is its own the commit
  succeeded (`Committed.recovered`).

Record of a commit: ``commitInfo["groundlabel"]``, a JSON object (what the commit covers and
counts), read back with `records`.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from grounding.storage import StorageOptions

RECORD_KEY = "groundlabel"


class TableConflict(RuntimeError):
    """A commit was refused because what it covers is already committed (or changed) in the
    table: the losing side of a race, a zombie writer, or a stale retry."""


def table_uri(uri: str) -> str:
    """The URI delta-rs takes: s3:// as is, a local path made absolute."""
    if "://" in uri and not uri.startswith("file://"):
        return uri.rstrip("/")
    return os.path.abspath(uri.removeprefix("file://")).rstrip("/")


def delta_options(uri: str, storage: StorageOptions | None = None) -> dict[str, str]:
    """delta-rs storage options for ``uri`` from our `StorageOptions` (credentials from the
    environment, as for s3fs). On S3, commits are conditional PUTs (``If-None-Match``), which
    AWS S3, MinIO and moto honour; `grounding.atomic.probe` refuses a store that ignores them
    before the first write."""
    if not uri.startswith(("s3://", "s3a://")):
        return {}
    storage = storage or StorageOptions()
    opts = {"conditional_put": "etag"}
    if storage.s3_endpoint_url:
        opts["AWS_ENDPOINT_URL"] = storage.s3_endpoint_url
        if storage.s3_endpoint_url.startswith("http://"):
            opts["AWS_ALLOW_HTTP"] = "true"
    region = storage.s3_region or os.environ.get("AWS_REGION") or os.environ.get(
        "AWS_DEFAULT_REGION")
    if region:
        opts["AWS_REGION"] = region
    if storage.s3_anon:
        opts["AWS_SKIP_SIGNATURE"] = "true"
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        if os.environ.get(k):
            opts[k] = os.environ[k]
    return opts


def exists(uri: str, storage: StorageOptions | None = None) -> bool:
    from deltalake import DeltaTable

    return DeltaTable.is_deltatable(table_uri(uri), storage_options=delta_options(uri, storage))


def open_table(uri: str, storage: StorageOptions | None = None, version: int | None = None):
    """The table at ``uri`` (its newest version, or ``version``); `FileNotFoundError` if there is
    none."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return DeltaTable(table_uri(uri), version=version,
                          storage_options=delta_options(uri, storage))
    except TableNotFoundError as e:
        raise FileNotFoundError(f"no Delta table at {uri}: {e}") from None


_latest: dict[tuple[str, str], object] = {}


def latest(uri: str, storage: StorageOptions | None = None):
    """The table's newest snapshot, kept per process and brought up to date incrementally
    (only log entries written since it was read): a writer committing thousands of times
    reads the checkpoint once, not once a commit. Never mutate what it returns."""
    key = (table_uri(uri), json.dumps((storage or StorageOptions()).model_dump(),
                                      sort_keys=True))
    dt = _latest.get(key)
    if dt is None:
        dt = _latest[key] = open_table(uri, storage)
    else:
        dt.update_incremental()
    return dt


def create(uri: str, schema, storage: StorageOptions | None = None, *,
           description: str | None = None, configuration: dict[str, str] | None = None,
           record: dict | None = None) -> bool:
    """Create an empty table (version 0); False if one already exists (another creator won)."""
    from deltalake import CommitProperties, DeltaTable
    from deltalake.exceptions import DeltaError

    if exists(uri, storage):
        return False
    try:
        DeltaTable.create(table_uri(uri), schema=schema, mode="error", description=description,
                          configuration=configuration,
                          storage_options=delta_options(uri, storage),
                          # Version 0 or nothing: with retries, delta-rs turned a losing
                          # create into a second create commit at version 1.
                          commit_properties=CommitProperties(
                              custom_metadata={RECORD_KEY: json.dumps(record or {})},
                              max_commit_retries=0))
        return True
    except DeltaError:
        if exists(uri, storage):  # a concurrent creator won version 0
            return False
        raise


@dataclass
class Committed:
    """A commit that is in the table: its version, and whether it was found after the client
    reported a failure (a lost response, answered 412 on the re-send)."""

    version: int
    commit_id: str
    recovered: bool = False


def records(dt, limit: int | None = None, storage: StorageOptions | None = None
            ) -> list[dict]:
    """Our records of the table's commits, newest first: each is the commit's ``groundlabel``
    object plus ``version`` and ``timestamp`` (ms). Commits by other writers (OPTIMIZE, a
    user's own append) have none and are left out, and so are entries removed by log clean-up.

    Read from the log entries themselves (``_delta_log/NNN.json``, the ``commitInfo`` line),
    fetched concurrently: delta-rs's ``history`` fetches them one after another, 4.3 ms each
    on moto over loopback and tens of ms on S3, which made resume planning at 10M rows (2,500
    commits) take 30 s. ``storage`` must be what ``dt`` was opened with."""
    from grounding.storage import filesystem

    top = dt.version()
    versions = list(range(top, -1 if limit is None else max(-1, top - limit), -1))
    if not versions:
        return []
    fs, root = filesystem(dt.table_uri, storage)
    log = root.rstrip("/") + "/_delta_log/"
    # One GET an entry: fs.cat of a list HEADs every path first, and s3fs's cat_file HEADs a
    # file to size it unless told to read it in one request.
    one = {"max_concurrency": 1} if "s3" in fs.protocol else {}

    def entry(v: int) -> bytes | None:
        try:
            return fs.cat_file(f"{log}{v:020d}.json", **one)
        except FileNotFoundError:
            return None

    from concurrent.futures import ThreadPoolExecutor

    out = []
    with ThreadPoolExecutor(_READERS) as pool:
        for i in range(0, len(versions), _READ_BATCH):  # bounded: a few KB an entry in memory
            chunk = versions[i:i + _READ_BATCH]
            for v, data in zip(chunk, pool.map(entry, chunk), strict=True):
                rec = _record(data)
                if rec is not None:
                    rec.update(version=v)
                    out.append(rec)
    return out


_READERS = 16  # log entries fetched at once (S3 answers each in tens of ms)
_READ_BATCH = 1000


def _record(entry: bytes | None) -> dict | None:
    """Our record in one log entry (its ``commitInfo`` action), with ``timestamp``."""
    for line in (entry or b"").splitlines():
        if b'"commitInfo"' not in line:
            continue
        info = json.loads(line).get("commitInfo") or {}
        raw = info.get(RECORD_KEY)
        if not raw:
            return None
        rec = json.loads(raw) if isinstance(raw, str) else dict(raw)
        rec["timestamp"] = info.get("timestamp")
        return rec
    return None


def _landed(uri: str, storage, read_version: int, commit_id: str) -> int | None:
    """The version of our commit ``commit_id`` if it is in the log after ``read_version``."""
    dt = latest(uri, storage)
    new = dt.version() - read_version
    if new <= 0:
        return None
    for rec in records(dt, new, storage):
        if rec.get("commit_id") == commit_id:
            return rec["version"]
    return None


def commit(uri: str, storage: StorageOptions | None, do: Callable, *, record: dict,
           txns: Callable[[object], dict[str, int]] | None = None,
           check: Callable[[object], None] | None = None, tries: int = 20) -> Committed:
    """Commit exactly once.

    ``do(dt, commit_properties)`` makes the commit from table snapshot ``dt`` (a
    ``write_deltalake``, ``create_write_transaction`` ...). Before it, on that same snapshot,
    ``check(dt)`` raises `TableConflict` if what the commit covers is already there, and
    ``txns(dt)`` gives the application transactions (``{app_id: version}``) the commit sets.
    A concurrent commit that sets one of them makes delta-rs refuse ours; then the check runs
    again on a fresh snapshot. A failure after which our own log entry is found (lost
    response) is a success.
    """
    from deltalake import CommitProperties, Transaction
    from deltalake.exceptions import CommitFailedError

    commit_id = uuid.uuid4().hex
    rec = dict(record, commit_id=commit_id)
    last: Exception | None = None
    for attempt in range(tries):
        dt = latest(uri, storage)
        read_version = dt.version()
        if check is not None:
            check(dt)
        app = [Transaction(k, v) for k, v in (txns(dt) if txns else {}).items()]
        props = CommitProperties(custom_metadata={RECORD_KEY: json.dumps(rec)},
                                 app_transactions=app or None)
        try:
            do(dt, props)
        except Exception as e:  # noqa: BLE001 - decided below: ours landed, retry, or raise
            landed = _landed(uri, storage, read_version, commit_id)
            if landed is not None:
                return Committed(landed, commit_id, recovered=True)
            if not isinstance(e, CommitFailedError):
                raise
            last = e
            time.sleep(min(1.0, 0.02 * 2 ** attempt))
            continue
        landed = _landed(uri, storage, read_version, commit_id)
        if landed is None:  # delta-rs said yes; the log must say so too
            raise RuntimeError(f"commit {commit_id} to {uri} reported success but is not in "
                               "the table's log")
        return Committed(landed, commit_id)
    raise TableConflict(f"could not commit to {uri} after {tries} tries: {last}")


def file_paths(dt) -> list[str]:
    """Paths (relative to the table root) of the data files in the snapshot ``dt``."""
    t = dt.get_add_actions(flatten=True)
    import pyarrow as pa

    return pa.table(t).column("path").to_pylist()


def row_count(dt) -> int:
    """Rows in the snapshot, from its files' statistics (no data read)."""
    import pyarrow as pa

    t = pa.table(dt.get_add_actions(flatten=True))
    if "num_records" not in t.column_names:
        return 0
    return int(sum(v or 0 for v in t.column("num_records").to_pylist()))



def scan(dt, columns: list[str] | None = None):
    """The snapshot ``dt``'s rows as a stream of `pyarrow.RecordBatch` (``columns``: those
    only), read by delta-rs's own query engine. Not ``to_pyarrow_table`` / ``_dataset``:
    reading through a pyarrow dataset made the interpreter abort at exit ("terminate called
    without an active exception", delta-rs 1.6.6 + pyarrow 26): 1 in 6 runs of a CLI command
    that read a job output (`groundlabel eval`), most runs of a bare script."""
    import pyarrow as pa
    from deltalake import QueryBuilder

    cols = ", ".join(f'"{c}"' for c in columns) if columns else "*"
    reader = QueryBuilder().register("t", dt).execute(f"select {cols} from t")
    for batch in reader:
        yield pa.record_batch(batch)


def read_all(dt, columns: list[str] | None = None):
    """The snapshot ``dt``'s rows as one `pyarrow.Table` (see `scan`)."""
    import pyarrow as pa

    batches = list(scan(dt, columns))
    return pa.Table.from_batches(batches) if batches else None
