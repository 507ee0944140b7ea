"""Several people on one Label Studio task: each person's newest annotation becomes their own
decision in the store (who, when, the guideline the task carried); Label Studio's export gives
user ids, which the reviewers map turns into e-mail addresses."""

from __future__ import annotations

import json

import pytest

from grounding.convert.labelstudio import to_tasks
from grounding.labels import item
from grounding.store import ReviewStore
from pipelines.review import ImportConfig, import_labels

W, H = 400, 300


def _box(x, y, w, h):
    return {"type": "rectanglelabels", "from_name": "label", "to_name": "image",
            "original_width": W, "original_height": H, "image_rotation": 0,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0,
                      "rectanglelabels": ["target"]}}


def _ann(ann_id, user, when, result, cancelled=False):
    # As Label Studio 1.23.2's JSON export writes it: completed_by is the user id.
    return {"id": ann_id, "completed_by": user, "result": result, "was_cancelled": cancelled,
            "created_at": when, "updated_at": when, "task": 1, "project": 1}


def _export(guideline="team@3"):
    (task,) = to_tasks([item("/imgs/a.png", "the cat", [[40.0, 30.0, 140.0, 130.0]],
                             width=W, height=H, score=0.4)])
    task["data"]["guideline"] = guideline
    pred = task["predictions"][0]["result"]
    task |= {"id": 1, "annotations": [
        _ann(1, 7, "2026-12-01T10:00:00Z", [_box(1, 1, 5, 5)]),          # alice, changed later
        _ann(2, 8, "2026-12-01T10:05:00Z", pred),                         # bob accepts
        _ann(3, 7, "2026-12-01T10:10:00Z", [_box(10, 10, 25, 40)]),       # alice corrects
        _ann(4, 9, "2026-12-01T10:20:00Z", [], cancelled=True),           # carol skipped
    ]}
    return [task]


def test_every_persons_newest_annotation_is_their_decision(tmp_path):
    p = tmp_path / "export.json"
    p.write_text(json.dumps(_export()))
    store = str(tmp_path / "store")
    res = import_labels(ImportConfig(input=str(p), from_fmt="labelstudio", store=store),
                        reviewers={7: "alice@x", 8: "bob@x"})
    assert res["records"] == 2 and res["decisions"] == {"accept": 1, "correct": 1}
    st = ReviewStore(store)
    ann = {r["reviewer"]: r for r in st.annotations().to_pylist()}
    assert set(ann) == {"alice@x", "bob@x"}
    assert ann["bob@x"]["decision"] == "accept"
    assert ann["alice@x"]["decision"] == "correct"
    assert ann["alice@x"]["boxes"] == [[40.0, 30.0, 140.0, 150.0]]
    assert ann["alice@x"]["reviewed_at"] == "2026-12-01T10:10:00Z"
    assert {r["guideline"] for r in ann.values()} == {"team@3"}
    # the snapshot takes the newest person's decision (alice's, 10:10), the other is kept
    (snap,) = st.snapshot().to_pylist()
    assert snap["reviewer"] == "alice@x" and snap["decision"] == "correct"


def test_without_a_reviewers_map_the_user_id_is_recorded(tmp_path):
    p = tmp_path / "export.json"
    p.write_text(json.dumps(_export(guideline=None)))
    store = str(tmp_path / "store")
    import_labels(ImportConfig(input=str(p), from_fmt="labelstudio", store=store))
    ann = ReviewStore(store).annotations().to_pylist()
    assert sorted(r["reviewer"] for r in ann) == ["7", "8"]
    assert {r["guideline"] for r in ann} == {None}  # a task pushed without a guideline


def test_a_bad_annotation_names_whose_it_is_and_refuses_the_task(tmp_path):
    tasks = _export()
    tasks[0]["annotations"][1]["result"] = [dict(_box(90, 10, 20, 20))]  # bob: past the edge
    p = tmp_path / "export.json"
    p.write_text(json.dumps(tasks))
    from grounding.labels import LabelFormatError

    with pytest.raises(LabelFormatError, match=r"task 1: annotation 2 by bob@x: box .* reaches "
                                               r"outside the 400x300 image"):
        import_labels(ImportConfig(input=str(p), from_fmt="labelstudio",
                                   store=str(tmp_path / "store")), reviewers={8: "bob@x"})


