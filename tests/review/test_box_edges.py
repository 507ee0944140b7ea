"""The box edge convention of the shipped guideline, held by every format: a box touching the
image's right and bottom borders goes out and comes back exactly, and each format's own
spelling of that box (COCO xywh, Label Studio percent ...) reads as the guideline says."""

from __future__ import annotations

import json

import pytest

from grounding import guideline
from grounding.convert import FORMATS, read_labels, write_labels
from grounding.labels import item

W, H = 640, 480
CORNER = [600.0, 450.0, 640.0, 480.0]  # the guideline's worked example
# A size and fractions that are not round in binary or in percent.
W2, H2 = 333, 517
ODD = [W2 - 50.3, H2 - 30.7, float(W2), float(H2)]
WHOLE = [0.0, 0.0, float(W2), float(H2)]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("edge-imgs")
    paths = {}
    for w, h in ((W, H), (W2, H2)):
        p = d / f"{w}x{h}.png"
        Image.new("RGB", (w, h), (20, 90, 200)).save(p)
        paths[w, h] = str(p)
    return paths


def _items(images):
    return [item(images[W, H], "the corner object", [CORNER], width=W, height=H),
            item(images[W2, H2], "the odd corner object", [ODD], width=W2, height=H2),
            item(images[W2, H2], "everything", [WHOLE], width=W2, height=H2)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_box_touching_right_and_bottom_edges_round_trips_exactly(images, tmp_path, fmt):
    items = _items(images)
    uri = str(tmp_path / f"edges.{fmt}")
    write_labels(items, uri, fmt)
    back = {it["text"]: it["boxes"] for it in read_labels(uri, fmt).items}
    assert back == {it["text"]: it["boxes"] for it in items}  # exact, not within 0.5 px


def _read_one(tmp_path, fmt, name, content) -> list[list[float]]:
    p = tmp_path / name
    p.write_text(content if isinstance(content, str) else json.dumps(content))
    (it,) = read_labels(str(p), fmt).items
    return it["boxes"]


def test_each_format_spelling_the_worked_example_reads_as_the_guideline_says(images, tmp_path):
    """The guideline's table, format by format: each spelling is [600, 450, 640, 480]."""
    img = images[W, H]
    coco = {"images": [{"id": 1, "file_name": img, "width": W, "height": H,
                        "caption": "the corner object"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1,
                             "bbox": [600, 450, 40, 30]}],
            "categories": [{"id": 1, "name": "target"}]}
    ls = [{"id": 1, "data": {"image": img, "text": "the corner object", "width": W, "height": H},
           "annotations": [{"id": 1, "result": [{
               "from_name": "label", "to_name": "image", "type": "rectanglelabels",
               "original_width": W, "original_height": H, "image_rotation": 0,
               "value": {"x": 93.75, "y": 93.75, "width": 6.25, "height": 6.25, "rotation": 0,
                         "rectanglelabels": ["target"]}}]}]}]
    swift = {"messages": [{"role": "user", "content": "<image>Find <ref-object>"},
                          {"role": "assistant", "content": "<bbox>"}],
             "images": [img], "objects": {"ref": ["the corner object"],
                                          "bbox": [[600, 450, 640, 480]], "bbox_type": "real"}}
    seed = {"image": img, "text": "the corner object", "bbox": [600, 450, 640, 480],
            "width": W, "height": H}
    seed1000 = dict(seed, bbox=[937.5, 937.5, 1000, 1000], bbox_type="norm1000")
    assert _read_one(tmp_path, "coco", "c.json", coco) == [CORNER]
    assert _read_one(tmp_path, "labelstudio", "l.json", ls) == [CORNER]
    assert _read_one(tmp_path, "swift", "s.jsonl", json.dumps(swift) + "\n") == [CORNER]
    assert _read_one(tmp_path, "seed", "a.jsonl", json.dumps(seed) + "\n") == [CORNER]
    assert _read_one(tmp_path, "seed", "b.jsonl", json.dumps(seed1000) + "\n") == [CORNER]


def test_each_format_writes_the_worked_example_as_the_guideline_says(images, tmp_path):
    import pyarrow.parquet as pq

    items = _items(images)[:1]
    write_labels(items, str(tmp_path / "c.json"), "coco")
    ann = json.loads((tmp_path / "c.json").read_text())["annotations"][0]
    assert ann["bbox"] == [600, 450, 40, 30]
    write_labels(items, str(tmp_path / "l.json"), "labelstudio")
    (r,) = json.loads((tmp_path / "l.json").read_text())[0]["predictions"][0]["result"]
    assert {k: r["value"][k] for k in ("x", "y", "width", "height")} == {
        "x": 93.75, "y": 93.75, "width": 6.25, "height": 6.25}
    assert (r["original_width"], r["original_height"]) == (W, H)
    write_labels(items, str(tmp_path / "s.jsonl"), "swift")
    assert json.loads((tmp_path / "s.jsonl").read_text())["objects"]["bbox"] == [CORNER]
    write_labels(items, str(tmp_path / "a.jsonl"), "seed")
    assert json.loads((tmp_path / "a.jsonl").read_text())["bboxes"] == [CORNER]
    write_labels(items, str(tmp_path / "p.parquet"), "parquet")
    assert pq.read_table(tmp_path / "p.parquet").column("boxes").to_pylist() == [[CORNER]]


def test_label_studio_percent_touching_the_edges_is_the_edge(tmp_path, images):
    """A reviewer's box dragged to the border in Label Studio: x + width = 100 is x2 = W even
    where the percentages are not exact in binary."""
    img = images[W2, H2]
    x, y = 41.7, 13.3
    ls = [{"id": 1, "data": {"image": img, "text": "t", "width": W2, "height": H2},
           "annotations": [{"id": 1, "result": [{
               "from_name": "label", "to_name": "image", "type": "rectanglelabels",
               "original_width": W2, "original_height": H2, "image_rotation": 0,
               "value": {"x": x, "y": y, "width": 100 - x, "height": 100 - y,
                         "rotation": 0, "rectanglelabels": ["target"]}}]}]}]
    (box,) = _read_one(tmp_path, "labelstudio", "l.json", ls)
    assert box[2:] == [W2, H2]


CONVERTERS = ("coco", "labelstudio", "swift", "seed", "parquet")
# What each converter's docstring must say, word for word as the guideline says it.
SAYS = {"coco": "[x1, y1, x2 - x1, y2 - y1]",
        "labelstudio": "x = x1 / W * 100",
        "swift": "[x1, y1, x2, y2]", "seed": "[x1, y1, x2, y2]", "parquet": "[x1, y1, x2, y2]"}


@pytest.mark.parametrize("fmt", CONVERTERS)
def test_converter_docstrings_state_the_guideline_convention(fmt):
    import importlib

    doc = importlib.import_module(f"grounding.convert.{fmt}").__doc__
    text = guideline.load().body
    assert SAYS[fmt] in doc and SAYS[fmt] in text
    assert "far edges" in doc and "far edges" in text
    assert "grounding/guidelines/default.md" in doc


def _random_boxes(n: int, seed: int):
    """``(w, h, box)``: sizes up to 5000 px, coordinates with 0 to 6 decimals, half of them
    touching the right and bottom borders."""
    import random

    rnd = random.Random(seed)
    for k in range(n):
        w, h = rnd.randint(1, 5000), rnd.randint(1, 5000)
        nd = rnd.choice([0, 1, 2, 3, 6])
        x1, y1 = round(rnd.uniform(0, w), nd), round(rnd.uniform(0, h), nd)
        if k % 2:
            x2, y2 = float(w), float(h)
        else:
            x2, y2 = round(rnd.uniform(x1, w), nd), round(rnd.uniform(y1, h), nd)
        yield w, h, [x1, y1, max(x1, x2), max(y1, y2)]


def test_coco_and_label_studio_round_trip_any_box_to_a_millionth_of_a_pixel():
    """xywh and percent are derived numbers: floats cannot always give x1 + (x2 - x1) == x2 or
    (x1 / W * 100) * W / 100 == x1 back. Readers round to 1e-6 px, so a box with up to 6
    decimals comes back exactly, and one touching the border touches it again."""
    from grounding.convert.coco import from_xywh, to_xywh
    from grounding.convert.labelstudio import from_percent, to_percent

    for w, h, b in _random_boxes(20000, 0):
        assert from_xywh(to_xywh(b)) == b, (w, h, b)
        assert from_percent(to_percent(b, w, h), w, h) == b, (w, h, b)


def test_label_studio_box_dragged_to_the_border_is_at_the_border():
    import random

    from grounding.convert.labelstudio import from_percent

    rnd = random.Random(1)
    for _ in range(20000):
        w, h, x, y = rnd.randint(1, 5000), rnd.randint(1, 5000), rnd.uniform(0, 100), rnd.uniform(0, 100)
        box = from_percent({"x": x, "y": y, "width": 100 - x, "height": 100 - y}, w, h)
        assert box[2:] == [w, h], (w, h, x, y, box)
