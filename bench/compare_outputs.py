"""Compare two label job outputs row by row on their content columns (not timings, job ids
or the model path, which differs between checkouts).

Used to check that a change to how rows are scheduled or stored leaves what is written
unchanged. An output is a job's Delta table, or a folder of the layout before it (``parts/``
of Parquet files, read as they are)::

    .venv/bin/python bench/compare_outputs.py runs/chunked runs/continuous
"""

from __future__ import annotations

import json
import sys

CONTENT = ("row_id", "source_id", "text", "boxes", "score", "status", "error_code", "error",
           "raw_text", "num_tokens", "width", "height", "adapter", "family",
           "prompt_version")


def content(uri: str) -> list[dict]:
    from pathlib import Path

    if (Path(uri) / "parts").is_dir():  # the layout before the Delta table
        import pyarrow.dataset as ds

        rows = ds.dataset(str(Path(uri) / "parts"), format="parquet").to_table(
            columns=list(CONTENT)).to_pylist()
    else:
        from pipelines.output import JobOutput

        rows = JobOutput(uri).read(list(CONTENT)).to_pylist()
    return sorted(rows, key=lambda r: r["row_id"])


def main() -> None:
    a, b = content(sys.argv[1]), content(sys.argv[2])
    diff = [(x["row_id"], c) for x, y in zip(a, b, strict=False) for c in CONTENT
            if x[c] != y[c]]
    print(json.dumps({"rows": [len(a), len(b)], "ok_rows": sum(r["status"] == "ok" for r in a),
                      "identical": len(a) == len(b) and not diff, "differences": diff[:20]}))
    sys.exit(0 if len(a) == len(b) and not diff else 1)


if __name__ == "__main__":
    main()
