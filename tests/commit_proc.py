"""A writer of a job's output table, run as its own process by the fault tests:

    python commit_proc.py '{"uri": ..., "endpoint": ..., "shard": "s", "rows": [0, 8], ...}'

It writes a data file of output rows ``shard:rows[0] .. shard:rows[1]-1`` through the job's own
write path (`pipelines.commit.write_group`), prints ``written``, and commits it
(`JobOutput.commit_add`). Options: ``"lease": true`` takes the output's lease first and prints
``leased``; ``"wait": true`` waits for a line on stdin between writing and committing (a writer
paused there: a VM pause, a stopped process, a zombie); ``"replace": FILE`` writes the rows as
transient rows labeled again, replacing their old copies in FILE (`JobOutput.commit_replace`).
Prints ``committed VERSION`` or ``refused: WHY`` (exit code 3).
"""

from __future__ import annotations

import json
import sys


def main(spec: dict) -> int:
    from grounding.storage import StorageOptions
    from grounding.tables import TableConflict
    from pipelines import schema
    from pipelines.commit import WriteSpec, write_group
    from pipelines.output import JobOutput

    out = JobOutput(spec["uri"], StorageOptions(s3_endpoint_url=spec.get("endpoint")))
    job = out.job_record()
    if spec.get("lease"):
        out.lease(0, spec.get("lease_seconds", 60))  # held until this process ends
        print("leased", flush=True)
    size = int(job["piece_rows"])
    a, b = spec["rows"]
    shard = spec.get("shard", "s")
    rows = [{"row_id": f"{shard}:{i}", "shard": shard, "status": "ok", "text": spec.get("text"),
             "piece": i // size, "retry_of": spec.get("replace")} for i in range(a, b)]
    for r in rows:
        r["piece_n"] = (b - a) if spec.get("replace") else sum(
            1 for x in rows if x["piece"] == r["piece"])
    t = schema.table(rows, schema.PARSED)
    proposals, left = write_group(WriteSpec(out.uri, out.storage, spec.get("run", "p"), size),
                                  None, t)
    assert not left.num_rows and proposals, (left.num_rows, proposals)
    print("written", flush=True)
    if spec.get("wait"):
        sys.stdin.readline()
    try:
        for p in proposals:
            if p["kind"] == "add":
                c = out.commit_add(job["job_id"], p["file"], p["record"])
            else:
                c = out.commit_replace(job["job_id"], p["old"], p["file"], p["record"])
            print(f"committed {c.version}" + (" recovered" if c.recovered else ""), flush=True)
    except TableConflict as e:
        print(f"refused: {e}", flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
