"""``groundlabel store migrate OLD NEW``: a store of the old layout (``data/<uuid>.parquet`` + a
commit log ``_log/NNNNNNNN.json``, written here exactly as the old code wrote it) becomes a
Delta table with every version and row kept: old version k is Delta version k, every snapshot
and the history are the same, a rerun is a no-op, a killed migration resumes."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grounding import tables
from grounding.labels import item
from grounding.store import DECISIONS, HUMAN, SCHEMA, ReviewStore, StoreError, decision_record
from grounding.store import migrate as migrate_store
from groundlabel.cli import main

# Columns a data file written before routing existed lacks (the old reader filled them with nulls).
ROUTE_COLUMNS = ("calibrated_score", "auto_precision", "calibration")


def _it(name: str, boxes: list[list[float]]) -> dict:
    return item(f"/data/{name}.png", f"the {name}", boxes, width=100, height=80, job_id="j1",
                model="m", adapter="gl-1", prompt_version="p1", row_id=f"s:{name}")


def _d(name: str, decision: str, boxes=((1, 2, 30, 40),), **kw) -> dict:
    it = _it(name, [list(b) for b in boxes])
    pred = dict(_it(name, [[1, 2, 30, 40]]), score=0.8)
    return decision_record(it, decision, predicted=pred, reviewer=None if decision == "auto"
                           else "r@example.com", source=kw.pop("source", "label-studio"), **kw)


def _auto(name: str, p: float = 0.97) -> dict:
    return _d(name, "auto", calibrated_score=p, auto_precision=0.95, calibration="cal-1",
              source="auto")


# Five versions: accepts, corrections (some with no boxes), rejections, auto decisions, a person
# overruling an auto, an auto that may not overrule a person, two rows for one item in a commit.
OLD_VERSIONS = [
    ("import:labelstudio", "export-1.json", lambda: [
        _d("a", "accept"), _d("b", "correct", [(5, 5, 50, 50)]), _d("c", "correct", []),
        _d("d", "reject", [])]),
    ("auto", None, lambda: [_auto("e"), _auto("f", 0.99), _auto("a")]),
    ("import:labelstudio", "export-2.json", lambda: [
        _d("e", "reject", []), _d("b", "correct", [(6, 6, 60, 60), (1, 1, 9, 9)]),
        _d("g", "accept"), _d("h", "correct", [(2, 2, 3, 3)]), _d("h", "accept")]),
    ("auto", "job-7", lambda: [_auto("g"), _auto("i")]),
    ("import:coco", "labels.json", lambda: [
        _d("c", "correct", [(7, 7, 70, 70)]), _d("i", "correct", []), _auto("j"),
        _d("d", "accept")]),
]


def write_old_store(root: Path, versions=OLD_VERSIONS) -> list[dict]:
    """An old-layout store, written as the old `ReviewStore.append` wrote it; returns its log.
    Version 1's data file predates the routing columns (as files of that age do)."""
    (root / "data").mkdir(parents=True)
    (root / "_log").mkdir()
    log = []
    for version, (source, note, make) in enumerate(versions, 1):
        records = make()
        table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in SCHEMA} for r in records],
                                     schema=SCHEMA)
        if version == 1:
            table = table.drop_columns(list(ROUTE_COLUMNS))
        data = f"data/{uuid.uuid4().hex}.parquet"
        pq.write_table(table, root / data)
        entry = {"version": version, "data": data, "records": len(records),
                 "items": len({r["item_id"] for r in records}),
                 "decisions": {d: sum(r["decision"] == d for r in records) for d in DECISIONS},
                 "source": source, "note": note,
                 "committed_at": f"2026-11-{10 + version:02d}T09:00:00+00:00"}
        (root / "_log" / f"{version:08d}.json").write_bytes(json.dumps(entry).encode())
        log.append(entry)
    return log


