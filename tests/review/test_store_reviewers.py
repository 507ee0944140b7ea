"""The store with several people: every person's decision kept (who, when), the guideline each
was made under, one documented rule per item in a snapshot; stores written before the
guideline column still read and take new decisions."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa

from grounding import tables
from grounding.labels import item
from grounding.store import SCHEMA, ReviewStore, decision_record

OLD = Path(__file__).with_name("stores") / "before-guideline"


def _rec(text, box, decision, reviewer, at, guideline=None):
    it = item("/data/img.png", text, [box] if box else [], width=100, height=80)
    return decision_record(it, decision, reviewer=reviewer, reviewed_at=at,
                           guideline=guideline, source="test")


def test_a_store_from_before_the_guideline_column_reads_and_takes_new_decisions(tmp_path):
    uri = str(tmp_path / "store")
    shutil.copytree(OLD, uri)
    st = ReviewStore(uri)
    assert "guideline" not in {f.name for f in tables.open_table(uri).schema().fields}
    hist = st.history()
    assert hist.schema.names == [*SCHEMA.names, "version"]
    assert len(hist) == 3 and hist.column("guideline").to_pylist() == [None] * 3
    assert {r["text"]: r["decision"] for r in st.snapshot().to_pylist()} == {
        "a": "reject", "b": "correct"}
    v = st.append([_rec("b", [1, 1, 5, 5], "correct", "carol@x", "2026-12-03T10:00:00+00:00",
                        "groundlabel-default@1")], source="test")
    assert v == 3
    # the append added the column to the table itself: plain Delta readers see it too
    from deltalake import DeltaTable

    assert "guideline" in {f.name for f in DeltaTable(uri).schema().fields}
    got = {(r["text"], r["version"]): r["guideline"] for r in st.history().to_pylist()}
    assert got == {("a", 1): None, ("b", 1): None, ("a", 2): None,
                   ("b", 3): "groundlabel-default@1"}
    assert st.snapshot(2).column("guideline").to_pylist() == [None, None]
    assert ReviewStore(uri).versions()[-1]["records"] == 1
    st.append([_rec("c", [], "correct", "dan@x", "2026-12-03T11:00:00+00:00")], source="test")
    assert st.latest() == 4 and len(st.history()) == 5


def test_the_checked_in_old_store_is_untouched_by_reading_it():
    before = sorted(p.name for p in OLD.rglob("*"))
    ReviewStore(str(OLD)).snapshot()
    assert sorted(p.name for p in OLD.rglob("*")) == before


def test_every_persons_decision_is_kept_and_a_snapshot_takes_the_latest(tmp_path):
    st = ReviewStore(str(tmp_path / "s"))
    g1, g2 = "team@1", "team@2"
    st.append([_rec("x", [1, 1, 9, 9], "correct", "alice", "2026-12-01T10:00:00+00:00", g1),
               _rec("y", [2, 2, 8, 8], "accept", "alice", "2026-12-01T10:01:00+00:00", g1),
               _rec("x", [1, 1, 8, 9], "correct", "bob", "2026-12-01T11:00:00+00:00", g1)],
              source="test")
    st.append([_rec("x", [], "reject", "alice", "2026-12-02T10:00:00+00:00", g2)], source="test")
    # each person's current decision per item: alice's second one on x replaces her first
    ann = st.annotations().to_pylist()
    assert sorted((r["text"], r["reviewer"], r["decision"], r["version"]) for r in ann) == [
        ("x", "alice", "reject", 2), ("x", "bob", "correct", 1), ("y", "alice", "accept", 1)]
    assert {r["reviewer"]: r["reviewed_at"][:10] for r in ann if r["text"] == "x"} == {
        "alice": "2026-12-02", "bob": "2026-12-01"}
    assert [r["guideline"] for r in ann if r["text"] == "x" and r["reviewer"] == "alice"] == [g2]
    # as of version 1, alice's first decision is her current one
    assert sorted((r["text"], r["reviewer"], r["decision"]) for r in st.annotations(1).to_pylist()) == [
        ("x", "alice", "correct"), ("x", "bob", "correct"), ("y", "alice", "accept")]
    # the snapshot's rule: the latest person's decision on the item (alice's reject)
    snap = {r["text"]: r for r in st.snapshot().to_pylist()}
    assert snap["x"]["decision"] == "reject" and snap["x"]["reviewer"] == "alice"
    # ... and nothing is lost: the history has all four
    assert len(st.history()) == 4


def test_auto_decisions_are_nobodys_annotation(tmp_path):
    st = ReviewStore(str(tmp_path / "s"))
    st.append([_rec("x", [1, 1, 9, 9], "auto", None, "2026-12-01T10:00:00+00:00"),
               _rec("x", [1, 1, 9, 9], "accept", None, "2026-12-01T10:01:00+00:00"),
               _rec("x", [1, 1, 7, 9], "correct", None, "2026-12-01T10:02:00+00:00")],
              source="test")
    ann = st.annotations()
    # a person not named is one unknown person: their latest decision
    assert ann.column("decision").to_pylist() == ["correct"]
    assert isinstance(ann, pa.Table) and ann.schema.names == [*SCHEMA.names, "version"]
