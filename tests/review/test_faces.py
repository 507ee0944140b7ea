"""``--blur-faces``: faces in generated images are found and blurred on every path where image
bytes leave a job (embedded exports, Label Studio tasks, report thumbnails); pixels beyond a
margin around each face and every box stay as they were."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support import draw_face, job_table

from grounding.faces import blur_faces, blur_region, detect_faces

MARGIN = 3  # px beyond the blurred region that a blur kernel may not reach (we crop first)


def _decode(uri: str):
    from PIL import Image

    assert uri.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")


def _iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _check_blurred(before, after, face_box) -> None:
    """Inside the face: changed a lot. Beyond the blurred region + MARGIN: unchanged."""
    a, b = np.asarray(before, np.int16), np.asarray(after, np.int16)
    assert a.shape == b.shape
    x1, y1, x2, y2 = face_box
    inner = np.abs(a[y1 + 10:y2 - 10, x1 + 10:x2 - 10] - b[y1 + 10:y2 - 10, x1 + 10:x2 - 10])
    assert inner.mean() > 8, inner.mean()          # eyes, brows, mouth smeared away
    (found,) = detect_faces(before)
    rx1, ry1, rx2, ry2 = blur_region(found[:4], before.width, before.height)
    mask = np.ones(a.shape[:2], bool)
    mask[max(0, ry1 - MARGIN):ry2 + MARGIN, max(0, rx1 - MARGIN):rx2 + MARGIN] = False
    assert mask.sum() > 0.5 * mask.size
    assert (a[mask] == b[mask]).all()               # nothing else touched
    assert detect_faces(after) == []                 # and the face is gone for the detector


@pytest.mark.parametrize("size", [60, 120, 220])
def test_generated_face_is_found_and_blurred_and_nothing_else_changes(size):
    img, box = draw_face(size=size, seed=size)
    faces = detect_faces(img)
    assert len(faces) == 1 and _iou(faces[0][:4], box) > 0.3, (faces, box)
    out, found = blur_faces(img)
    assert found == faces
    _check_blurred(img, out, box)


def test_an_image_without_a_face_is_left_alone():
    from grounding.synth import make_sample

    img = make_sample(3, "robust").image
    out, faces = blur_faces(img)
    assert faces == [] and np.array_equal(np.asarray(out), np.asarray(img.convert("RGB")))


def _face_job(tmp_path: Path) -> tuple[Path, Path, tuple]:
    """A job output of one labeled row whose image holds a generated face, plus the image."""


    img, box = draw_face(size=120, centre=(420, 240), seed=1)
    path = tmp_path / "face.png"
    img.save(path)
    lineage = {"model": "/m", "family": "qwen3_vl", "prompt_version": "qwen3_vl:00000000",
               "job_id": "job-face", "adapter": None, "shard": "d.jsonl"}
    pred = [40.0, 50.0, 140.0, 170.0]
    rows = [dict(lineage, row_id="d.jsonl:0", image=str(path), text="the person on the right",
                 boxes=[{"x1": pred[0], "y1": pred[1], "x2": pred[2], "y2": pred[3],
                         "score": 0.4, "label": None}],
                 score=0.4, status="ok", width=img.width, height=img.height)]
    out = job_table(tmp_path / "job", rows, job_id="job-face", model="/m")
    return out, path, box


def test_every_path_that_writes_pixels_blurs_faces_and_keeps_boxes(tmp_path):
    from PIL import Image

    from pipelines.report import ReportConfig, report
    from pipelines.review import ExportConfig, ReviewExportConfig, export_labels, export_tasks

    job, path, box = _face_job(tmp_path)
    original = Image.open(path).convert("RGB")

    # 1. label exports with embedded images
    out = tmp_path / "labels.jsonl"
    export_labels(ExportConfig(source=str(job), to="seed", out=str(out), embed_images=True,
                               blur_faces=True))
    (rec,) = [json.loads(x) for x in out.read_text().splitlines()]
    _check_blurred(original, _decode(rec["image"]), box)
    assert rec["bbox"] == [40.0, 50.0, 140.0, 170.0]

    # ... and without the flag, the same export carries the face untouched (opt-in)
    export_labels(ExportConfig(source=str(job), to="seed", out=str(out), embed_images=True))
    (rec,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert np.array_equal(np.asarray(_decode(rec["image"])), np.asarray(original))

    # 2. Label Studio tasks with embedded images
    tasks = tmp_path / "review" / "tasks.json"
    export_tasks(ReviewExportConfig(output=str(job), tasks=str(tasks), embed_images=True,
                                    blur_faces=True))
    (task,) = json.loads(tasks.read_text())
    _check_blurred(original, _decode(task["data"]["image"]), box)
    assert task["data"]["predicted_boxes"] == [[40.0, 50.0, 140.0, 170.0]]
    v = task["predictions"][0]["result"][0]["value"]
    assert (v["x"], v["width"]) == pytest.approx((40 / 640 * 100, 100 / 640 * 100))

    # 3. the HTML report's thumbnails: the face is visible without the flag, gone with it
    def thumb(blur: bool):
        page = report(ReportConfig(output=str(job), out=str(tmp_path / f"rep-{blur}"),
                                   blur_faces=blur))
        return Image.open(Path(page).parent / "thumbs" / "000.png").convert("RGB")

    assert len(detect_faces(thumb(False))) == 1
    assert detect_faces(thumb(True)) == []


def test_blur_faces_without_embedded_images_is_a_clear_error(tmp_path):
    job, _, _ = _face_job(tmp_path)
    for argv in (["export", str(job), "--to", "coco", "--out", str(tmp_path / "c.json"),
                  "--blur-faces"],
                 ["review", "export", str(job), "--tasks", str(tmp_path / "t.json"),
                  "--blur-faces"]):
        res = subprocess.run([sys.executable, "-m", "groundlabel", *argv], capture_output=True,
                             text=True)
        assert res.returncode != 0 and "--blur-faces needs --embed-images" in res.stderr, \
            res.stderr
    assert not (tmp_path / "c.json").exists() and not (tmp_path / "t.json").exists()
