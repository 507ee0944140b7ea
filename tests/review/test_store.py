"""The reviewed-label store: versions, latest-wins snapshots, audit history, concurrent writers,
on a local folder and on a real S3 endpoint (moto server)."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from grounding.labels import item
from grounding.storage import StorageOptions
from grounding.store import ReviewStore, StoreError, decision_record


def _rec(text: str, box: list[float], decision: str = "correct", **kw) -> dict:
    it = item("/data/img.png", text, [box] if box else [], width=100, height=80, job_id="j1",
              model="m", adapter=None, prompt_version="p1", row_id=f"s:{text}")
    return decision_record(it, decision, **kw)


def test_versions_snapshot_history(tmp_path):
    st = ReviewStore(str(tmp_path / "store"))
    assert st.latest() == 0
    v1 = st.append([_rec("a", [1, 2, 3, 4]), _rec("b", [5, 6, 7, 8])], source="test")
    v2 = st.append([_rec("a", [10, 20, 30, 40]), _rec("c", [], "reject")], source="test")
    assert (v1, v2) == (1, 2)
    snap1 = {r["text"]: r for r in st.snapshot(1).to_pylist()}
    assert snap1["a"]["boxes"] == [[1, 2, 3, 4]] and set(snap1) == {"a", "b"}
    snap = {r["text"]: r for r in st.snapshot().to_pylist()}
    assert snap["a"]["boxes"] == [[10, 20, 30, 40]] and snap["a"]["version"] == 2
    assert snap["c"]["decision"] == "reject"
    # the audit trail keeps every decision, in commit order
    hist = st.history().to_pylist()
    assert [(r["text"], r["version"]) for r in hist] == [("a", 1), ("b", 1), ("a", 2), ("c", 2)]
    # training labels: accepted + corrected only; lineage carried
    labels = {r["text"]: r for r in st.labels()}
    assert set(labels) == {"a", "b"}
    assert labels["a"]["job_id"] == "j1" and labels["a"]["prompt_version"] == "p1"
    # a snapshot by version is reproducible after later appends
    st.append([_rec("b", [0, 0, 1, 1])], source="test")
    assert st.snapshot(1).to_pylist() == ReviewStore(str(tmp_path / "store")).snapshot(1).to_pylist()
    assert [c["records"] for c in st.versions()] == [2, 2, 1]


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


def test_crash_before_commit_is_invisible(tmp_path):
    """A data file without a commit (a writer killed between the two steps) is never read."""
    st = ReviewStore(str(tmp_path / "s"))
    st.append([_rec("a", [1, 2, 3, 4])], source="test")
    (tmp_path / "s" / "data" / "orphan.parquet").write_bytes(b"PAR1 torn")
    assert [r["text"] for r in st.snapshot().to_pylist()] == ["a"]
    assert st.append([_rec("b", [1, 2, 3, 4])], source="test") == 2


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
        p.join(120)
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
    for v in vs:                                          # no visible version lacks its data
        assert st.fs.exists(f"{st.root}/{v['data']}"), v
    assert len(st.history()) == len(writers) * n


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
