"""A real Label Studio server, started by the test: a job's predictions are pushed as tasks,
a reviewer works through Label Studio's SDK, and the export comes back as decisions in the
store. Label Studio lives in its own venv (.venv-ls, `make labelstudio`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import fake_calibration, fake_job

sys.path.insert(0, str(Path(__file__).parent))
from labelstudio_server import LS_VENV, label_studio_available, start_label_studio  # noqa: E402

from grounding.store import ReviewStore  # noqa: E402
from groundlabel.cli import main  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not label_studio_available() and not os.environ.get("GROUNDLABEL_REQUIRE_LABEL_STUDIO"),
    reason="Label Studio venv missing: `make labelstudio`")]


def test_job_to_label_studio_and_back_into_the_store(tmp_path, capsys, monkeypatch):
    job = fake_job(tmp_path)
    cal = fake_calibration(tmp_path / "reg")
    with start_label_studio(tmp_path / "ls") as (url, token):
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", token)
        assert main(["review", "push", str(job["out"]), "--url", url,
                     "--registry", str(tmp_path / "reg")]) == 0
        pushed = json.loads(capsys.readouterr().out)
        assert pushed["tasks"] == 9
        _check_scores_in_label_studio(url, token, pushed["project"], cal)
        did = json.loads(subprocess.run(
            [str(LS_VENV / "bin" / "python"), str(Path(__file__).with_name("ls_reviewer.py")),
             url, token, str(pushed["project"])],
            check=True, capture_output=True, text=True, timeout=300).stdout)
        store = str(tmp_path / "store")
        assert main(["review", "pull", "--url", url, "--project", str(pushed["project"]),
                     "--store", store]) == 0
        pulled = json.loads(capsys.readouterr().out)
        # a wrong token is a clear error, not a traceback
        monkeypatch.setenv("LABEL_STUDIO_API_KEY", "0" * 40)
        assert main(["review", "pull", "--url", url, "--project", str(pushed["project"]),
                     "--store", store]) == 2
        assert "HTTP 401" in capsys.readouterr().err
    assert pulled["version"] == 1 and pulled["records"] == 4
    assert pulled["decisions"] == {"accept": 1, "correct": 2, "reject": 1}
    rows = {r["text"]: r for r in ReviewStore(store).snapshot().to_pylist()}
    expect = {"accept": "accept", "move": "correct", "reject": "reject", "empty": "correct"}
    assert {t: rows[t]["decision"] for t in did} == {t: expect[a] for t, a in did.items()}
    for text, action in did.items():
        r = rows[text]
        assert r["job_id"] == "job-abc123" and r["prompt_version"] == "qwen3_vl:1a2b3c4d"
        if action == "accept":
            assert r["boxes"] == pytest.approx(r["predicted_boxes"])
        if action == "move":
            assert r["boxes"][0][0] > r["predicted_boxes"][0][0]
        if action == "empty":
            assert r["boxes"] == []
    # tasks went out least-confident first: the reviewed ones are the 4 lowest scores
    assert max(r["predicted_score"] or 0 for r in rows.values()) <= 0.55
    # ... and the store got the RAW scores back (the tasks were sorted by calibrated ones)
    raw = {0.91, 0.83, 0.72, 0.64, 0.55, 0.97, 0.1, 0.2, None}
    assert {r["predicted_score"] for r in rows.values()} <= raw
    assert list(Path(store, "exports").glob("labelstudio-*.json"))  # raw export kept


def _check_scores_in_label_studio(url: str, token: str, project: int, cal) -> None:
    """What Label Studio itself holds: per task the prediction's score (calibrated), its model
    version and per-region raw scores, the scores as data columns, and its own
    ``predictions_score`` / ``predictions_model_versions`` task columns."""
    import requests

    s = requests.Session()
    s.headers["Authorization"] = f"Token {token}"
    got = s.get(f"{url}/api/tasks", params={"project": project, "page_size": 100,
                                             "fields": "all"}, timeout=60)
    assert got.status_code == 200, got.text[:300]
    body = got.json()
    tasks = body["tasks"] if isinstance(body, dict) else body
    assert len(tasks) == 9
    for t in tasks:
        d = t["data"]
        (pred,) = t["predictions"]
        assert pred["model_version"] == "tiny-qwen3-vl/qwen3_vl:1a2b3c4d"
        if d["score"] is None:   # unparseable: no score to calibrate
            assert d["calibrated_score"] is None
            continue
        assert d["calibrated_score"] == pytest.approx(cal.one(d["score"]))
        assert pred["score"] == pytest.approx(d["calibrated_score"])
        assert all(r["score"] > 0 for r in pred["result"])   # each region's own raw score
    # Label Studio's own task columns, which its data manager sorts and filters by
    for t in tasks:
        assert "tiny-qwen3-vl/qwen3_vl:1a2b3c4d" in t["predictions_model_versions"]
        if t["data"]["calibrated_score"] is not None:
            assert t["predictions_score"] == pytest.approx(t["data"]["calibrated_score"])
    scores = [t["predictions_score"] for t in tasks if t["predictions_score"] is not None]
    assert scores == sorted(scores)  # imported least confident first
