"""The reviewed-label store, a Delta Lake table: versions (= table versions), latest-wins
snapshots, audit history, concurrent writer processes, a lost commit response, on a local
folder and on a real S3 endpoint (moto server); plain Delta readers read it."""

from __future__ import annotations

import multiprocessing as mp

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grounding import tables
from grounding.labels import item
from grounding.storage import StorageOptions
from grounding.store import SCHEMA, ReviewStore, StoreError, decision_record


def _rec(text: str, box: list[float], decision: str = "correct", **kw) -> dict:
    it = item("/data/img.png", text, [box] if box else [], width=100, height=80, job_id="j1",
              model="m", adapter=None, prompt_version="p1", row_id=f"s:{text}")
    return decision_record(it, decision, **kw)


def test_versions_snapshot_history(tmp_path):
    uri = str(tmp_path / "store")
    st = ReviewStore(uri)
    assert st.latest() == 0 and st.versions() == [] and len(st.snapshot()) == 0
    v1 = st.append([_rec("a", [1, 2, 3, 4]), _rec("b", [5, 6, 7, 8])], source="test")
    v2 = st.append([_rec("a", [10, 20, 30, 40]), _rec("c", [], "reject")], source="test",
                   note="second")
    assert (v1, v2) == (1, 2)
    assert tables.open_table(uri).version() == 2       # store version == Delta table version
    snap1 = {r["text"]: r for r in st.snapshot(1).to_pylist()}
    assert snap1["a"]["boxes"] == [[1, 2, 3, 4]] and set(snap1) == {"a", "b"}
    snap = {r["text"]: r for r in st.snapshot().to_pylist()}
    assert snap["a"]["boxes"] == [[10, 20, 30, 40]] and snap["a"]["version"] == 2
    assert snap["c"]["decision"] == "reject" and snap["c"]["boxes"] == []
    # the audit trail keeps every decision, in commit order
    hist = st.history().to_pylist()
    assert [(r["text"], r["version"]) for r in hist] == [("a", 1), ("b", 1), ("a", 2), ("c", 2)]
    assert st.history().schema.names == [*SCHEMA.names, "version"]
    # training labels: accepted + corrected only; lineage carried
    labels = {r["text"]: r for r in st.labels()}
    assert set(labels) == {"a", "b"}
    assert labels["a"]["job_id"] == "j1" and labels["a"]["prompt_version"] == "p1"
    # a snapshot by version is reproducible after later appends
    st.append([_rec("b", [0, 0, 1, 1])], source="test")
    assert st.snapshot(1).to_pylist() == ReviewStore(uri).snapshot(1).to_pylist()
    vs = st.versions()
    assert [c["version"] for c in vs] == [1, 2, 3]
    assert [c["records"] for c in vs] == [2, 2, 1]
    assert vs[1]["items"] == 2 and vs[1]["note"] == "second" and vs[1]["source"] == "test"
    assert vs[1]["decisions"] == {"accept": 0, "correct": 1, "reject": 1, "auto": 0}
    assert vs[0]["committed_at"] <= vs[2]["committed_at"]


def test_later_rows_of_a_commit_win_and_people_win_over_auto(tmp_path):
    st = ReviewStore(str(tmp_path / "s"))
    # 40 rows in one commit: the last decision per item wins, whatever order a reader scans in
    st.append([_rec(f"t{i % 4}", [i, i, i + 1, i + 1]) for i in range(40)], source="test")
    snap = {r["text"]: r["boxes"] for r in st.snapshot().to_pylist()}
    assert snap == {f"t{k}": [[36.0 + k, 36.0 + k, 37.0 + k, 37.0 + k]] for k in range(4)}
    assert [r["boxes"][0][0] for r in st.history().to_pylist()] == list(range(40))
    st.append([_rec("t0", [1, 1, 2, 2], "auto")], source="auto")      # never over a person
    st.append([_rec("z", [1, 1, 2, 2], "auto")], source="auto")
    st.append([_rec("z", [], "reject")], source="people")              # a person overrules
    snap = {r["text"]: r["decision"] for r in st.snapshot().to_pylist()}
    assert snap["t0"] == "correct" and snap["z"] == "reject"
    assert {r["text"] for r in st.snapshot(3, ("auto",)).to_pylist()} == {"z"}
    assert {r["text"] for r in st.labels(3, include_auto=True)} == {"t0", "t1", "t2", "t3", "z"}


