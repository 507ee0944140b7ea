"""Compare two label job outputs row by row on their content columns (not timings, job ids
or the model path, which differs between checkouts).

Used to check that a change to how rows are scheduled leaves what is written unchanged::

    .venv/bin/python bench/compare_outputs.py runs/chunked runs/continuous
"""

from __future__ import annotations

import json
import sys

CONTENT = ("row_id", "source_id", "text", "boxes", "score", "status", "error_code", "error",
           "raw_text", "num_tokens", "width", "height", "adapter", "family",
           "prompt_version")


def content(uri: str) -> list[dict]:
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
