"""Stage 5, write: Parquet parts under ``OUTPUT/parts/``, and what makes a rerun resume.

Exactly once, by construction rather than by bookkeeping:

* Every output row carries its input's ``row_id`` (``{shard}:{line}``).
* Parts are written by Ray Data's Parquet writer. A Parquet file is readable only once its
  footer is written, so a part is either complete or unreadable; an object store makes the
  whole object visible at once anyway.
* Before a run, `committed` reads the ``row_id`` column of every readable part and deletes the
  unreadable ones (the partial writes of a killed run). The read stage then skips those ids.

So a killed job, started again, writes exactly the rows that are missing: no duplicates, and
finished rows are not redone. We chose this over Ray Data's ``checkpoint_config`` because the
output itself is the checkpoint (nothing separate can drift from it), it works the same on local
disks and object stores, a user can verify it with one query (``count(*) == count(distinct
row_id)``), and it needs no network file system shared by the cluster for local paths.
"""

from __future__ import annotations

import logging

from grounding.storage import StorageOptions, filesystem, join

log = logging.getLogger(__name__)


def parts_uri(output: str) -> str:
    return join(output, "parts")


def list_parts(output: str, opts: StorageOptions) -> list[str]:
    fs, path = filesystem(parts_uri(output), opts)
    if not fs.exists(path):
        return []
    return sorted(p for p in fs.find(path) if p.endswith(".parquet"))


def committed(output: str, opts: StorageOptions) -> dict[str, list[str]]:
    """Row ids already written, by shard; unreadable (partial) parts are deleted."""
    import pyarrow.parquet as pq

    fs, _ = filesystem(parts_uri(output), opts)
    done: dict[str, list[str]] = {}
    for part in list_parts(output, opts):
        try:
            with fs.open(part, "rb") as f:
                t = pq.read_table(f, columns=["row_id", "shard"])
        except Exception as e:  # noqa: BLE001 - any unreadable part is a partial write
            log.warning("removing partial part %s (%s)", part, e)
            fs.rm(part)
            continue
        for rid, shard in zip(t.column("row_id").to_pylist(), t.column("shard").to_pylist(),
                              strict=True):
            done.setdefault(shard, []).append(rid)
    return done


def write(ds, output: str, opts: StorageOptions) -> None:
    from grounding.storage import arrow_filesystem

    afs, path = arrow_filesystem(parts_uri(output), opts)
    ds.write_parquet(path, filesystem=afs)
