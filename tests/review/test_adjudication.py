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


def test_adjudication_tasks_show_every_persons_boxes_and_come_back_as_adjudications(tmp_path):
    """The queue as Label Studio tasks: one prediction per person (named after them, their
    decision) and the model's; an annotation of such a task comes back with role
    adjudication, and the item is labeled again."""
    import json

    from grounding.convert.labelstudio import adjudication_tasks, from_percent
    from pipelines.review import ImportConfig, import_labels

    st = _store(tmp_path)
    (task,) = adjudication_tasks(st.unresolved().to_pylist(), guideline="team@1")
    assert task["data"]["role"] == "adjudication" and task["data"]["text"] == "thing 1"
    assert task["data"]["guideline"] == "team@1"
    assert task["data"]["reviewers"] == ["alice", "bob"]
    shown = {p["model_version"]: [from_percent(r["value"], 100, 80) for r in p["result"]]
             for p in task["predictions"]}
    assert shown == {"alice: accept": [[0, 0, 10, 10]], "bob: correct": [[50, 50, 60, 60]],
                     "model": [[0, 0, 10, 10]]}
    # carol adjudicates: bob was right
    ann = dict(task["predictions"][1]["result"][0])
    task |= {"id": 1, "annotations": [{"id": 1, "completed_by": 5, "result": [ann],
                                       "was_cancelled": False,
                                       "updated_at": "2026-12-02T10:00:00Z"}]}
    p = tmp_path / "adjudicated.json"
    p.write_text(json.dumps([task]))
    res = import_labels(ImportConfig(input=str(p), from_fmt="labelstudio", store=st.uri),
                        reviewers={5: "carol"})
    assert res["records"] == 1
    snap = {r["text"]: r for r in st.snapshot().to_pylist()}
    assert snap["thing 1"]["role"] == "adjudication" and snap["thing 1"]["reviewer"] == "carol"
    assert snap["thing 1"]["boxes"] == [[50.0, 50.0, 60.0, 60.0]]
    assert snap["thing 1"]["decision"] == "correct"  # against the model's prediction
    assert st.resolution()["unresolved"] == 0 and len(st.unresolved()) == 0


def test_a_reject_is_shown_as_the_reject_choice(tmp_path):
    from grounding.convert.labelstudio import adjudication_tasks

    st = ReviewStore(str(tmp_path / "s"))
    st.append([_rec(3, [0, 0, 10, 10], "accept", "alice"), _rec(3, [], "reject", "bob")],
              source="test")
    (task,) = adjudication_tasks(st.unresolved().to_pylist())
    bob = next(p for p in task["predictions"] if p["model_version"] == "bob: reject")
    assert [r["type"] for r in bob["result"]] == ["choices"]
    assert bob["result"][0]["value"] == {"choices": ["reject"]}