def test_bad_requests_are_refused(tmp_path):
    st = ReviewStore(str(tmp_path / "s"))
    with pytest.raises(StoreError, match="no version 3"):
        st.snapshot(3)
    with pytest.raises(StoreError, match="decision must be one of"):
        _rec("a", [1, 1, 2, 2], "maybe")
    with pytest.raises(StoreError, match="nothing to append"):
        st.append([], source="test")
    with pytest.raises(ValueError, match="x1 <= x2"):
        _rec("a", [5, 1, 2, 2])
    st.append([_rec("a", [1, 2, 3, 4])], source="test")
    with pytest.raises(StoreError, match=r"no version 2 \(versions: 1\.\.1\)"):
        st.history(2)
    with pytest.raises(StoreError, match="is not one of"):
        st.append([dict(_rec("a", [1, 2, 3, 4]), decision="maybe")], source="test")
    assert st.latest() == 1


def test_a_table_that_is_not_a_store_is_refused(tmp_path):
    uri = str(tmp_path / "other")
    tables.create(uri, pa.schema([pa.field("row_id", pa.string()), pa.field("x", pa.int64())]))
    st = ReviewStore(uri)
    for use in (st.latest, st.versions, st.snapshot,
                lambda: st.append([_rec("a", [1, 2, 3, 4])], source="test")):
        with pytest.raises(StoreError, match="not a reviewed-label store.*missing: record_id"):
            use()
    assert tables.open_table(uri).version() == 0  # nothing written


def test_crash_before_commit_is_invisible(tmp_path):
    """A data file without a commit (a writer killed between writing and committing) is never
    read, and the next append takes the next version."""
    uri = str(tmp_path / "s")
    st = ReviewStore(uri)
    st.append([_rec("a", [1, 2, 3, 4])], source="test")
    orphan = pa.Table.from_pylist([_rec("ghost", [1, 2, 3, 4])], schema=SCHEMA)
    pq.write_table(orphan, tmp_path / "s" / "part-00000-0123-c000.snappy.parquet")
    (tmp_path / "s" / "part-00001-torn-c000.snappy.parquet").write_bytes(b"PAR1 torn")
    assert [r["text"] for r in st.snapshot().to_pylist()] == ["a"]
    assert st.append([_rec("b", [1, 2, 3, 4])], source="test") == 2
    assert sorted(r["text"] for r in st.history().to_pylist()) == ["a", "b"]


def test_a_lost_commit_response_is_recognised_not_committed_twice(tmp_path, monkeypatch):
    """S3 answers a re-sent commit whose first response was lost with 412: delta-rs sees our
    own log entry as a concurrent commit. Simulated here: the commit lands, then the same
    commit is sent again from the same snapshot (as the client's retry does). The store's app
    transaction makes delta-rs refuse the second, and the append recognises the first."""
    import deltalake

    from grounding import store as store_mod

    uri = str(tmp_path / "s")
    st = ReviewStore(uri)
    st.append([_rec("a", [1, 2, 3, 4])], source="test")
    real = deltalake.write_deltalake
    sent = []

    def resend(dt, data, **kw):
        stale = tables.open_table(uri, version=dt.version())
        real(dt, data, **kw)
        sent.append(1)
        real(stale, data, **kw)  # the re-send: refused (Concurrent transaction), not appended

    monkeypatch.setattr(store_mod, "_write", resend)
    assert st.append([_rec("b", [1, 2, 3, 4])], source="test") == 2
    assert sent == [1]
    monkeypatch.undo()
    assert [r["text"] for r in st.history().to_pylist()] == ["a", "b"]
    assert st.latest() == 2 and [v["version"] for v in st.versions()] == [1, 2]