def test_review_export_ships_the_guideline_with_the_tasks(tmp_path, capsys):
    from support import fake_job

    from grounding import guideline
    from groundlabel.cli import main

    job = fake_job(tmp_path)
    tasks = tmp_path / "review" / "tasks.json"
    assert main(["review", "export", str(job["out"]), "--tasks", str(tasks)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["guideline"] == "groundlabel-default@1"
    assert {t["data"]["guideline"] for t in json.loads(tasks.read_text())} == {out["guideline"]}
    html = (tmp_path / "review" / "instructions.html").read_text()
    assert guideline.from_instructions(html) == out["guideline"]
    # a guideline file without a version is one clear error, nothing written
    bad = tmp_path / "bad.md"
    bad.write_text("# Rules\n")
    assert main(["review", "export", str(job["out"]), "--tasks", str(tmp_path / "t2.json"),
                 "--guideline", str(bad)]) == 2
    assert "front matter" in capsys.readouterr().err and not (tmp_path / "t2.json").exists()


def test_the_overlap_share_is_seeded_exact_and_stable_per_item():
    from pipelines.review import overlap_items

    ids = [f"item-{k}" for k in range(200)]
    chosen = overlap_items(ids, 0.1, seed=7)
    assert len(chosen) == 20 and chosen <= set(ids)
    assert overlap_items(list(reversed(ids)), 0.1, seed=7) == chosen  # order does not matter
    assert overlap_items(ids, 0.1, seed=8) != chosen                    # the seed does
    # an item chosen at a smaller share stays chosen at a larger one
    assert overlap_items(ids, 0.05, seed=7) <= chosen <= overlap_items(ids, 0.5, seed=7)
    assert overlap_items(ids, 0.0, seed=7) == set() and overlap_items(ids, 1.0, seed=7) == set(ids)


def test_overlap_flags_are_checked_and_name_the_flag():
    from groundlabel.cli import main

    with pytest.raises(SystemExit, match=r"--overlap: Input should be less than or equal to 1"):
        main(["review", "push", "out/", "--url", "http://x", "--overlap", "1.5"])
    with pytest.raises(SystemExit, match=r"--annotators: Input should be greater than or equal"):
        main(["review", "push", "out/", "--url", "http://x", "--overlap", "0.1",
              "--annotators", "1"])


def test_a_share_of_the_tasks_are_gold_and_nothing_tells_them_apart(tmp_path, capsys):
    from support import fake_job

    from groundlabel.cli import main
    from pipelines.review import job_items

    job = fake_job(tmp_path)
    items = job_items(str(job["out"]))
    gold = tmp_path / "gold.jsonl"
    gold.write_text("".join(json.dumps({"image": it["image"], "text": it["text"],
                                        "bboxes": it["boxes"]}) + "\n" for it in items[:3]))
    tasks = tmp_path / "t.json"
    assert main(["review", "export", str(job["out"]), "--tasks", str(tasks), "--gold",
                 str(gold), "--gold-share", "0.2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 9 and out["gold_tasks"] == 2 and out["gold_in_job"] == 3
    written = json.loads(tasks.read_text())
    keys = {k for t in written for k in t["data"]} | {k for t in written for k in t}
    assert not any("gold" in k for k in keys)  # nothing marks a gold task
    # more gold asked for than the job has: all of it, and how many are missing
    assert main(["review", "export", str(job["out"]), "--tasks", str(tasks), "--gold",
                 str(gold), "--gold-share", "0.5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gold_tasks"] == 3 and out["gold_short"] == 1  # round(0.5 * 9) = 4
    with pytest.raises(SystemExit, match="--gold-share needs --gold"):
        main(["review", "export", str(job["out"]), "--tasks", str(tasks), "--gold-share", "0.1"])


def test_pulling_the_same_annotations_again_appends_nothing(tmp_path):
    """`review pull` re-reads the whole project each time: a decision already in the store (the
    same person's same annotation, same time) is not appended again; an edited annotation is a
    new decision."""
    p = tmp_path / "export.json"
    tasks = _export()
    p.write_text(json.dumps(tasks))
    store = str(tmp_path / "store")
    cfg = ImportConfig(input=str(p), from_fmt="labelstudio", store=store)
    people = {7: "alice@x", 8: "bob@x"}
    first = import_labels(cfg, reviewers=people)
    assert first["records"] == 2 and first["version"] == 1
    again = import_labels(cfg, reviewers=people)
    assert again["records"] == 0 and again["already_stored"] == 2
    assert again["version"] is None
    st = ReviewStore(store)
    assert st.latest() == 1 and len(st.history()) == 2
    # bob edits his annotation in Label Studio: that is a new decision, and only it is added
    tasks[0]["annotations"][1] |= {"result": [_box(12, 10, 25, 40)],
                                   "updated_at": "2026-12-01T11:00:00Z"}
    p.write_text(json.dumps(tasks))
    edited = import_labels(cfg, reviewers=people)
    assert edited["records"] == 1 and edited["already_stored"] == 1
    assert edited["decisions"] == {"correct": 1}
    assert len(ReviewStore(store).history()) == 3
