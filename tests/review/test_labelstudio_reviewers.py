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


def _session(token: str):
    import requests

    s = requests.Session()
    s.headers["Authorization"] = f"Token {token}"
    return s


def _annotate(s, url: str, task: dict, result: list) -> None:
    r = s.post(f"{url}/api/tasks/{task['id']}/annotations", json={"result": result}, timeout=60)
    assert r.status_code == 201, r.text[:300]


def test_two_reviewers_on_the_same_tasks_under_the_guideline(tmp_path, capsys, monkeypatch):
    job = fake_job(tmp_path)
    rules = guideline.load()
    store = str(tmp_path / "store")
    with start_label_studio(tmp_path / "ls") as (url, token):
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", token)
        assert main(["review", "push", str(job["out"]), "--url", url]) == 0
        pushed = json.loads(capsys.readouterr().out)
        project = pushed["project"]
        assert pushed["guideline"] == rules.id == "groundlabel-default@1"
        admin, dan = _session(token), _session(invite_user(url, token, DAN, "dan-pass-12345"))
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
    st = ReviewStore(store)
    ann = st.annotations().to_pylist()
    assert len(ann) == 4 and len(st.snapshot()) == 2
    by = {(r["text"], r["reviewer"]): r for r in ann}
    first, second = (t["data"]["text"] for t in tasks[:2])
    assert set(by) == {(first, USERNAME), (first, DAN), (second, USERNAME), (second, DAN)}
    assert by[second, DAN]["decision"] == "correct" and by[second, USERNAME]["decision"] == "accept"
    assert by[second, DAN]["boxes"][0][0] > by[second, USERNAME]["boxes"][0][0]
    assert {r["guideline"] for r in ann} == {rules.id}
    assert all(r["reviewed_at"] for r in ann)
