"""Label formats: every format round-trips pixel boxes within 0.5 px, and bad files get one
clear error listing every problem while nothing is written."""

from __future__ import annotations

import json

import pytest

from grounding.convert import FORMATS, read_labels, write_labels
from grounding.labels import LabelFormatError, item


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    """Items on real PNGs (sizes are read from them where a format does not store them):
    several boxes, no box, fractional coordinates, boxes touching the border."""
    from PIL import Image

    d = tmp_path_factory.mktemp("imgs")
    out = []
    for k, (w, h) in enumerate([(640, 480), (333, 517), (1024, 77)]):
        p = d / f"im{k}.png"
        Image.new("RGB", (w, h), (k * 40, 90, 200)).save(p)
        out.append(item(str(p), f"the object number {k}", [[10.25, 20.5, 100.75, 60.125]],
                        width=w, height=h, score=0.9 - k / 10, scores=[0.9 - k / 10]))
        out.append(item(str(p), f"both things in {k}", [[0, 0, 3.3, 4.4], [w - 50.5, h - 30.25, w, h]],
                        width=w, height=h, score=0.5, scores=[0.4, 0.6]))
        out.append(item(str(p), f"nothing here {k}", [], width=w, height=h, score=None))
    return out


def _by_key(items):
    return {(it["image"], it["text"]): it for it in items}


def _same(a, b):
    a, b = _by_key(a), _by_key(b)
    assert set(a) == set(b)
    for k, it in a.items():
        got = b[k]["boxes"]
        assert len(got) == len(it["boxes"]), k
        for p, q in zip(sorted(it["boxes"]), sorted(got), strict=True):
            assert max(abs(x - y) for x, y in zip(p, q, strict=True)) <= 0.5, (k, p, q)


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_round_trips(items, tmp_path, fmt):
    uri = str(tmp_path / f"labels.{fmt}")
    write_labels(items, uri, fmt)
    back = read_labels(uri, fmt)
    assert not back.rejects
    _same(items, back.items)
    if fmt != "swift":  # ms-swift has no place for our ids: they are derived again (same value)
        assert {it["item_id"] for it in back.items} == {it["item_id"] for it in items}


def test_chain_through_every_format(items, tmp_path):
    cur = items
    for fmt in [*FORMATS, "seed"]:
        uri = str(tmp_path / f"chain.{fmt}")
        write_labels(cur, uri, fmt)
        cur = read_labels(uri, fmt).items
    _same(items, cur)
    assert {it["item_id"] for it in cur} == {it["item_id"] for it in items}


def test_formats_on_disk_are_what_the_tools_expect(items, tmp_path):
    write_labels(items, str(tmp_path / "c.json"), "coco")
    coco = json.loads((tmp_path / "c.json").read_text())
    ann = coco["annotations"][0]
    assert ann["bbox"] == pytest.approx([10.25, 20.5, 90.5, 39.625])  # xywh
    assert coco["images"][0]["caption"] == "the object number 0"
    write_labels(items, str(tmp_path / "s.jsonl"), "swift")
    row = json.loads((tmp_path / "s.jsonl").read_text().splitlines()[0])
    assert row["objects"]["bbox_type"] == "real" and len(row["images"]) == 1
    assert sum(m["content"].count("<ref-object>") for m in row["messages"]) == 3
    assert len(row["objects"]["bbox"]) == 3  # 1 + 2 + 0 boxes
    write_labels(items, str(tmp_path / "t.json"), "labelstudio")
    tasks = json.loads((tmp_path / "t.json").read_text())
    scores = [t["predictions"][0].get("score") for t in tasks]
    assert scores[:3] == [None, None, None]  # no score (unparseable/empty) first, then ascending
    assert scores[3:] == sorted(scores[3:])
    r = tasks[-1]["predictions"][0]["result"][0]
    assert r["value"]["x"] == pytest.approx(10.25 / 640 * 100)
    assert (r["original_width"], r["original_height"]) == (640, 480)