def old_history(root: Path, version: int) -> list[dict]:
    """What the old reader gave: every record up to ``version`` in commit order, with a
    ``version`` column (missing columns as nulls)."""
    out = []
    for p in sorted((root / "_log").glob("*.json")):
        entry = json.loads(p.read_text())
        if entry["version"] > version:
            break
        for r in pq.read_table(root / entry["data"]).to_pylist():
            out.append({f.name: r.get(f.name) for f in SCHEMA} | {"version": entry["version"]})
    return out


def reference_snapshot(hist: list[dict], decisions=DECISIONS) -> list[dict]:
    """The snapshot rule, written out: the latest decision per item (later commits, then later
    rows, win), a person's decision always over ``auto``; in history order."""
    latest: dict[str, int] = {}
    human: set[str] = set()
    for i, r in enumerate(hist):
        if r["decision"] == "auto" and r["item_id"] in human:
            continue
        latest[r["item_id"]] = i
        if r["decision"] != "auto":
            human.add(r["item_id"])
    return [hist[i] for i in sorted(latest.values()) if hist[i]["decision"] in decisions]


DECISION_SETS = [DECISIONS, HUMAN, ("accept", "correct"), ("auto",), ("reject",),
                 ("accept", "correct", "auto")]


def test_migration_keeps_every_version_snapshot_and_record(tmp_path, capsys):
    old, new = tmp_path / "old", str(tmp_path / "new")
    log = write_old_store(old)
    assert main(["store", "migrate", str(old), new]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["versions"] == 5 and res["migrated"] == 5 and res["skipped"] == 0
    assert res["records"] == sum(e["records"] for e in log) == 18
    assert res["latest"] == 5

    st = ReviewStore(new)
    assert st.latest() == 5 == tables.open_table(new).version()
    for v in range(1, 6):
        hist = old_history(old, v)
        assert st.history(v).to_pylist() == hist, f"history of version {v}"
        for decisions in DECISION_SETS:
            assert st.snapshot(v, decisions).to_pylist() == reference_snapshot(hist, decisions), (
                f"snapshot of version {v}, {decisions}")
    # the cases the old store had to get right are still right
    snap = {r["text"]: r for r in st.snapshot().to_pylist()}
    assert snap["the a"]["decision"] == "accept"                  # auto never over a person
    assert snap["the e"]["decision"] == "reject"                  # a person overrules an auto
    assert snap["the i"]["decision"] == "correct" and snap["the i"]["boxes"] == []
    assert snap["the h"]["decision"] == "accept"                  # later row of a commit wins
    assert snap["the c"]["boxes"] == [[7, 7, 70, 70]] and snap["the c"]["version"] == 5
    assert snap["the f"]["calibrated_score"] == 0.99
    assert snap["the b"]["boxes"] == [[6, 6, 60, 60], [1, 1, 9, 9]]
    assert {r["text"] for r in st.snapshot(1).to_pylist()} == {"the a", "the b", "the c", "the d"}
    assert st.snapshot(1).to_pylist()[0]["calibrated_score"] is None  # the column it lacked
    assert {r["text"] for r in st.labels(4)} == {"the a", "the b", "the c", "the g", "the h"}

    vs = st.versions()
    assert [v["version"] for v in vs] == [1, 2, 3, 4, 5]
    for v, e in zip(vs, log, strict=True):
        for k in ("version", "records", "items", "decisions", "source", "note", "committed_at"):
            assert v[k] == e[k], (k, v, e)
        assert v["migrated_from"]["version"] == e["version"]
        assert v["migrated_from"]["data"] == e["data"]

    # a rerun is a no-op
    assert main(["store", "migrate", str(old), new]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["migrated"] == 0 and res["skipped"] == 5 and res["records"] == 0
    assert tables.open_table(new).version() == 5
    assert len(ReviewStore(new).history()) == 18

    # the migrated store goes on as any store: the next append is version 6
    assert st.append([_d("k", "accept")], source="test") == 6


class Killed(BaseException):
    """A kill: not an Exception, so nothing on the way catches it."""


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_killed_migration_resumes_without_duplicating_a_version(tmp_path, monkeypatch, when):
    import grounding.store as store_mod

    old, new = tmp_path / "old", str(tmp_path / "new")
    write_old_store(old)
    real = store_mod._write

    def dies_at_version_4(dt, data, **kw):
        if dt.version() == 3:  # this commit would be version 4
            if when == "after":
                real(dt, data, **kw)
            raise Killed
        real(dt, data, **kw)

    monkeypatch.setattr(store_mod, "_write", dies_at_version_4)
    with pytest.raises(Killed):
        migrate_store(str(old), new)
    monkeypatch.undo()
    assert tables.open_table(new).version() == (4 if when == "after" else 3)
    res = migrate_store(str(old), new)
    assert res["migrated"] == (1 if when == "after" else 2)
    assert res["skipped"] == (4 if when == "after" else 3)
    st = ReviewStore(new)
    assert [v["version"] for v in st.versions()] == [1, 2, 3, 4, 5]
    for v in range(1, 6):
        assert st.history(v).to_pylist() == old_history(old, v)


def test_migrate_refuses_what_it_must_not_touch(tmp_path):
    old = tmp_path / "old"
    write_old_store(old, OLD_VERSIONS[:2])
    # NEW already holds another store
    other = str(tmp_path / "other")
    ReviewStore(other).append([_d("x", "accept")], source="test")
    with pytest.raises(StoreError, match="already holds"):
        migrate_store(str(old), other)
    assert tables.open_table(other).version() == 1
    # NEW holds the migration of another old store
    old2 = tmp_path / "old2"
    write_old_store(old2, OLD_VERSIONS[:1])
    new = str(tmp_path / "new")
    migrate_store(str(old2), new)
    with pytest.raises(StoreError, match="already holds"):
        migrate_store(str(old), new)
    # NEW is a Delta table but no store
    notstore = str(tmp_path / "t")
    tables.create(notstore, pa.schema([pa.field("x", pa.int64())]))
    with pytest.raises(StoreError, match="not a reviewed-label store"):
        migrate_store(str(old), notstore)
    # OLD is no old-layout store; OLD and NEW are one place
    with pytest.raises(StoreError, match="no old-layout store"):
        migrate_store(str(tmp_path / "nothing"), str(tmp_path / "n2"))
    with pytest.raises(StoreError, match="no old-layout store"):
        migrate_store(new, str(tmp_path / "n3"))
    with pytest.raises(StoreError, match="same place"):
        migrate_store(str(old), str(old) + "/")


def test_an_old_store_opened_as_a_store_says_how_to_migrate(tmp_path, capsys):
    old = tmp_path / "old"
    write_old_store(old, OLD_VERSIONS[:1])
    with pytest.raises(StoreError, match=r"groundlabel store migrate .*old NEW"):
        ReviewStore(str(old))
    assert main(["export", str(old), "--to", "coco", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "groundlabel store migrate" in err and "Traceback" not in err
    assert main(["review", "log", str(old)]) == 2
    assert "groundlabel store migrate" in capsys.readouterr().err


def test_migrate_to_s3(tmp_path, s3_endpoint):
    import s3fs

    from grounding.storage import StorageOptions

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("migrate")
    local = tmp_path / "old"
    write_old_store(local)
    fs.put(str(local), "migrate/old", recursive=True)
    opts = StorageOptions(s3_endpoint_url=s3_endpoint)
    res = migrate_store("s3://migrate/old", "s3://migrate/new", opts)
    assert (res["migrated"], res["records"]) == (5, 18)
    st = ReviewStore("s3://migrate/new", opts)
    for v in range(1, 6):
        assert st.history(v).to_pylist() == old_history(local, v)
    assert migrate_store("s3://migrate/old", "s3://migrate/new", opts)["migrated"] == 0
    with pytest.raises(StoreError, match="groundlabel store migrate"):
        ReviewStore("s3://migrate/old", opts)
