"""Stage 1, read: shard files -> input rows (`grounding.formats`), minus rows already written.

Runs as CPU tasks, one shard per call. Rows whose ``row_id`` is in the shard's ``done`` list
(found in the output by an earlier, interrupted run) are skipped: that is the resume.
"""

from __future__ import annotations

import pyarrow as pa

from pipelines import schema
from pipelines.stages import Stage


class ReadShards(Stage):
    name = "read"
    needs = ("path", "shard", "done")
    after = "the shard listing"

    def __init__(self, storage_json: str, limit: int | None = None):
        self.storage_json = storage_json
        self.limit = limit

    def __call__(self, batch: pa.Table) -> pa.Table:
        from grounding.formats import read_shard
        from grounding.storage import StorageOptions, filesystem

        opts = StorageOptions.model_validate_json(self.storage_json)
        rows = []
        for item in self.check(batch):
            fs, path = filesystem(item["path"], opts)
            done = set(item["done"] or ())
            for i, row in enumerate(read_shard(fs, path, item["shard"])):
                if self.limit is not None and i >= self.limit:
                    break
                if row["row_id"] not in done:
                    rows.append(row)
        return schema.table(rows, schema.READ)
