"""Label Studio round trip on its documented JSON: job predictions -> tasks -> an annotation
export (as Label Studio writes it) -> review decisions in the store."""

from __future__ import annotations

import copy
import json

import pytest

from grounding.convert.labelstudio import LABEL_CONFIG, from_percent, to_tasks
from grounding.labels import LabelFormatError, item
from grounding.store import ReviewStore
from pipelines.review import ImportConfig, import_labels

W, H = 400, 300


def _items():
    lineage = {"job_id": "job-1", "model": "models/tiny", "adapter": "a-7",
               "prompt_version": "p1"}
    return [item(f"/imgs/{k}.png", f"thing {k}", [[40.0 * k, 30.0, 40.0 * k + 100, 130.5]],
                 width=W, height=H, score=s, scores=[s], row_id=f"s.jsonl:{k}", **lineage)
            for k, s in enumerate([0.9, 0.2, 0.6, 0.4, 0.7])]


def _annotation(task: dict, result: list, ann_id: int, when: str, cancelled=False) -> dict:
    """An annotation as Label Studio's JSON export writes it (docs: "Label Studio JSON format
    of annotated tasks")."""
    return {"id": ann_id, "completed_by": {"id": 1, "email": "rev@example.com"},
            "result": result, "was_cancelled": cancelled, "ground_truth": False,
            "created_at": when, "updated_at": when, "lead_time": 3.2,
            "task": task["id"], "project": 1, "parent_prediction": None, "last_action": None}


def _box(x, y, w, h, label="target", rid="r1"):
    return {"id": rid, "type": "rectanglelabels", "from_name": "label", "to_name": "image",
            "original_width": W, "original_height": H, "image_rotation": 0, "origin": "manual",
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0,
                      "rectanglelabels": [label]}}


def _export(tasks: list[dict]) -> list[dict]:
    """What Label Studio exports after review: ids added, annotations per task."""
    out = []
    for i, t in enumerate(copy.deepcopy(tasks), 1):
        t.update(id=i, inner_id=i, project=1, meta={}, drafts=[], file_upload=None,
                 created_at="2026-11-25T10:00:00Z", updated_at="2026-11-25T10:00:00Z",
                 annotations=[])
        out.append(t)
    by_item = {t["data"]["item_id"]: t for t in out}
    it = _items()
    # item 0: accepted as predicted (the reviewer submitted the pre-annotation unchanged)
    t = by_item[it[0]["item_id"]]
    t["annotations"].append(_annotation(t, t["predictions"][0]["result"], 10, "2026-11-25T11:00"))
    # item 1: corrected; an older cancelled (skipped) annotation is ignored
    t = by_item[it[1]["item_id"]]
    t["annotations"].append(_annotation(t, [], 11, "2026-11-25T10:30", cancelled=True))
    t["annotations"].append(_annotation(t, [_box(10, 10, 25, 50)], 12, "2026-11-25T11:01"))
    # item 2: rejected with the decision choice
    t = by_item[it[2]["item_id"]]
    t["annotations"].append(_annotation(t, [{"id": "c", "type": "choices", "from_name": "decision",
                                             "to_name": "image", "value": {"choices": ["reject"]}}],
                                        13, "2026-11-25T11:02"))
    # item 3: two annotations; the newer one (no boxes = "no such object") wins
    t = by_item[it[3]["item_id"]]
    t["annotations"].append(_annotation(t, [_box(1, 1, 5, 5)], 14, "2026-11-25T11:03"))
    t["annotations"].append(_annotation(t, [], 15, "2026-11-25T11:04"))
    # item 4: not reviewed yet
    return out


def test_tasks_carry_predictions_least_confident_first():
    tasks = to_tasks(_items())
    assert [t["predictions"][0]["score"] for t in tasks] == [0.2, 0.4, 0.6, 0.7, 0.9]
    t = tasks[0]
    r = t["predictions"][0]["result"][0]
    assert r["type"] == "rectanglelabels" and r["value"]["rectanglelabels"] == ["target"]
    assert (r["original_width"], r["original_height"]) == (W, H)
    assert from_percent(r["value"], W, H) == pytest.approx([40, 30, 140, 130.5])
    assert t["predictions"][0]["model_version"] == "tiny/a-7/p1"
    assert t["data"]["text"] == "thing 1" and t["data"]["job_id"] == "job-1"
    # the labeling config names exactly the controls the tasks use
    for name in ('name="label"', 'name="image"', 'value="$image"', 'value="$text"',
                 '<Label value="target"', 'name="decision"'):
        assert name in LABEL_CONFIG


