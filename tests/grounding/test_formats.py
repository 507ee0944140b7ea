"""Input formats -> input rows: seed JSONL, ms-swift JSONL, Parquet; bad lines become errors."""

from __future__ import annotations

import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from grounding.formats import read_shard


def _read(path, shard="s"):
    fs = fsspec.filesystem("file")
    return list(read_shard(fs, str(path), shard))


def test_seed_jsonl_rows_and_errors(tmp_path):
    lines = [
        json.dumps({"id": "a", "image": "img/a.png", "text": "the red square",
                    "bbox": [1, 2, 3, 4]}),                       # relative image path
        "{not json",                                              # bad JSON line
        json.dumps({"image": "/abs/b.png", "text": "  "}),        # empty text
        json.dumps({"text": "no image"}),                         # no image
        json.dumps({"image": "/abs/c.png", "text": "x", "bbox": [1, 2, 3]}),  # 3 numbers
        json.dumps([1, 2]),                                       # not an object
        "",                                                       # blank line: skipped
        json.dumps({"image": "s3://b/k.png", "text": "x", "adapter": "v2"}),
    ]
    p = tmp_path / "shard.jsonl"
    p.write_text("\n".join(lines) + "\n")
    rows = _read(p, "shard.jsonl")
    assert [r["row_id"] for r in rows] == [f"shard.jsonl:{i}" for i in (0, 1, 2, 3, 4, 5, 7)]
    assert rows[0]["image"] == f"{tmp_path}/img/a.png" and rows[0]["gold"] == [1, 2, 3, 4]
    assert rows[0]["source_id"] == "a" and rows[0]["error_code"] is None
    assert [r["error_code"] for r in rows[1:6]] == [
        "bad_json", "empty_text", "no_image", "bad_bbox", "bad_row"]
    assert rows[6]["adapter"] == "v2" and rows[6]["image"] == "s3://b/k.png"


def test_ms_swift_one_row_per_ref(tmp_path):
    row = {"messages": [{"role": "user", "content": "<image>Find <ref-object>"},
                        {"role": "assistant", "content": "<bbox>"}],
           "images": ["/data/cat.png"],
           "objects": {"ref": ["cat", "dog"], "bbox": [[0.1, 0.2, 0.5, 0.6], [0, 0, 1, 1]],
                       "bbox_type": "norm1", "image_id": [0, 0]}}
    p = tmp_path / "swift.jsonl"
    p.write_text(json.dumps(row) + "\n")
    rows = _read(p)
    assert [r["text"] for r in rows] == ["cat", "dog"]
    assert [r["row_id"] for r in rows] == ["s:0.0", "s:0.1"]
    assert rows[0]["gold_type"] == "norm1" and rows[0]["image"] == "/data/cat.png"


def test_parquet_with_inline_bytes(tmp_path):
    t = pa.table({"image": pa.array([b"\x89PNG..."], pa.binary()), "text": ["a cat"],
                  "bbox": [[1.0, 2.0, 3.0, 4.0]]})
    p = tmp_path / "x.parquet"
    pq.write_table(t, p)
    rows = _read(p)
    assert rows[0]["image_bytes"] == b"\x89PNG..." and rows[0]["image"] is None
    assert rows[0]["gold"] == [1.0, 2.0, 3.0, 4.0]
