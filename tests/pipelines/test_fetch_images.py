"""The label job's fetch stage reads images through the same code as the endpoint: URIs parsed
once (a bad one is a coded error row), EXIF orientation applied, decoded no larger than the
model needs, sizes and gold boxes in the displayed ORIGINAL image's pixels."""

from __future__ import annotations

import io

import pyarrow as pa
from PIL import Image

from grounding.resize import ResizeSpec
from grounding.storage import StorageOptions
from pipelines import schema
from pipelines.stages.fetch_images import FetchImages

SPEC = ResizeSpec(min_pixels=32 * 32, max_pixels=128 * 128, factor=32)


def _rows(images: list[str], gold=None, gold_type="real") -> pa.Table:
    rows = [{"row_id": f"s.jsonl:{i}", "shard": "s.jsonl", "image": im, "text": "x",
             "gold": gold, "gold_type": gold_type, "piece": 0, "piece_n": len(images)}
            for i, im in enumerate(images)]
    return schema.table(rows, schema.READ)


def _run(table):
    return FetchImages(StorageOptions(), SPEC, 10_000_000, 64_000_000)(table).to_pylist()


def test_a_turned_jpeg_is_fetched_in_its_displayed_frame_and_reduced(tmp_path):
    """Orientation 6: stored 1600x800, shown (and labeled) 800x1600. The model input and the
    reported size come from the displayed size; a norm1 gold box is scaled by it."""
    stored = Image.new("RGB", (1600, 800), (200, 20, 20))
    stored.paste((20, 20, 200), (0, 0, 800, 800))  # left half blue: the TOP once turned
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "turned.jpg", quality=95, exif=exif)
    (row,) = _run(_rows([str(tmp_path / "turned.jpg")], gold=[0, 0, 0.5, 0.25],
                        gold_type="norm1"))
    assert row["error_code"] is None, row["error"]
    assert (row["width"], row["height"]) == (800, 1600)
    rw, rh = SPEC.resized_size((800, 1600))
    assert (row["in_width"], row["in_height"]) == (rw, rh) and rh > rw
    assert row["gold"] == [0, 0, 400, 400]
    img = Image.frombytes("RGB", (rw, rh), row["pixels"])
    top, bottom = img.getpixel((rw // 2, rh // 8)), img.getpixel((rw // 2, rh * 7 // 8))
    assert top[2] > 150 > top[0] and bottom[0] > 150 > bottom[2], (top, bottom)


def test_a_bad_uri_in_a_row_is_a_coded_error_row(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "ok.png")
    (tmp_path / "out").symlink_to(tmp_path)
    refs = [f"file://{tmp_path}/ok.png::nope",            # fsspec chaining
            f" {tmp_path}/ok.png",                        # a leading space
            f"file://{tmp_path}/ok.png?x",                # a query on a file URI
            f"file://{tmp_path}/a%2Fok.png",              # an encoded '/'
            f"{tmp_path}/ok.png",                          # fine
            f"{tmp_path}/out/ok.png"]                      # a link: the job follows it
    rows = _run(_rows(refs))
    assert [r["error_code"] for r in rows] == ["bad_image_ref"] * 4 + [None, None]
    assert all((r["width"], r["height"]) == (40, 30) for r in rows[4:])


def test_svg_base64_in_a_row_is_an_unsupported_format():
    import base64

    svg = base64.b64encode(b'<svg xmlns="http://www.w3.org/2000/svg"/>').decode()
    buf = io.BytesIO()
    Image.new("P", (1, 1)).save(buf, format="GIF")
    gif = base64.b64encode(buf.getvalue()).decode()
    rows = _run(_rows([svg, gif]))
    assert [r["error_code"] for r in rows] == ["unsupported_format", None]
    assert all(r["image"].startswith("inline:") for r in rows)  # no bytes carried on
