"""The end-of-job summary (`pipelines.summary.summarize`) on a large output table.

The summary runs in the driver after every job; the scale curve (bench/RESULTS.md) measured
its old whole-output read at 300 MB more driver memory at 100,000 rows than at 10,000. It is
now a sum over the table's commit records. The table is written through the job's own commit
path (`pipelines.commit.commit_rows`), so these tests need no Ray and no engine.
"""

from __future__ import annotations

import tracemalloc

import pyarrow as pa
import pytest

from grounding.tables import TableConflict
from pipelines import schema
from pipelines.commit import commit_rows
from pipelines.output import JobOutput
from pipelines.summary import summarize

PARTS, PER_PART = 50, 2_000  # 100,000 rows


def _part(p: int) -> pa.Table:
    """One part of the OUTPUT schema: every 50th row an engine error, every 97th a corrupt
    image; every 10th row has a true box, predicted exactly on even parts (a hit) and
    nowhere near it on odd ones (a miss)."""
    n = PER_PART
    ids = [f"s{p}.jsonl:{i}" for i in range(n)]
    codes = ["engine_error" if i % 50 == 0 else "corrupt" if i % 97 == 0 else None
             for i in range(n)]
    gold = [[10.0, 10.0, 50.0, 50.0] if i % 10 == 5 else None for i in range(n)]
    hit = {"x1": 10.0, "y1": 10.0, "x2": 50.0, "y2": 50.0, "score": 0.9, "label": None}
    miss = {**hit, "x1": 100.0, "x2": 140.0}
    boxes = [[hit if p % 2 == 0 else miss] if c is None else [] for c in codes]
    cols = {f.name: pa.nulls(n, f.type) for f in schema.OUTPUT}
    cols.update(row_id=pa.array(ids), source_id=pa.array(ids), shard=pa.array([f"s{p}.jsonl"] * n),
                status=pa.array(["ok" if c is None else "error" for c in codes]),
                error_code=pa.array(codes, pa.string()),
                boxes=pa.array(boxes, schema.OUTPUT.field("boxes").type),
                gold=pa.array(gold, schema.OUTPUT.field("gold").type))
    return pa.table(cols, schema=schema.OUTPUT)


def test_summary_is_a_sum_over_commit_records_and_counts_every_row(tmp_path):
    """Counts, unique rows and Acc@0.5 over 100,000 rows in 50 commits are exact, a commit of
    rows already committed is refused, and the summary holds no row as Python objects: the
    Python heap's peak stays under 15 MB (the whole output as Python dicts is about 90 MB)."""
    out = JobOutput(str(tmp_path))
    job = out.start_job({"piece_rows": 128}, "job-sum", {})
    for p in range(PARTS):
        commit_rows(out, job, _part(p))
    with pytest.raises(TableConflict, match="already committed"):
        commit_rows(out, job, _part(0).slice(0, 128))  # piece 0 of s0.jsonl again

    tracemalloc.start()
    try:
        s = summarize(out, write=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    n = PARTS * PER_PART
    engine = PARTS * len(range(0, PER_PART, 50))
    corrupt = PARTS * sum(1 for i in range(PER_PART) if i % 97 == 0 and i % 50)
    assert s["rows"] == s["unique_rows"] == s["table_rows"] == n
    assert s["errors"] == {"engine_error": engine, "corrupt": corrupt}
    assert s["errors_transient"] == engine and s["errors_permanent"] == corrupt
    assert s["labeled"] == n - engine - corrupt
    assert s["status"] == {"ok": n - engine - corrupt, "error": engine + corrupt}
    with_gold = PARTS * (PER_PART // 10)
    # rows with a true box (i % 10 == 5) are never engine errors (i % 50 == 0); some are corrupt
    gold_errors = PARTS * sum(1 for i in range(5, PER_PART, 10) if i % 97 == 0)
    m = s["metrics"]
    assert m["n"] == with_gold
    assert m["parse_fail_rate"] == gold_errors / with_gold
    # even parts hit, odd parts miss: half the rows with a true box, less the failed ones
    assert m["acc@0.5"] == (with_gold // 2 - gold_errors // 2) / with_gold
    assert peak < 15 * 2**20, f"summary held {peak / 2**20:.0f} MB of Python objects"


def test_summary_of_an_empty_output_has_no_rows_and_no_metrics(tmp_path):
    s = summarize(JobOutput(str(tmp_path)), write=False)
    assert s["rows"] == s["unique_rows"] == s["labeled"] == 0
    assert s["status"] == s["errors"] == {} and "metrics" not in s