def test_plain_delta_readers_read_the_store(tmp_path):
    import deltalake
    import polars as pl

    uri = str(tmp_path / "s")
    st = ReviewStore(uri)
    st.append([_rec("a", [1, 2, 3, 4]), _rec("b", [], "reject")], source="test")
    st.append([_rec("c", [5, 6, 7, 8], "accept")], source="test")
    t = pa.table(deltalake.QueryBuilder().register("t", deltalake.DeltaTable(uri))
                 .execute("select * from t").read_all())
    # (deltalake's query engine: its to_pyarrow_table can abort the interpreter at exit,
    # see grounding.tables.scan)
    assert sorted(t.column("text").to_pylist()) == ["a", "b", "c"]
    assert set(SCHEMA.names) <= set(t.column_names)
    df = pl.read_delta(uri)
    assert sorted(df["text"].to_list()) == ["a", "b", "c"]
    assert df.filter(pl.col("text") == "a")["boxes"].to_list() == [[[1.0, 2.0, 3.0, 4.0]]]
    assert sorted(pl.read_delta(uri, version=1)["text"].to_list()) == ["a", "b"]
    props = deltalake.DeltaTable(uri).metadata().configuration
    assert props["delta.enableChangeDataFeed"] == "true"
    assert props["delta.enableExpiredLogCleanup"] == "false"


def _writer(uri: str, name: str, n: int, endpoint: str | None) -> None:
    st = ReviewStore(uri, StorageOptions(s3_endpoint_url=endpoint))
    for i in range(n):
        st.append([_rec(f"{name}-{i}", [1, 2, 3, 4])], source=name, note=f"{name}/{i}")


def _race(uri: str, endpoint: str | None, n: int, writers=("w1", "w2")) -> ReviewStore:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(uri, name, n, endpoint)) for name in writers]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
        assert p.exitcode == 0
    return ReviewStore(uri, StorageOptions(s3_endpoint_url=endpoint))


def test_two_importers_at_once_lose_nothing(tmp_path):
    st = _race(str(tmp_path / "s"), None, 15)
    vs = st.versions()
    assert [v["version"] for v in vs] == list(range(1, 31))
    texts = sorted(r["text"] for r in st.history().to_pylist())
    assert texts == sorted(f"{w}-{i}" for w in ("w1", "w2") for i in range(15))


def test_store_on_s3_with_concurrent_writers(s3_endpoint):
    import s3fs

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}).mkdir("reviews")
    st = _race("s3://reviews/store", s3_endpoint, 6)
    assert [v["version"] for v in st.versions()] == list(range(1, 13))
    assert len(st.snapshot()) == 12


def _check_every_import_once(st: ReviewStore, writers, n: int) -> None:
    vs = st.versions()
    assert [v["version"] for v in vs] == list(range(1, len(writers) * n + 1))
    notes = sorted(v["note"] for v in vs)                 # every import exactly once in the log
    assert notes == sorted(f"{w}/{i}" for w in writers for i in range(n))
    hist = st.history().to_pylist()
    by_version = {r["version"]: r["text"] for r in hist}
    for v in vs:                                          # every version holds its own import
        assert by_version[v["version"]].replace("-", "/") == v["note"], v
    assert len(hist) == len(writers) * n


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_eight_importers_at_once_each_import_is_committed_once(kind, tmp_path, request):
    writers = [f"w{i}" for i in range(8)]
    if kind == "local":
        uri, ep = str(tmp_path / "s"), None
    else:
        import s3fs

        ep = request.getfixturevalue("s3_endpoint")
        s3fs.S3FileSystem(client_kwargs={"endpoint_url": ep}).mkdir("reviews8")
        uri = "s3://reviews8/store"
    st = _race(uri, ep, 5, writers)
    _check_every_import_once(st, writers, 5)