def test_swift_files_written_by_people_read(tmp_path):
    """ms-swift's own documented shapes: placeholders in order; norm1 boxes; no placeholders."""
    from PIL import Image

    Image.new("RGB", (200, 100)).save(tmp_path / "cat.png")
    rows = [
        {"messages": [{"role": "user", "content": "<image>Find the <ref-object>"},
                      {"role": "assistant", "content": "<bbox>"},
                      {"role": "user", "content": "Find the <ref-object>"},
                      {"role": "assistant", "content": "<bbox>"}],
         "images": ["cat.png"], "objects": {"ref": ["sheep", "dog"],
                                            "bbox": [[1, 2, 30, 40], [50, 60, 70, 80]]}},
        {"images": ["cat.png"], "objects": {"ref": ["cat"], "bbox": [[0.1, 0.2, 0.5, 0.6]],
                                            "bbox_type": "norm1"}},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    got = {it["text"]: it for it in read_labels(str(tmp_path / "d.jsonl"), "swift").items}
    assert got["dog"]["boxes"] == [[50, 60, 70, 80]]
    assert got["cat"]["boxes"][0] == pytest.approx([20, 20, 100, 60])
    assert got["cat"]["image"] == str(tmp_path / "cat.png")


def test_plain_coco_detection_reads_categories_as_expressions(tmp_path):
    doc = {"images": [{"id": 7, "file_name": "a.jpg", "width": 100, "height": 50}],
           "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [1, 2, 10, 20]},
                           {"id": 2, "image_id": 7, "category_id": 3, "bbox": [50, 5, 10, 10]}],
           "categories": [{"id": 3, "name": "traffic cone"}]}
    (tmp_path / "c.json").write_text(json.dumps(doc))
    (it,) = read_labels(str(tmp_path / "c.json"), "coco").items
    assert it["text"] == "traffic cone" and it["boxes"] == [[1, 2, 11, 22], [50, 5, 60, 15]]


def test_coco_dangling_image_id(tmp_path):
    doc = {"images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 50,
                       "caption": "the cone"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 20]},
                           {"id": 2, "image_id": 99, "category_id": 1, "bbox": [1, 2, 10, 20]},
                           {"id": 3, "image_id": 1, "category_id": 1, "bbox": [90, 2, 30, 20]}],
           "categories": [{"id": 1, "name": "target"}]}
    (tmp_path / "c.json").write_text(json.dumps(doc))
    with pytest.raises(LabelFormatError) as e:
        read_labels(str(tmp_path / "c.json"), "coco")
    msg = str(e.value)
    assert "annotation id 2: image_id 99 is not in 'images' (dangling reference)" in msg
    assert "annotation id 3: box [90.0, 2.0, 120.0, 22.0] reaches outside the 100x50" in msg
    res = read_labels(str(tmp_path / "c.json"), "coco", skip_invalid=True)
    # image 1 lost one of its two boxes: importing the other alone would be another label
    assert res.items == []
    assert [r["where"] for r in res.rejects] == ["annotation id 2", "annotation id 3",
                                                 "image id 1"]


def test_coco_image_whose_only_box_was_refused_is_not_no_such_object(tmp_path):
    doc = {"images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 50,
                       "caption": "the cone"},
                      {"id": 2, "file_name": "b.jpg", "width": 100, "height": 50,
                       "caption": "the absent thing"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [90, 2, 30, 20]}],
           "categories": [{"id": 1, "name": "target"}]}
    (tmp_path / "c.json").write_text(json.dumps(doc))
    res = read_labels(str(tmp_path / "c.json"), "coco", skip_invalid=True)
    assert [(it["text"], it["boxes"]) for it in res.items] == [("the absent thing", [])]
    assert "1 of its boxes were refused" in res.rejects[-1]["problems"][0]


@pytest.mark.parametrize("fmt,content", [
    ("seed", '{"image": "a.png", "text": "x", "bbox": [10, 2, 130, 40], "width": 100, '
             '"height": 50}\n'),
    ("seed", '{"image": "a.png", "text": "x", "bbox": [-3, 2, 30, 40], "width": 100, '
             '"height": 50}\n'),
    ("swift", '{"images": ["a.png"], "messages": [{"role": "user", "content": "<ref-object>"}, '
              '{"role": "assistant", "content": "<bbox>"}], '
              '"objects": {"ref": ["x"], "bbox": [[0.1, 0.1, 1.4, 0.5]], "bbox_type": "norm1"}}\n'),
])
def test_readers_refuse_boxes_outside_a_known_image_size(tmp_path, fmt, content):
    from PIL import Image

    Image.new("RGB", (100, 50)).save(tmp_path / "a.png")
    p = tmp_path / "f"
    p.write_text(content)
    with pytest.raises(LabelFormatError, match="reaches outside the 100x50 image"):
        read_labels(str(p), fmt)


