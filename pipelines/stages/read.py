"""Stage 1, read: shard files -> input rows (`grounding.formats`), minus rows already written.

Runs as CPU tasks, one shard per call. Rows whose ``row_id`` is in the shard's ``done`` list
(found in the output by an earlier, interrupted run) are skipped: that is the resume.
"""

from __future__ import annotations

import pyarrow as pa

from grounding.formats import INPUT_EXTS
from grounding.storage import StorageOptions, filesystem
from pipelines import schema
from pipelines.stages import Stage, StageFn


def list_shards(uri: str, storage: StorageOptions) -> list[tuple[str, str]]:
    """``(full URI, name relative to the input)`` of every input shard under ``uri``."""
    fs, path = filesystem(uri, storage)
    if not fs.exists(path):
        raise FileNotFoundError(f"input not found: {uri}")
    scheme = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    if fs.isfile(path):
        return [(uri, path.rsplit("/", 1)[-1])]
    files = sorted(p for p in fs.find(path) if p.endswith(INPUT_EXTS) and "/_" not in p)
    if not files:
        raise ValueError(f"no input shards ({', '.join(INPUT_EXTS)}) under {uri}")
    return [(scheme + p if scheme else p, p[len(path):].lstrip("/")) for p in files]


class ReadShards(StageFn):
    name = "read"
    needs = ("path", "shard", "done")
    after = "the shard listing"

    def __init__(self, storage: StorageOptions, limit: int | None = None):
        self.storage = storage
        self.limit = limit

    @classmethod
    def stage(cls, storage: StorageOptions, limit: int | None, rows_per_block: int) -> Stage:
        # A shard is one block; cut it into batch-sized blocks so that images are fetched in
        # parallel, the actors stream, and parts are written (committed) as rows finish rather
        # than when a whole shard is done.
        return Stage(cls, {"storage": storage, "limit": limit}, batch_size=1,
                     rows_per_block=rows_per_block)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from grounding.formats import read_shard

        rows = []
        for item in self.check(batch):
            fs, path = filesystem(item["path"], self.storage)
            done = set(item["done"] or ())
            for i, row in enumerate(read_shard(fs, path, item["shard"])):
                if self.limit is not None and i >= self.limit:
                    break
                if row["row_id"] not in done:
                    rows.append(row)
        return schema.table(rows, schema.READ)
