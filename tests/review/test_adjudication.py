"""Adjudication before anything trains: items people disagree on are left out of calibration
and training (counted and reported) until an adjudicated label exists."""

from __future__ import annotations

from grounding.labels import item
from grounding.store import ReviewStore, decision_record

LINEAGE = {"model": "m", "prompt_version": "p1", "job_id": "j1"}


def _rec(k: int, box, decision, who, role=None):
    it = item(f"/data/{k}.png", f"thing {k}", [box] if box else [], width=100, height=80,
              **LINEAGE)
    return decision_record(it, decision, reviewer=who, role=role, source="test",
                           predicted={"boxes": [[0.0, 0.0, 10.0, 10.0]], "score": 0.5 + k / 100})


def _store(tmp_path) -> ReviewStore:
    st = ReviewStore(str(tmp_path / "store"))
    recs = [_rec(k, [0, 0, 10, 10], "accept", "alice") for k in range(12)]
    # two items with a second reviewer: one agrees, one draws somewhere else
    recs += [_rec(0, [0, 0, 10, 10], "accept", "bob"), _rec(1, [50, 50, 60, 60], "correct", "bob")]
    st.append(recs, source="test")
    return st


def test_calibration_leaves_unresolved_items_out_and_says_how_many(tmp_path):
    from pipelines.routing import CalibrateConfig, calibrate

    st = _store(tmp_path)
    out = calibrate(CalibrateConfig(store=st.uri, registry=str(tmp_path / "reg"), min_fit=5))
    assert out["unresolved_items"] == 1
    assert out["keys"][0]["reviews"] == 11  # 12 items, one unresolved
    adj = _rec(1, [0, 0, 10, 10], "accept", "carol", role="adjudication")
    st.append([adj], source="test")
    out = calibrate(CalibrateConfig(store=st.uri, registry=str(tmp_path / "reg"), min_fit=5))
    assert out["unresolved_items"] == 0 and out["keys"][0]["reviews"] == 12


def test_training_labels_leave_unresolved_items_out(tmp_path):
    from train.retrain import labels_for_training

    st = _store(tmp_path)
    items, train_side, held = labels_for_training(st, st.latest(), 0.25)
    assert len(items) == 11 and "thing 1" not in {it["text"] for it in items}
    assert {it["item_id"] for it in train_side} | {it["item_id"] for it in held} == {
        it["item_id"] for it in items}