def test_parquet_reader_refuses_boxes_outside_the_image(tmp_path):
    write_labels([item("a.png", "x", [[10, 2, 30, 40]], width=100, height=50)],
                 str(tmp_path / "l.parquet"), "parquet")
    import pyarrow.parquet as pq

    t = pq.read_table(tmp_path / "l.parquet").to_pylist()
    t[0]["boxes"] = [[10.0, 2.0, 300.0, 40.0]]
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(t, pq.read_schema(tmp_path / "l.parquet")),
                   tmp_path / "l.parquet")
    with pytest.raises(LabelFormatError, match=r"300.0, 40.0\] reaches outside the 100x50"):
        read_labels(str(tmp_path / "l.parquet"), "parquet")


@pytest.mark.parametrize("fmt,content,expect", [
    ("seed", '{"image": "a.png", "text": "x", "bbox": [1, 2, 3]}\n', "4 numbers"),
    ("seed", '{"image": "a.png", "text": "", "bbox": [1, 2, 3, 4]}\n', "text is missing or empty"),
    ("seed", '{"text": "x", "bbox": [1, 2, 3, 4]}\n', "image is missing"),
    ("seed", 'not json\n', "not JSON"),
    ("seed", '{"image": "a.png", "text": "x", "bbox": [9, 2, 3, 4]}\n', "x1 <= x2"),
    ("seed", '{"image": "a.png", "text": "x", "bbox": [1, 2, 3, 4], "bbox_type": "norm1"}\n',
     "needs width and height"),
    ("swift", '{"images": ["a.png"], "messages": [{"role": "user", "content": "<ref-object>"}, '
              '{"role": "assistant", "content": "<bbox><bbox>"}], '
              '"objects": {"ref": ["x"], "bbox": [[1, 2, 3, 4]]}}\n', "more <bbox> placeholders"),
    ("swift", '{"images": ["a.png", "b.png"], "objects": {"ref": ["x"], "bbox": [[1, 2, 3, 4]]}}\n',
     "exactly 1 image"),
    ("coco", '{"annotations": []}', "no 'images' list"),
    ("labelstudio", '{"tasks": 3}', "no 'data'"),
])
def test_bad_files_are_refused_with_every_problem(tmp_path, fmt, content, expect):
    p = tmp_path / "bad"
    p.write_text(content)
    with pytest.raises(LabelFormatError, match="problem") as e:
        read_labels(str(p), fmt)
    assert expect in str(e.value)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_labels(str(tmp_path / "nope.json"), "coco")
    with pytest.raises(ValueError, match="unknown format 'yolo'"):
        read_labels(str(tmp_path), "yolo")


def test_filled_sizes_are_the_displayed_ones(tmp_path):
    """An imported label without width/height gets the size a viewer shows: a JPEG stored
    160x120 with EXIF Orientation 6 (turned 90 degrees) is 120x160 (its boxes, drawn on what
    Label Studio displays, are in that frame)."""
    from PIL import Image

    from grounding.convert import fill_sizes

    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (160, 120), (200, 10, 10)).save(tmp_path / "turned.jpg", "JPEG",
                                                     exif=exif)
    Image.new("RGB", (160, 120)).save(tmp_path / "plain.png")
    items = [{"item_id": "a", "image": str(tmp_path / "turned.jpg")},
             {"item_id": "b", "image": str(tmp_path / "plain.png")},
             {"item_id": "c", "image": str(tmp_path / "turned.jpg"), "width": 7, "height": 9}]
    assert fill_sizes(items) == []
    assert [(it["width"], it["height"]) for it in items] == [(120, 160), (160, 120), (7, 9)]
