"""Columns of a labeling job, stage by stage, and the output schema users read.

Output (one row per input row of the Delta table at ``OUTPUT``; read it with polars
``read_delta``, ``ray.data.read_delta`` or deltalake's ``QueryBuilder``: see
`pipelines.output`):

| column         | type                 | meaning |
|----------------|----------------------|---------|
| row_id         | string               | ``{shard}:{line}``: stable, unique; the exactly-once key |
| shard          | string               | input file, relative to the job input |
| source_id      | string               | the input row's own ``id`` |
| image          | string               | input image reference (never image bytes) |
| text           | string               | referring expression |
| boxes          | list<struct>         | ``x1, y1, x2, y2`` (float pixels of the ORIGINAL image, xyxy), ``score`` (0-1), ``label`` |
| score          | double               | answer confidence: geometric-mean probability of the coordinate tokens (raw) |
| calibrated_score | double             | P(the answer is right) from the registry's calibration of this model + adapter + prompt version (`grounding.calibration`); null without one |
| calibration    | string               | id of that calibration |
| status         | string               | ``ok``, ``clipped``, ``truncated``, ``empty``, ``unparseable``, or ``error`` |
| error_code     | string               | see `grounding.errors` (meaning, transient or not); null when the row was labeled |
| error          | string               | human-readable error |
| raw_text       | string               | the model's raw answer |
| width, height  | int32                | original image size in pixels |
| gold           | list<double>         | true box from the input, in original pixels, if given |
| model, adapter, family, prompt_version, job_id | string | lineage of the prediction |
| fetch_ms, infer_ms | double           | time spent on this row's image and its share of its batch |
| num_tokens     | int32                | generated tokens |
"""

from __future__ import annotations

import pyarrow as pa

from grounding.errors import ERROR_CODES as _ERROR_CODES

# Error codes and their meaning: the one table is `grounding.errors`.
ERROR_CODES = _ERROR_CODES

BOX = pa.struct([("x1", pa.float64()), ("y1", pa.float64()), ("x2", pa.float64()),
                 ("y2", pa.float64()), ("score", pa.float64()), ("label", pa.string())])

# Bookkeeping carried from the read stage to the commit, never written to the table: the
# row's *piece* (a fixed range of `piece_rows` lines of its shard: the unit a commit covers
# and a resume skips, `pipelines.output`), how many rows the read stage emitted for that piece
# in this run (the piece is complete, and can be committed, when that many have come back),
# and for a row labeled again after a transient error, the data file whose row it replaces.
INTERNAL = [("piece", pa.int64()), ("piece_n", pa.int32()), ("retry_of", pa.string())]

READ = pa.schema([
    ("row_id", pa.string()), ("shard", pa.string()), ("source_id", pa.string()),
    ("image", pa.string()), ("image_bytes", pa.binary()), ("text", pa.string()),
    ("gold", pa.list_(pa.float64())), ("gold_type", pa.string()), ("adapter", pa.string()),
    ("error_code", pa.string()), ("error", pa.string()), *INTERNAL,
])

FETCHED = pa.schema([
    *[f for f in READ if f.name not in ("image_bytes", "gold_type")],
    ("pixels", pa.binary()), ("in_width", pa.int32()), ("in_height", pa.int32()),
    ("width", pa.int32()), ("height", pa.int32()), ("fetch_ms", pa.float64()),
])

GENERATED = pa.schema([
    *[f for f in FETCHED if f.name not in ("pixels", "in_width", "in_height")],
    ("raw_text", pa.string()), ("tokens", pa.list_(pa.string())),
    ("logprobs", pa.list_(pa.float64())), ("infer_ms", pa.float64()),
])

OUTPUT = pa.schema([
    ("row_id", pa.string()), ("shard", pa.string()), ("source_id", pa.string()),
    ("image", pa.string()), ("text", pa.string()), ("boxes", pa.list_(BOX)),
    ("score", pa.float64()), ("calibrated_score", pa.float64()), ("calibration", pa.string()),
    ("status", pa.string()), ("error_code", pa.string()),
    ("error", pa.string()), ("raw_text", pa.string()), ("width", pa.int32()),
    ("height", pa.int32()), ("gold", pa.list_(pa.float64())), ("model", pa.string()),
    ("adapter", pa.string()), ("family", pa.string()), ("prompt_version", pa.string()),
    ("job_id", pa.string()), ("fetch_ms", pa.float64()), ("infer_ms", pa.float64()),
    ("num_tokens", pa.int32()),
])

# What the parse stage hands to the commit: the output columns and the bookkeeping.
PARSED = pa.schema([*OUTPUT, *INTERNAL])


def table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows -> a table of exactly ``schema`` (missing keys are null, extra keys dropped)."""
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows],
                                schema=schema)
