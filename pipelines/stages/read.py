"""Stage 1, read: shard files -> input rows (`grounding.formats`), minus rows already committed.

Runs as CPU tasks, one shard per call. Each row belongs to a *piece*, lines
``[k * piece_rows, (k + 1) * piece_rows)`` of its shard (`pipelines.output`); rows of the
pieces in the shard's ``done`` ranges (committed by an earlier run) are skipped: that is the
resume. Each row carries its piece and how many rows this stage emits for it, so the commit
knows when a piece is whole. Rows listed in ``retry`` (a transient error in an earlier run)
are emitted again, tagged with the data file whose row they replace.
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


def fingerprints(shards: list[tuple[str, str]], storage: StorageOptions) -> dict[str, dict]:
    """``{shard: {"size", "etag" | "mtime"}}``: what a rerun compares to refuse a changed input
    (the S3 ETag is a hash of the content; a local file's mtime changes with every write)."""
    out = {}
    for uri, rel in shards:
        fs, path = filesystem(uri, storage)
        info = fs.info(path)
        fp = {"size": int(info.get("size") or 0)}
        etag = info.get("ETag") or info.get("etag")
        if etag:
            fp["etag"] = str(etag).strip('"')
        elif info.get("mtime") is not None:
            fp["mtime"] = float(info["mtime"])
        out[rel] = fp
    return out


def check_output_outside(input_uri: str, output_uri: str, storage: StorageOptions) -> None:
    """Refuse an output folder inside the input prefix: its parts would be read back as input
    by the next run."""
    fs_in, p_in = filesystem(input_uri, storage)
    fs_out, p_out = filesystem(output_uri, storage)
    if fs_in.protocol != fs_out.protocol:
        return
    p_in, p_out = p_in.rstrip("/"), p_out.rstrip("/")
    if p_out == p_in or p_out.startswith(p_in + "/"):
        from pipelines.output import OutputError

        raise OutputError(f"--output {output_uri} is inside --input {input_uri}: the next run "
                          "would read the output back as input; put the output elsewhere")


class ReadShards(StageFn):
    name = "read"
    needs = ("path", "shard", "done", "retry")
    after = "the shard listing"

    def __init__(self, storage: StorageOptions, limit: int | None = None, piece_rows: int = 128):
        self.storage = storage
        self.limit = limit
        self.piece_rows = piece_rows

    @classmethod
    def stage(cls, storage: StorageOptions, limit: int | None, rows_per_block: int,
              piece_rows: int) -> Stage:
        # A shard is one block; cut it into batch-sized blocks so that images are fetched in
        # parallel, the actors stream, and pieces are committed as their rows finish rather
        # than when a whole shard is done.
        return Stage(cls, {"storage": storage, "limit": limit, "piece_rows": piece_rows},
                     batch_size=1, rows_per_block=rows_per_block)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from collections import Counter

        from grounding.formats import read_shard
        from pipelines.output import expand, line_of

        rows = []
        for item in self.check(batch):
            fs, path = filesystem(item["path"], self.storage)
            done = set(expand(item["done"] or ()))
            retry = {rid: (f, n) for rid, f, n in (item.get("retry") or ())}
            new = []
            for i, row in enumerate(read_shard(fs, path, item["shard"])):
                if self.limit is not None and i >= self.limit:
                    break
                piece = line_of(row["row_id"]) // self.piece_rows
                if piece not in done:
                    new.append(dict(row, piece=piece))
                elif row["row_id"] in retry:
                    f, n = retry[row["row_id"]]
                    rows.append(dict(row, piece=piece, piece_n=n, retry_of=f))
            count = Counter(r["piece"] for r in new)
            rows.extend(dict(r, piece_n=count[r["piece"]]) for r in new)
        return schema.table(rows, schema.READ)
