"""The review loop from the command line, on a job output: Label Studio tasks out, a reviewed
export in, the store exported to every format and imported back, the report drawing reviewed
boxes; and no image bytes or EXIF anywhere unless asked for."""

from __future__ import annotations

import base64
import io
import json

import pytest
from support import SECRET, fake_job

from grounding.labels import item
from grounding.store import ReviewStore, decision_record
from groundlabel.cli import main


def _run(capsys, *argv) -> dict:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def _review(tasks: list[dict]) -> list[dict]:
    """Label Studio's export after a reviewer moved every predicted box 10 px right."""
    out = []
    for i, t in enumerate(tasks, 1):
        res = json.loads(json.dumps(t["predictions"][0]["result"]))
        for r in res:
            r["value"]["x"] += 10 / r["original_width"] * 100
        out.append(dict(t, id=i, annotations=[{
            "id": 100 + i, "completed_by": 7, "result": res, "was_cancelled": False,
            "created_at": "2026-11-25T12:00:00Z", "updated_at": "2026-11-25T12:00:00Z"}]))
    return out


def test_job_to_label_studio_to_store_and_every_format(tmp_path, capsys):
    job = fake_job(tmp_path)
    tasks_path = tmp_path / "review" / "tasks.json"
    res = _run(capsys, "review", "export", str(job["out"]), "--tasks", str(tasks_path))
    assert res["n"] == 9  # every labeled row (errors are left out), unparseable ones included
    tasks = json.loads(tasks_path.read_text())
    assert (tmp_path / "review" / "label_config.xml").read_text().startswith("<View>")
    export = tmp_path / "review" / "export.json"
    export.write_text(json.dumps(_review(tasks)))
    store = str(tmp_path / "store")
    res = _run(capsys, "review", "import", str(export), "--store", store)
    assert res["version"] == 1 and res["records"] == len(tasks)
    snap = {r["row_id"]: r for r in ReviewStore(store).snapshot().to_pylist()}
    pred = {t["data"]["row_id"]: t["data"]["predicted_boxes"] for t in tasks}
    for rid, r in snap.items():
        for b, p in zip(r["boxes"], pred[rid], strict=True):
            assert b[0] == pytest.approx(min(p[0] + 10, r["width"]))
    # the store snapshot through every format and back into a second store: same boxes
    for fmt in ("seed", "swift", "coco", "parquet", "labelstudio"):
        out = tmp_path / f"labels.{fmt}"
        _run(capsys, "export", store, "--to", fmt, "--out", str(out))
        st2 = str(tmp_path / f"store-{fmt}")
        if fmt == "labelstudio":
            # tasks carry the labels as pre-annotations: not reviewed, so not imported ...
            res = _run(capsys, "import", str(out), "--from", fmt, "--store", st2)
            assert res["version"] is None and res["unreviewed"] == len(snap)
            # ... but they convert like any other format
            _run(capsys, "export", str(out), "--from", fmt, "--to", "seed", "--out",
                 str(tmp_path / "ls.jsonl"))
            out, fmt = tmp_path / "ls.jsonl", "seed"
        res = _run(capsys, "import", str(out), "--from", fmt, "--store", st2)
        assert res["version"] == 1
        a = {(r["image"], r["text"]): r["boxes"] for r in ReviewStore(store).labels()}
        b = {(r["image"], r["text"]): r["boxes"] for r in ReviewStore(st2).labels()}
        assert a.keys() == b.keys()
        for k in a:
            assert len(b[k]) == len(a[k]), (fmt, k)
            for p, q in zip(sorted(a[k]), sorted(b[k]), strict=True):
                assert q == pytest.approx(p, abs=0.5), (fmt, k)
    # the report draws the reviewed boxes
    assert main(["report", str(job["out"]), "--store", store, "--out", str(tmp_path / "r")]) == 0
    assert "green: the reviewed" in (tmp_path / "r" / "report.html").read_text()


def test_bad_input_is_one_clear_error_on_the_command_line(tmp_path, capsys):
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"images": [], "annotations": [
        {"id": 5, "image_id": 3, "category_id": 1, "bbox": [0, 0, 1, 1]}]}))
    assert main(["import", str(bad), "--from", "coco", "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "annotation id 5: image_id 3 is not in 'images' (dangling reference)" in err
    assert "Traceback" not in err
    assert main(["export", str(tmp_path / "s"), "--to", "coco", "--out", "x"]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    s2 = str(tmp_path / "s2")
    ReviewStore(s2).append([decision_record(item("/i.png", "a", [[1, 1, 2, 2]]), "accept")],
                           source="test")
    assert main(["export", s2, "--to", "coco", "--out", "x", "--version", "4"]) == 2
    assert "has no version 4 (versions: 1..1)" in capsys.readouterr().err


def test_no_image_bytes_or_exif_leave_unless_asked(tmp_path, capsys):
    from PIL import Image

    job = fake_job(tmp_path)
    sources = [p.read_bytes() for p in job["sources"]]
    files = {}
    for fmt in ("seed", "swift", "coco", "parquet", "labelstudio"):
        out = tmp_path / f"plain.{fmt}"
        _run(capsys, "export", str(job["out"]), "--to", fmt, "--out", str(out))
        files[fmt] = out.read_bytes()
    _run(capsys, "review", "export", str(job["out"]), "--tasks", str(tmp_path / "t.json"))
    files["tasks"] = (tmp_path / "t.json").read_bytes()
    for name, data in files.items():
        assert SECRET.encode() not in data and job["exif"] not in data, name
        assert b"data:image" not in data and b"base64" not in data, name
        for src in sources:
            assert src[64:128] not in data, name
    # asked for: the images are embedded, as fresh PNGs without the EXIF/GPS of the source;
    # an image that cannot be read is one clear error (the row whose file was deleted)
    args = ["review", "export", str(job["out"]), "--tasks", str(tmp_path / "e.json"),
            "--embed-images"]
    assert main(args) == 2
    assert "cannot embed its image: image not found: " in (
        capsys.readouterr().err)
    assert not (tmp_path / "e.json").exists()
    Image.new("RGB", (160, 120)).save(tmp_path / "deleted-after-job.png")
    _run(capsys, "review", "export", str(job["out"]), "--tasks", str(tmp_path / "e.json"),
         "--embed-images")
    tasks = json.loads((tmp_path / "e.json").read_text())

    gps = next(t for t in tasks if t["data"]["image_ref"].endswith("gps.jpg"))
    png = base64.b64decode(gps["data"]["image"].split(",", 1)[1])
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and not im.getexif() and not im.info.get("exif")
    assert SECRET.encode() not in (tmp_path / "e.json").read_bytes()
