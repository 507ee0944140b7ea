"""`grounding.tables.records`: commit records read from the log's entries, concurrently, the
same as delta-rs's history, locally and on moto's S3."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

from grounding import tables
from grounding.storage import StorageOptions


def _table(uri: str, storage: StorageOptions, n: int) -> None:
    from deltalake import CommitProperties, write_deltalake

    for i in range(n):
        write_deltalake(tables.table_uri(uri), pa.table({"a": [i]}), mode="append",
                        storage_options=tables.delta_options(uri, storage),
                        commit_properties=CommitProperties(custom_metadata={
                            tables.RECORD_KEY: json.dumps({"i": i})} if i % 3 else None))


def _from_history(dt, limit=None) -> list[dict]:
    out = []
    for h in dt.history(limit):
        if h.get(tables.RECORD_KEY):
            out.append(dict(json.loads(h[tables.RECORD_KEY]), version=h["version"],
                            timestamp=h.get("timestamp")))
    return out


@pytest.mark.parametrize("where", ["local", "s3"])
def test_records_are_the_histories_records(where, tmp_path, s3_endpoint):
    if where == "s3":
        import boto3

        storage = StorageOptions(s3_endpoint_url=s3_endpoint)
        boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="records")
        uri = "s3://records/t"
    else:
        storage, uri = StorageOptions(), str(tmp_path / "t")
    _table(uri, storage, 23)
    dt = tables.open_table(uri, storage)
    want = _from_history(dt)
    assert [r["i"] for r in want] == [i for i in range(22, -1, -1) if i % 3]
    assert tables.records(dt, storage=storage) == want
    assert tables.records(dt, 5, storage=storage) == _from_history(dt, 5)
    assert tables.records(dt, 0, storage=storage) == []


def test_a_cleaned_up_log_entry_is_left_out(tmp_path):
    """Entries before a checkpoint may be removed by log clean-up: their records are gone
    (the caller reads such files instead); the rest still come back."""
    uri = str(tmp_path / "t")
    _table(uri, StorageOptions(), 7)
    dt = tables.open_table(uri)
    dt.create_checkpoint()
    os.remove(tmp_path / "t" / "_delta_log" / f"{2:020d}.json")
    got = tables.records(tables.open_table(uri))
    assert [r["version"] for r in got] == [5, 4, 1]  # 2 removed; 0, 3, 6 carry none


def test_records_cost_one_get_per_log_entry_and_no_head(tmp_path, s3_endpoint):
    """Requests counted at a loopback proxy in front of moto: reading the records of N commits
    is N GETs of log entries, nothing else per entry (s3fs's cat_file first HEADs a file to
    size it, which doubled resume planning's requests at 10M rows)."""
    import re
    import time

    import boto3
    from support import fault_proxy

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="counted")
    storage = StorageOptions(s3_endpoint_url=s3_endpoint)
    _table("s3://counted/t", storage, 12)
    log = tmp_path / "proxy.log"
    with fault_proxy(s3_endpoint, drops=0, log=log) as proxy:
        via = StorageOptions(s3_endpoint_url=proxy["url"])
        dt = tables.open_table("s3://counted/t", via)
        before = len(log.read_text().splitlines())
        got = tables.records(dt, storage=via)
        time.sleep(0.2)
        lines = log.read_text().splitlines()[before:]
    assert len(got) == 8
    reqs = [m.groups() for ln in lines if (m := re.match(r"req (\w+) (\S+)", ln))]
    entries = [p for meth, p in reqs if meth == "GET" and "/_delta_log/" in p]
    assert len(entries) == 12, reqs
    assert [r for r in reqs if r[0] != "GET"] == [], reqs


def _creator(uris: list[str], barrier, out) -> None:
    made = 0
    for uri in uris:
        barrier.wait(60)
        made += tables.create(uri, pa.schema([("a", pa.int64())]), record={"kind": "create"})
    out.put(made)


def test_racing_creators_make_one_table_at_version_0(tmp_path):
    """Four processes create the same tables at once: each table is created once, as version
    0. (delta-rs retried a losing create as version 1: a second create commit, which shifted
    the store's first append to version 2; 1 race in 15 with two creators.)"""
    import multiprocessing as mp

    uris = [str(tmp_path / f"t{i}") for i in range(8)]
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_creator, args=(uris, barrier, out)) for _ in range(4)]
    for p in procs:
        p.start()
    made = sum(out.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(60)
    assert made == len(uris)                          # exactly one creator won each
    for uri in uris:
        logs = sorted(f for f in os.listdir(os.path.join(uri, "_delta_log"))
                      if f.endswith(".json"))
        assert logs == ["00000000000000000000.json"], (uri, logs)
