"""Nothing lost, nothing twice, when a label job is rerun, raced or interrupted: the job's
identity (input and shards), one writer per output, transient rows retried without duplicates,
and parts deleted only when verifiably torn."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines import schema
from pipelines.config import LabelJobConfig
from pipelines.output import JobOutput, OutputError


def _cfg(data: Path, out: Path, **kw) -> LabelJobConfig:
    return LabelJobConfig(input=str(data), output=str(out), **kw)


def _shard(tmp_path: Path, n: int = 6, name: str = "a") -> Path:
    from grounding.synth import write_dataset

    return write_dataset(tmp_path / name, n, "base", seed=3)


# ---- job identity (no Ray: `plan` is what a run does before any work) -----------------------
def test_a_rerun_on_another_input_is_refused(tmp_path):
    from pipelines.label import plan

    a, b = _shard(tmp_path, name="a"), _shard(tmp_path, name="b")
    out = tmp_path / "out"
    plan(_cfg(a, out))
    rec = json.loads((out / "_job.json").read_text())
    assert rec["input"] == str(a) and set(rec["shards"]) == {"data.jsonl"}
    assert rec["shards"]["data.jsonl"]["size"] == a.stat().st_size
    with pytest.raises(OutputError, match=r"input=.*a/data.jsonl.*b/data.jsonl"):
        plan(_cfg(b, out))  # b's rows have the same ids: they would all count as done


def test_a_rerun_after_the_shard_changed_is_refused(tmp_path):
    from pipelines.label import plan

    a = _shard(tmp_path)
    out = tmp_path / "out"
    plan(_cfg(a, out))
    lines = a.read_text().splitlines()
    a.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # reordered: same size
    with pytest.raises(OutputError, match=r"shards changed.*data.jsonl: mtime"):
        plan(_cfg(a, out))


def test_an_output_inside_the_input_is_refused(tmp_path):
    from pipelines.label import plan

    a = _shard(tmp_path)
    with pytest.raises(OutputError, match="inside --input"):
        plan(_cfg(a.parent, a.parent / "out"))
    from groundlabel.cli import main

    assert main(["label", "--input", str(a.parent), "--output", str(a.parent / "o")]) == 2


# ---- parts: torn, unreadable, rewritten ------------------------------------------------------
def _part(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(schema.table(rows, schema.OUTPUT), path)


def _row(i: int, code: str | None = None) -> dict:
    return {"row_id": f"s:{i}", "shard": "s", "status": "error" if code else "ok",
            "error_code": code}


def test_only_verifiably_torn_parts_are_deleted(tmp_path):
    out = JobOutput(str(tmp_path))
    _part(tmp_path / "parts" / "good.parquet", [_row(0)])
    full = (tmp_path / "parts" / "good.parquet").read_bytes()
    (tmp_path / "parts" / "torn.parquet").write_bytes(full[: len(full) // 2])  # killed write
    assert out.committed() == {"s": ["s:0"]}
    assert not (tmp_path / "parts" / "torn.parquet").exists()
    # footer present but the middle damaged: not a torn write; stop, delete nothing
    bad = bytearray(full)
    bad[8:40] = b"\xff" * 32
    (tmp_path / "parts" / "damaged.parquet").write_bytes(bytes(bad))
    with pytest.raises(OutputError, match="(?s)damaged.parquet.*not deleted"):
        out.committed()
    assert (tmp_path / "parts" / "damaged.parquet").exists()


def test_a_read_error_on_a_whole_part_stops_the_job_instead_of_deleting_it(tmp_path,
                                                                           monkeypatch):
    """A credentials or network error while reading a complete part is not a torn write."""
    out = JobOutput(str(tmp_path))
    _part(tmp_path / "parts" / "p.parquet", [_row(0)])

    def denied(*a, **kw):
        raise PermissionError("AccessDenied: the credentials expired")

    monkeypatch.setattr(pq, "read_table", denied)
    with pytest.raises(OutputError, match="PermissionError: AccessDenied"):
        out.committed()
    assert (tmp_path / "parts" / "p.parquet").exists()


def test_transient_rows_are_removed_for_retry_and_a_cut_rewrite_is_repaired(tmp_path):
    out = JobOutput(str(tmp_path))
    p = tmp_path / "parts" / "p1.parquet"
    _part(p, [_row(0), _row(1, "engine_error"), _row(2, "corrupt"), _row(3, "fetch_failed")])
    _part(tmp_path / "parts" / "p2.parquet", [_row(4)])
    assert out.drop_transient() == 2
    assert not p.exists()
    assert out.committed() == {"s": ["s:0", "s:2", "s:4"]}  # corrupt stays: it is permanent
    # A rewrite cut after the replacement was complete: both files; the original goes. One
    # cut while the replacement itself was being written: the torn replacement goes.
    d = tmp_path / "cut"
    _part(d / "parts" / "q.parquet", [_row(5), _row(6, "engine_error")])
    _part(d / "parts" / "q~r.parquet", [_row(5)])
    _part(d / "parts" / "z.parquet", [_row(7), _row(8, "fetch_failed")])
    (d / "parts" / "z~r.parquet").write_bytes(b"PAR1 cut")
    assert JobOutput(str(d)).committed() == {"s": ["s:5", "s:7", "s:8"]}
    assert sorted(p.name for p in (d / "parts").iterdir()) == ["q~r.parquet", "z.parquet"]


# ---- real jobs (Ray + vLLM) ------------------------------------------------------------------
LABEL = [sys.executable, "-m", "groundlabel", "label", "--no-progress"]


@pytest.mark.slow
def test_two_jobs_on_one_output_one_is_refused_and_nothing_is_duplicated(tmp_path):
    data = _shard(tmp_path, n=48)
    out = tmp_path / "out"
    cmd = [*LABEL, "--input", str(data), "--output", str(out), "--batch-size", "2",
           "--rows-per-part", "2"]
    log = (tmp_path / "a.log").open("w")
    a = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (out / "_lease").exists():
            assert a.poll() is None and time.time() < deadline, (tmp_path / "a.log").read_text()
            time.sleep(0.05)
        b = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert b.returncode == 2, b.stdout + b.stderr
        assert "another label job is writing this output" in b.stderr
        assert a.wait(600) == 0, (tmp_path / "a.log").read_text()[-3000:]
    finally:
        if a.poll() is None:
            os.killpg(a.pid, signal.SIGKILL)
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows"] == summary["unique_rows"] == 48
    assert not (out / "_lease").exists()  # released


@pytest.mark.slow
def test_a_rerun_after_a_promotion_keeps_the_first_adapter_and_succeeds(tmp_path,
                                                                           random_adapter):
    from grounding.registry import AdapterRegistry

    reg = AdapterRegistry(str(tmp_path / "reg"))
    first = reg.register(random_adapter, {}, name="adapter-first")
    second = reg.register(random_adapter, {}, name="adapter-second")
    reg.promote(first)
    data = _shard(tmp_path, n=8)
    out = tmp_path / "out"
    cmd = [*LABEL, "--input", str(data), "--output", str(out), "--registry", str(reg.uri),
           "--adapter", "production", "--rows-per-part", "2", "--batch-size", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    parts = sorted((out / "parts").glob("*.parquet"))
    parts[0].unlink()                      # rows the first run never finished
    reg.promote(second)                    # a retrain promoted meanwhile
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = JobOutput(str(out)).read(["row_id", "adapter"]).to_pylist()
    assert len(rows) == len({r["row_id"] for r in rows}) == 8
    assert {r["adapter"] for r in rows} == {first}  # the whole job labels with one adapter


@pytest.mark.slow
def test_a_rerun_retries_transient_rows_and_replaces_them(tmp_path):
    data = _shard(tmp_path, n=8)
    out = tmp_path / "out"
    cmd = [*LABEL, "--input", str(data), "--output", str(out), "--rows-per-part", "4"]
    assert subprocess.run(cmd, capture_output=True, timeout=600).returncode == 0
    # Mark two rows as failed by a passing engine error, as a flaky run would have left them.
    part = sorted((out / "parts").glob("*.parquet"))[0]
    t = pq.read_table(part).to_pylist()
    for r in t[:2]:
        r.update(status="error", error_code="engine_error", error="RuntimeError: flaky",
                 boxes=[], raw_text=None)
    pq.write_table(schema.table(t, schema.OUTPUT), part)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "retrying 2 row(s) with a transient error" in res.stdout
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows"] == summary["unique_rows"] == 8
    assert summary["rows_this_run"] == 2 and summary["errors_transient"] == 0