def test_export_comes_back_as_review_decisions(tmp_path):
    export = tmp_path / "export.json"
    export.write_text(json.dumps(_export(to_tasks(_items()))))
    res = import_labels(ImportConfig(input=str(export), from_fmt="labelstudio",
                                     store=str(tmp_path / "store")))
    assert res["version"] == 1 and res["unreviewed"] == 1
    assert res["decisions"] == {"accept": 1, "correct": 2, "reject": 1}
    st = ReviewStore(str(tmp_path / "store"))
    rows = {r["text"]: r for r in st.snapshot().to_pylist()}
    assert rows["thing 0"]["decision"] == "accept"
    assert rows["thing 0"]["boxes"][0] == pytest.approx([0, 30, 100, 130.5])
    assert rows["thing 1"]["decision"] == "correct"
    assert rows["thing 1"]["boxes"][0] == pytest.approx([40, 30, 140, 180])
    assert rows["thing 1"]["predicted_boxes"][0] == pytest.approx([40, 30, 140, 130.5])
    assert rows["thing 1"]["reviewer"] == "rev@example.com"
    assert rows["thing 2"]["decision"] == "reject"
    assert rows["thing 3"]["decision"] == "correct" and rows["thing 3"]["boxes"] == []
    for r in rows.values():  # lineage back to the job, model, adapter and prompt
        assert (r["job_id"], r["model"], r["adapter"], r["prompt_version"]) == (
            "job-1", "models/tiny", "a-7", "p1")
        assert r["source"] == "import:labelstudio" and r["image"].startswith("/imgs/")
    assert {r["text"] for r in st.labels()} == {"thing 0", "thing 1", "thing 3"}


def _bad_export(tmp_path):
    tasks = _export(to_tasks(_items()))
    tasks[0]["annotations"] = [_annotation(tasks[0], [_box(1, 1, 5, 5, label="cat")], 20, "t")]
    tasks[1]["annotations"] = [_annotation(tasks[1], [_box(90, 10, 20, 20)], 21, "t")]
    del tasks[2]["data"]["image"], tasks[2]["data"]["image_ref"]
    # 0.1 % past the right edge (0.4 px of 400): Label Studio rounding, clipped, not an error
    tasks[3]["annotations"] = [_annotation(tasks[3], [_box(80, 10, 20.1, 20)], 22, "t")]
    p = tmp_path / "export.json"
    p.write_text(json.dumps(tasks))
    return p, tasks


def test_bad_export_is_refused_whole_with_every_problem(tmp_path):
    p, _ = _bad_export(tmp_path)
    with pytest.raises(LabelFormatError) as e:
        import_labels(ImportConfig(input=str(p), from_fmt="labelstudio",
                                   store=str(tmp_path / "store")))
    msg = str(e.value)
    assert "task 1: unknown label(s) ['cat']; this project knows ['target']" in msg
    assert "task 2: box [360.0, 30.0, 440.0, 90.0] reaches outside the 400x300 image" in msg
    assert "task 3: task has no image" in msg
    assert ReviewStore(str(tmp_path / "store")).latest() == 0  # nothing written


def test_bad_export_skip_invalid_keeps_the_rest_and_the_rejects(tmp_path):
    p, tasks = _bad_export(tmp_path)
    res = import_labels(ImportConfig(input=str(p), from_fmt="labelstudio",
                                     store=str(tmp_path / "store"), skip_invalid=True,
                                     labels="target"))
    assert res["rejected_rows"] == 3 and res["version"] == 1
    rejects = [json.loads(x) for x in open(res["rejects"])]
    assert [r["where"] for r in rejects] == ["task 1", "task 2", "task 3"]
    assert rejects[0]["row"] == tasks[0]  # the whole task is kept, to fix and import again
    rows = {r["text"]: r for r in ReviewStore(str(tmp_path / "store")).snapshot().to_pylist()}
    assert rows["thing 4"]["boxes"][0][2] == pytest.approx(W)  # clipped to the edge


def test_known_labels_are_configurable(tmp_path):
    p, _ = _bad_export(tmp_path)
    with pytest.raises(LabelFormatError) as e:
        import_labels(ImportConfig(input=str(p), from_fmt="labelstudio",
                                   store=str(tmp_path / "s"), labels="target,cat"))
    assert "unknown label" not in str(e.value)


def _one_task(tmp_path, result: list, predicted=None):
    (t,) = copy.deepcopy(to_tasks(_items()[:1]))
    t.update(id=1, project=1, annotations=[])
    t["annotations"] = [_annotation(t, result, 20, "2026-11-25T12:00")]
    if predicted is not None:
        t["data"]["predicted_boxes"] = predicted
    p = tmp_path / "one.json"
    p.write_text(json.dumps([t]))
    return p


def test_a_plain_rectangle_result_is_a_box_not_an_empty_correction(tmp_path):
    rect = _box(10, 10, 25, 50)
    rect["type"] = "rectangle"             # a <Rectangle> tool: no label list
    del rect["value"]["rectanglelabels"]
    res = import_labels(ImportConfig(input=str(_one_task(tmp_path, [rect])),
                                     from_fmt="labelstudio", store=str(tmp_path / "s")))
    (rec,) = ReviewStore(str(tmp_path / "s")).snapshot().to_pylist()
    assert res["decisions"] == {"correct": 1}
    assert rec["boxes"] == [pytest.approx(from_percent(rect["value"], W, H))]


@pytest.mark.parametrize("predicted", [[[1, 2, 3]], "not boxes", [[5, 5, 1, 1]]])
def test_malformed_predicted_boxes_are_reported_not_a_crash(tmp_path, predicted):
    p = _one_task(tmp_path, [_box(10, 10, 25, 50)], predicted=predicted)
    with pytest.raises(LabelFormatError, match="predicted_boxes is malformed"):
        import_labels(ImportConfig(input=str(p), from_fmt="labelstudio",
                                   store=str(tmp_path / "s")))
    assert ReviewStore(str(tmp_path / "s")).latest() == 0
