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
    # alice accepted a, bob rejected it: no label for a until adjudicated
    assert {r["text"]: r["decision"] for r in st.snapshot().to_pylist()} == {"b": "correct"}
    assert st.unresolved().column("reviewer").to_pylist() == ["alice@x", "bob@x"]
    v = st.append([_rec("b", [1, 1, 5, 5], "correct", "carol@x", "2026-12-03T10:00:00+00:00",
                        "groundlabel-default@1")], source="test")
    assert v == 3
    # the append added the column to the table itself: plain Delta readers see it too
    from deltalake import DeltaTable

    assert "guideline" in {f.name for f in DeltaTable(uri).schema().fields}
    got = {(r["text"], r["version"]): r["guideline"] for r in st.history().to_pylist()}
    assert got == {("a", 1): None, ("b", 1): None, ("a", 2): None,
                   ("b", 3): "groundlabel-default@1"}
    assert st.snapshot(2).column("guideline").to_pylist() == [None]
    assert st.history().column("role").to_pylist() == [None] * 4
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
    st.append([_rec("x", [1, 1, 8, 9], "correct", "alice", "2026-12-02T10:00:00+00:00", g2)],
              source="test")
    # each person's current decision per item: alice's second one on x replaces her first
    ann = st.annotations().to_pylist()
    assert sorted((r["text"], r["reviewer"], r["decision"], r["version"]) for r in ann) == [
        ("x", "alice", "correct", 2), ("x", "bob", "correct", 1), ("y", "alice", "accept", 1)]
    assert {r["reviewer"]: r["reviewed_at"][:10] for r in ann if r["text"] == "x"} == {
        "alice": "2026-12-02", "bob": "2026-12-01"}
    assert [r["guideline"] for r in ann if r["text"] == "x" and r["reviewer"] == "alice"] == [g2]
    # as of version 1, alice's first decision is her current one
    assert sorted((r["text"], r["reviewer"], r["decision"]) for r in st.annotations(1).to_pylist()) == [
        ("x", "alice", "correct"), ("x", "bob", "correct"), ("y", "alice", "accept")]
    # the snapshot's rule, where people agree (IoU >= 0.5): the latest person's decision
    # (alice's second; as of version 1, bob's, the later row of that commit)
    snap = {r["text"]: r for r in st.snapshot().to_pylist()}
    assert snap["x"]["version"] == 2 and snap["x"]["reviewer"] == "alice"
    assert snap["x"]["guideline"] == g2
    assert {r["text"]: r["reviewer"] for r in st.snapshot(1).to_pylist()} == {
        "x": "bob", "y": "alice"}
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


def _two(text, a, b, da="correct", db="correct"):
    return [_rec(text, a, da, "alice", "2026-12-01T10:00:00+00:00"),
            _rec(text, b, db, "bob", "2026-12-01T10:05:00+00:00")]


def test_items_people_disagree_on_stay_out_until_adjudicated(tmp_path):
    st = ReviewStore(str(tmp_path / "s"))
    st.append([*_two("agree", [0, 0, 10, 10], [0, 0, 10, 10.5]),
               *_two("apart", [0, 0, 10, 10], [50, 50, 60, 60]),
               *_two("reject?", [0, 0, 10, 10], [], "accept", "reject"),
               # accepted by one, corrected by a hair by the other: the same boxes, agreed
               *_two("hair", [0, 0, 10, 10], [0.5, 0, 10, 10], "accept", "correct"),
               *_two("both reject", [], [], "reject", "reject"),
               _rec("alone", [1, 1, 2, 2], "correct", "alice", "2026-12-01T10:00:00+00:00")],
              source="test")
    assert {r["text"] for r in st.snapshot().to_pylist()} == {
        "agree", "hair", "both reject", "alone"}
    assert {it["text"] for it in st.labels()} == {"agree", "hair", "alone"}
    un = st.unresolved()
    assert sorted(set(un.column("text").to_pylist())) == ["apart", "reject?"]
    assert len(un) == 4  # both people's decisions on each
    assert st.resolution() == {"version": 1, "items": 6, "overlapped": 5, "agreed": 3,
                               "adjudicated": 0, "unresolved": 2}
    # an adjudication settles "apart"; it is nobody's review (agreement does not see it)
    adj = _rec("apart", [1, 1, 9, 9], "correct", "carol", "2026-12-02T10:00:00+00:00")
    adj["role"] = "adjudication"
    st.append([adj], source="test")
    snap = {r["text"]: r for r in st.snapshot().to_pylist()}
    assert snap["apart"]["boxes"] == [[1, 1, 9, 9]] and snap["apart"]["role"] == "adjudication"
    assert "reject?" not in snap
    assert "carol" not in {r["reviewer"] for r in st.annotations().to_pylist()}
    assert st.resolution()["adjudicated"] == 1 and st.resolution()["unresolved"] == 1
    # a later review does not undo an adjudication; the version before it still has no label
    st.append([_rec("apart", [], "reject", "bob", "2026-12-03T10:00:00+00:00")], source="test")
    assert {r["text"]: r["reviewer"] for r in st.snapshot().to_pylist()}["apart"] == "carol"
    assert "apart" not in {r["text"] for r in st.snapshot(1).to_pylist()}


def test_decision_record_takes_a_role_and_refuses_an_unknown_one():
    import pytest

    from grounding.store import StoreError

    it = item("/data/img.png", "t", [], width=10, height=10)
    assert decision_record(it, "correct", role="adjudication")["role"] == "adjudication"
    assert decision_record(it, "correct")["role"] is None
    with pytest.raises(StoreError, match="role must be one of"):
        decision_record(it, "correct", role="boss")
