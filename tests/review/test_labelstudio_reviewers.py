"""Two people in a real Label Studio: the guideline is the project's instructions and in every
task; both label the same tasks through the API, each as themselves; the pull keeps both
people's decisions, who made them and the guideline version."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from support import fake_job

sys.path.insert(0, str(Path(__file__).parent))
from labelstudio_server import (  # noqa: E402
    USERNAME,
    invite_user,
    label_studio_available,
    start_label_studio,
)

from grounding import guideline  # noqa: E402
from grounding.store import ReviewStore  # noqa: E402
from groundlabel.cli import main  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not label_studio_available() and not os.environ.get("GROUNDLABEL_REQUIRE_LABEL_STUDIO"),
    reason="Label Studio venv missing: `make labelstudio`")]

DAN = "dan@example.com"


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    """One server for the module (its first start runs the migrations: ~40-75 s), with a
    second person, Dan, signed up: ``(url, admin token, Dan's token)``."""
    with start_label_studio(tmp_path_factory.mktemp("ls")) as (url, token):
        yield url, token, invite_user(url, token, DAN, "dan-pass-12345")


def _session(token: str):
    import requests

    s = requests.Session()
    s.headers["Authorization"] = f"Token {token}"
    return s


def _annotate(s, url: str, task: dict, result: list) -> None:
    r = s.post(f"{url}/api/tasks/{task['id']}/annotations", json={"result": result}, timeout=60)
    assert r.status_code == 201, r.text[:300]


def test_two_reviewers_on_the_same_tasks_under_the_guideline(label_studio, tmp_path, capsys,
                                                             monkeypatch):
    job = fake_job(tmp_path)
    rules = guideline.load()
    store = str(tmp_path / "store")
    url, token, dan_token = label_studio
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", token)
    assert main(["review", "push", str(job["out"]), "--url", url]) == 0
    pushed = json.loads(capsys.readouterr().out)
    project = pushed["project"]
    assert pushed["guideline"] == rules.id == "groundlabel-default@1"
    admin, dan = _session(token), _session(dan_token)
    # what Label Studio shows: the guideline as the project's instructions, before labeling
    got = admin.get(f"{url}/api/projects/{project}", timeout=60).json()
    assert got["show_instruction"] is True
    assert guideline.from_instructions(got["expert_instruction"]) == rules.id
    assert "[600, 450, 640, 480]" in got["expert_instruction"]
    assert dan.get(f"{url}/api/current-user/whoami", timeout=60).json()["email"] == DAN
    tasks = sorted(admin.get(f"{url}/api/tasks", params={"project": project, "fields": "all",
                                                          "page_size": 100},
                             timeout=60).json()["tasks"], key=lambda t: t["id"])
    assert {t["data"]["guideline"] for t in tasks} == {rules.id}
    # both label the first two tasks: the admin accepts both predictions, Dan accepts the
    # first and moves the second's box 10 % to the right
    for k, task in enumerate(tasks[:2]):
        pred = task["predictions"][0]["result"]
        _annotate(admin, url, task, pred)
        moved = [dict(r, value=dict(r["value"], x=min(r["value"]["x"] + 10,
                                                      100 - r["value"]["width"])))
                 for r in pred] if k == 1 else pred
        _annotate(dan, url, task, moved)
    assert main(["review", "pull", "--url", url, "--project", str(project),
                 "--store", store]) == 0
    pulled = json.loads(capsys.readouterr().out)
    # pushing again into the project under another guideline version is refused
    other = tmp_path / "g2.md"
    other.write_text(Path(rules.source).read_text().replace('version: "1"', 'version: "2"'))
    assert main(["review", "push", str(job["out"]), "--url", url, "--project",
                 str(project), "--guideline", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"shows guideline {rules.id}, not guideline groundlabel-default@2" in err
    # ... and with the same guideline it is accepted
    assert main(["review", "push", str(job["out"]), "--url", url, "--project",
                 str(project)]) == 0
    assert pulled["records"] == 4 and pulled["decisions"] == {"accept": 3, "correct": 1}
    capsys.readouterr()
    # pulling again adds nothing: every decision is already in the store
    assert main(["review", "pull", "--url", url, "--project", str(project),
                 "--store", store]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["records"] == 0 and again["already_stored"] == 4
    st = ReviewStore(store)
    ann = st.annotations().to_pylist()
    # the first task agreed; on the second, Dan's box is 10 % away: left out until adjudicated
    assert len(ann) == 4 and len(st.snapshot()) == 1 and st.resolution()["unresolved"] == 1
    by = {(r["text"], r["reviewer"]): r for r in ann}
    first, second = (t["data"]["text"] for t in tasks[:2])
    assert set(by) == {(first, USERNAME), (first, DAN), (second, USERNAME), (second, DAN)}
    assert by[second, DAN]["decision"] == "correct" and by[second, USERNAME]["decision"] == "accept"
    assert by[second, DAN]["boxes"][0][0] > by[second, USERNAME]["boxes"][0][0]
    assert {r["guideline"] for r in ann} == {rules.id}
    assert all(r["reviewed_at"] for r in ann)
    # the second task was a gold item (nothing told the reviewers): its known box is the
    # model's, so the admin (accepted) is right and Dan (moved it 10 %) is not
    gold = tmp_path / "gold.jsonl"
    data = tasks[1]["data"]
    gold.write_text(json.dumps({"image": data["image_ref"], "text": data["text"],
                                "bboxes": data["predicted_boxes"]}) + "\n")
    capsys.readouterr()
    assert main(["review", "agreement", store, "--gold", str(gold)]) == 0
    scored = json.loads(capsys.readouterr().out)["gold"]
    assert scored[USERNAME] == {"gold_items": 1, "acc50": 1.0, "decision_accuracy": 1.0}
    assert scored[DAN] == {"gold_items": 1, "acc50": 0.0, "decision_accuracy": 0.0}


def _work_through(s, url: str, project: int) -> list[int]:
    """Label Studio's own label stream (``/next``) as one person: take each task it gives,
    accept its prediction, until it has none left; returns the task ids."""
    done = []
    while True:
        r = s.get(f"{url}/api/projects/{project}/next", timeout=60)
        if r.status_code == 404:
            return done
        assert r.status_code == 200, r.text[:300]
        task = r.json()
        _annotate(s, url, task, task["predictions"][0]["result"] if task["predictions"] else [])
        done.append(task["id"])
        assert len(done) <= 50


def test_overlap_a_seeded_share_is_labeled_by_two_people(label_studio, tmp_path, capsys,
                                                         monkeypatch):
    from pipelines.review import overlap_items

    job = fake_job(tmp_path)
    store = str(tmp_path / "store")
    url, token, dan_token = label_studio
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", token)
    assert main(["review", "push", str(job["out"]), "--url", url, "--overlap", "0.34",
                 "--annotators", "2", "--seed", "3"]) == 0
    pushed = json.loads(capsys.readouterr().out)
    project = pushed["project"]
    assert pushed["tasks"] == 9 and pushed["overlapped"] == 3
    admin, dan = _session(token), _session(dan_token)
    got = admin.get(f"{url}/api/projects/{project}", timeout=60).json()
    assert got["maximum_annotations"] == 2
    tasks = admin.get(f"{url}/api/tasks", params={"project": project, "fields": "all",
                                                  "page_size": 100}, timeout=60).json()["tasks"]
    chosen = overlap_items([t["data"]["item_id"] for t in tasks], 0.34, seed=3)
    assert {t["data"]["item_id"]: t["overlap"] for t in tasks} == {
        t["data"]["item_id"]: 2 if t["data"]["item_id"] in chosen else 1 for t in tasks}
    # Label Studio's label stream gives the first person every task and the second only
    # the overlapped ones, which still lack an annotation
    first = _work_through(admin, url, project)
    second = _work_through(dan, url, project)
    by_id = {t["id"]: t["data"]["item_id"] for t in tasks}
    assert len(first) == 9 and {by_id[i] for i in second} == chosen
    assert main(["review", "pull", "--url", url, "--project", str(project),
                 "--store", store]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 12
    assert main(["review", "agreement", store]) == 0
    agreed = json.loads(capsys.readouterr().out)
    assert agreed["overlapped_items"] == 3 and agreed["people"] == sorted([USERNAME, DAN])
    assert agreed["overall"]["decisions"]["agreement"] == 1.0  # both accepted every prediction


def test_a_disagreement_is_adjudicated_and_then_trained_on(label_studio, tmp_path, capsys,
                                                           monkeypatch):
    job = fake_job(tmp_path)
    store = str(tmp_path / "store")
    url, token, dan_token = label_studio
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", token)
    assert main(["review", "push", str(job["out"]), "--url", url]) == 0
    project = json.loads(capsys.readouterr().out)["project"]
    admin, dan = _session(token), _session(dan_token)
    tasks = sorted(admin.get(f"{url}/api/tasks", params={"project": project, "fields": "all",
                                                          "page_size": 100},
                             timeout=60).json()["tasks"], key=lambda t: t["id"])
    agreed, disputed = tasks[0], tasks[1]
    for task in (agreed, disputed):
        _annotate(admin, url, task, task["predictions"][0]["result"])
    _annotate(dan, url, agreed, agreed["predictions"][0]["result"])
    _annotate(dan, url, disputed, [{"from_name": "decision", "to_name": "image",
                                    "type": "choices", "value": {"choices": ["reject"]}}])
    assert main(["review", "pull", "--url", url, "--project", str(project),
                 "--store", store]) == 0
    capsys.readouterr()
    st = ReviewStore(store)
    assert st.resolution()["unresolved"] == 1
    assert disputed["data"]["item_id"] not in {it["item_id"] for it in st.labels()}
    # the queue goes to Label Studio, every person's decision shown as a prediction
    assert main(["review", "push", "--adjudicate", store, "--url", url]) == 0
    queued = json.loads(capsys.readouterr().out)
    assert queued["tasks"] == 1 and queued["items"] == 1
    (task,) = admin.get(f"{url}/api/tasks", params={"project": queued["project"],
                                                     "fields": "all"}, timeout=60).json()["tasks"]
    shown = {p["model_version"]: p for p in task["predictions"]}
    assert set(shown) == {f"{USERNAME}: accept", f"{DAN}: reject", "model"}
    assert task["data"]["role"] == "adjudication"
    # the adjudicator sides with the model's boxes
    _annotate(admin, url, task, shown["model"]["result"])
    assert main(["review", "pull", "--url", url, "--project", str(queued["project"]),
                 "--store", store]) == 0
    capsys.readouterr()
    st = ReviewStore(store)
    assert st.resolution() | {"version": None} == {
        "version": None, "items": 2, "overlapped": 2, "agreed": 1, "adjudicated": 1,
        "unresolved": 0}
    labels = {it["item_id"]: it for it in st.labels()}
    assert labels[disputed["data"]["item_id"]]["boxes"] == disputed["data"]["predicted_boxes"]
    (row,) = [r for r in st.snapshot().to_pylist() if r["item_id"] == disputed["data"]["item_id"]]
    assert row["role"] == "adjudication" and row["decision"] == "accept"
    # an empty queue creates nothing
    assert main(["review", "push", "--adjudicate", store, "--url", url]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"] == 0
