"""Image input: every kind of bad image is a coded ImageError; odd-but-valid modes work."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image
from support import bomb_png

from grounding.images import ImageError, decode, load_image, read_bytes


def _png(mode: str, size=(20, 10), color=None) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("data, code", [
    (b"", "empty_image"),                          # zero bytes
    (b"\x89PNG\r\n\x1a\nnot really", "corrupt"),   # PNG magic, garbage after
    (b"hello world" * 10, "corrupt"),              # not an image at all
    (bomb_png(), "too_large"),                     # header claims 3.6 G pixels
    (bomb_png(0, 10), "zero_size"),                # header claims a zero width
    (bomb_png(10, 0), "zero_size"),                # header claims a zero height
    (_png("RGB")[:40], "corrupt"),                 # truncated file
])
def test_bad_bytes_have_codes(data, code):
    with pytest.raises(ImageError) as e:
        decode(data)
    assert e.value.code == code


@pytest.mark.parametrize("mode, color", [
    ("RGBA", (255, 0, 0, 0)),    # fully transparent red -> white
    ("LA", (0, 0)),               # transparent grey -> white
    ("CMYK", (0, 0, 0, 0)),       # CMYK white
    ("I;16", 65535),              # 16-bit grey
    ("L", 255),
    ("P", 0),
])
def test_odd_modes_become_rgb(mode, color):
    if mode == "CMYK":
        buf = io.BytesIO()
        Image.new(mode, (8, 4), color).save(buf, format="JPEG")
        data = buf.getvalue()
    elif mode == "I;16":
        buf = io.BytesIO()
        Image.new(mode, (8, 4), color).save(buf, format="PNG")
        data = buf.getvalue()
    else:
        data = _png(mode, (8, 4), color)
    img = decode(data)
    assert img.mode == "RGB" and img.size == (8, 4)
    if mode in ("RGBA", "LA"):
        assert img.getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_range_is_kept():
    img16 = Image.new("I;16", (2, 1))
    img16.putpixel((0, 0), 1000)
    img16.putpixel((1, 0), 60000)
    buf = io.BytesIO()
    img16.save(buf, format="PNG")
    px = decode(buf.getvalue())
    assert px.getpixel((0, 0))[0] == 0 and px.getpixel((1, 0))[0] == 255


def test_sources(tmp_path):
    data = _png("RGB", (5, 6), (1, 2, 3))
    p = tmp_path / "a.png"
    p.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    for ref in (str(p), f"file://{p}", data, b64, "data:image/png;base64," + b64):
        assert load_image(ref).size == (5, 6)
    with pytest.raises(ImageError) as e:
        read_bytes(str(tmp_path / "missing.png"))
    assert e.value.code == "missing"
    with pytest.raises(ImageError) as e:
        read_bytes("not base64 and not a path!!")
    assert e.value.code == "bad_image_ref"
    with pytest.raises(ImageError) as e:
        read_bytes(str(p), max_bytes=10)
    assert e.value.code == "too_large"


def test_base64_jpeg_is_not_taken_for_an_absolute_path(tmp_path):
    """JPEG's base64 starts with "/9j/": it must still read as inline bytes, not a path."""
    import base64

    from PIL import Image

    from grounding.formats import rows_from_json
    from grounding.images import decode, is_base64_image, read_bytes

    Image.new("RGB", (30, 20), (200, 10, 10)).save(tmp_path / "a.jpg")
    b64 = base64.b64encode((tmp_path / "a.jpg").read_bytes()).decode()
    assert b64.startswith("/9j/") and is_base64_image(b64)
    assert decode(read_bytes(b64)).size == (30, 20)
    (row,) = rows_from_json({"image": b64, "text": "x"}, "s.jsonl", 0, str(tmp_path))
    assert row["image"] == b64 and row["error_code"] is None
    for path in ("/data/images/a.jpg", "/9j/not-an-image.png", "images/b.png"):
        assert not is_base64_image(path)


def test_a_web_server_that_is_down_is_a_transient_failure_and_a_404_is_missing(tmp_path):
    """fsspec reports every failed HTTP request as FileNotFoundError: a refused connection
    (server down) was coded ``missing``, permanent, so a rerun never retried the row."""
    from support import free_port, web_server

    from grounding.images import ImageError, read_bytes

    port = free_port()
    with pytest.raises(ImageError) as down:
        read_bytes(f"http://127.0.0.1:{port}/a.png")
    assert down.value.code == "fetch_failed" and "Cannot connect" in str(down.value)
    with web_server(port, tmp_path):
        with pytest.raises(ImageError) as gone:
            read_bytes(f"http://127.0.0.1:{port}/a.png")
        assert gone.value.code == "missing"


# ---- issue 27: decode for the model, in the displayed frame ------------------------------------
# The displayed picture: four coloured quadrants of a 120x60 (width x height) image. EXIF
# Orientation n stores it turned so that a viewer applying the tag shows it upright again.
_QUADS = {(0, 0): (230, 20, 20), (1, 0): (20, 200, 20), (0, 1): (20, 20, 230), (1, 1): (240, 240, 20)}


def _displayed(w=120, h=60):
    img = Image.new("RGB", (w, h))
    for (qx, qy), c in _QUADS.items():
        img.paste(c, (qx * w // 2, qy * h // 2, (qx + 1) * w // 2, (qy + 1) * h // 2))
    return img


# How each EXIF orientation stores the displayed picture (the inverse of what a viewer does,
# from the EXIF 2.32 definition of tag 0x0112: 6 = "0th row is the visual right-hand side").
_STORE = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
          4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
          6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_270}


def _oriented_jpeg(orientation: int, w=120, h=60) -> bytes:
    shown = _displayed(w, h)
    stored = shown if _STORE[orientation] is None else shown.transpose(_STORE[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif)
    return buf.getvalue()


def _assert_quadrants(img, w, h):
    for (qx, qy), c in _QUADS.items():
        got = img.getpixel((int((qx + 0.5) * w / 2), int((qy + 0.5) * h / 2)))
        assert all(abs(a - b) < 40 for a, b in zip(got, c, strict=True)), ((qx, qy), got, c)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation):
    """defect 10: a JPEG with Orientation 6 was read as stored (120x60 became 60x120 on the
    wire); sizes and pixels are now those a browser shows."""
    from PIL import ImageOps

    from grounding.images import displayed_size

    data = _oriented_jpeg(orientation)
    img = decode(data)
    assert img.size == displayed_size(data) == (120, 60)
    _assert_quadrants(img, 120, 60)
    # the tag does not travel on: code that applies it again (transformers' load_image) must
    # not turn the picture a second time
    assert "exif" not in img.info and img.getexif().get(0x0112, 1) == 1
    assert ImageOps.exif_transpose(img).size == (120, 60)


@pytest.mark.parametrize("orientation", [1, 6, 8])
def test_a_reduced_decode_keeps_the_displayed_original_size(orientation):
    """The model needs at most ``target_pixels``: a big image may be decoded smaller (JPEG
    draft), but the reported size stays the displayed original's, which boxes are mapped to."""
    from grounding.images import decode_for_model

    data = _oriented_jpeg(orientation, 1600, 800)
    out = decode_for_model(data, target_pixels=64 * 64)
    assert out.size == (1600, 800)
    w, h = out.image.size
    assert w * h < 1600 * 800 / 4 and w * h >= 64 * 64 and w > h
    _assert_quadrants(out.image, w, h)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP"])
def test_the_allowed_formats_decode_reduced_to_cover_the_model_input(fmt):
    from grounding.images import decode_for_model
    from grounding.resize import ResizeSpec

    spec = ResizeSpec(min_pixels=32 * 32, max_pixels=128 * 128, factor=32)
    buf = io.BytesIO()
    _displayed(1000, 700).save(buf, format=fmt)
    out = decode_for_model(buf.getvalue(), target_pixels=spec.max_pixels)
    assert out.size == (1000, 700) and out.image.mode == "RGB"
    rw, rh = spec.resized_size(out.size)      # what the model gets: from the ORIGINAL size
    assert out.image.width >= rw and out.image.height >= rh
    assert out.image.width < 1000             # and decoding did not keep every pixel
    _assert_quadrants(out.image, *out.image.size)


def _eps() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="EPS")
    return buf.getvalue()


def _saved(fmt: str, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (16, 16)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("make", [
    _eps,                                                    # EPS: Ghostscript would run
    lambda: _saved("ICO"),
    lambda: _saved("PDF"),
    lambda: _saved("JPEG2000"),
    lambda: _saved("PPM"),
    lambda: b"SIMPLE  =                    T" + b" " * 50 + b"BITPIX  =                    8"
            + b" " * 50 + b"NAXIS   =                    0" + b" " * 50 + b"END" + b" " * 2700,  # FITS
    lambda: b"8BPS\x00\x01" + b"\x00" * 40,                   # PSD
    lambda: b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>',  # SVG
])
def test_formats_outside_the_allow_list_are_refused_before_decoding(make):
    """defect 6: every Pillow format was enabled (EPS runs Ghostscript, PSD, FITS, JPEG 2000)."""
    with pytest.raises(ImageError) as e:
        decode(make())
    assert e.value.code == "unsupported_format"


def _png16(w, h) -> bytes:
    import numpy as np

    a = (np.arange(w * h, dtype=np.uint32) % 65536).astype(np.uint16).reshape(h, w)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=9)  # uint16: mode I;16
    return buf.getvalue()


def test_16_bit_images_convert_without_float64():
    """defect 6: a 39 KB 16-bit 4000x4000 PNG took ~400 MB through a float64 array."""
    import tracemalloc

    from grounding.images import decode_for_model

    data = _png16(4000, 4000)
    tracemalloc.start()
    try:
        img = decode(data)
        _, full_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        out = decode_for_model(data, target_pixels=256 * 256)
        _, small_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert img.size == out.size == (4000, 4000) and img.mode == out.image.mode == "RGB"
    assert full_peak < 40e6, full_peak      # an 8-bit result and bands, no float64 (128 MB)
    assert small_peak < 8e6, small_peak     # converted after the reduction


def _gif(screen: tuple[int, int], frame: tuple[int, int]) -> bytes:
    """A GIF of one 2-colour frame of ``frame`` pixels on a logical screen of ``screen``."""
    import struct

    head = b"GIF89a" + struct.pack("<HH", *screen) + bytes([0x80, 0, 0]) + b"\0\0\0\xff\xff\xff"
    return (head + b"\x2c" + struct.pack("<HHHH", 0, 0, *frame) + b"\0"
            + b"\x02\x02\x44\x01\x00" + b"\x3b")


def test_a_gif_logical_screen_counts_and_is_decoded_reduced():
    """defect 6: a 40-byte GIF declaring a 3999x3999 screen decoded to 48 MB of RGB."""
    import resource

    from grounding.images import decode_for_model

    data = _gif((3999, 3999), (1, 1))
    assert len(data) < 50
    with pytest.raises(ImageError) as e:
        decode(data, max_pixels=1_000_000)
    assert e.value.code == "too_large"
    with pytest.raises(ImageError) as e:             # a frame reaching past a small screen
        decode(_gif((2, 2), (3999, 3999)), max_pixels=1_000_000)
    assert e.value.code in ("too_large", "corrupt")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = decode_for_model(data, target_pixels=256 * 256)
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert out.size == (3999, 3999) and out.image.width * out.image.height < 1_000_000
    assert grew_mb < 30, grew_mb


def test_base64_is_recognised_by_content_not_length():
    """defect 11: a valid 1x1 GIF under 64 characters was not base64 image data."""
    from grounding.images import is_base64_image

    gif = base64.b64encode(_tiny_gif()).decode()
    assert len(gif) < 64 and is_base64_image(gif)
    assert decode(read_bytes(gif)).size == (1, 1)
    svg = base64.b64encode(b'<svg xmlns="http://www.w3.org/2000/svg"/>').decode()
    assert not is_base64_image(svg)
    with pytest.raises(ImageError) as e:
        decode(read_bytes(svg))
    assert e.value.code == "unsupported_format"
    for path in ("/data/images/a.jpg", "/9j/not-an-image.png", "images/b.png", "abcd"):
        assert not is_base64_image(path)


def _tiny_gif() -> bytes:
    buf = io.BytesIO()
    Image.new("P", (1, 1)).save(buf, format="GIF")
    return buf.getvalue()


def test_rows_labeled_in_the_stored_frame_can_be_found(tmp_path):
    """The README's selection of rows labeled before the fix: `exif_orientation` reads the
    tag from the image a row names, and the snippet runs against a real output table."""
    import json
    import re
    import textwrap
    from pathlib import Path

    from support import job_table

    from grounding.images import exif_orientation

    for o in (1, 6):
        (tmp_path / f"o{o}.jpg").write_bytes(_oriented_jpeg(o))
    (tmp_path / "plain.png").write_bytes(_png("RGB"))
    assert [exif_orientation(str(tmp_path / n)) for n in ("o1.jpg", "o6.jpg", "plain.png")] == [
        1, 6, 1]
    rows = [{"row_id": f"s.jsonl:{i}", "source_id": f"id{i}", "image": str(tmp_path / n),
             "text": "the red part", "status": "ok", "width": 60, "height": 120}
            for i, n in enumerate(("o1.jpg", "o6.jpg", "plain.png"))]
    rows.append({"row_id": "s.jsonl:3", "image": "inline:sha256:ab", "text": "x", "status": "ok",
                 "width": 1, "height": 1})
    job_table(tmp_path / "out", rows)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    snippet = textwrap.dedent(re.search(r"<!-- relabel -->\n *```python\n(.*?) *```", readme,
                                        re.S).group(1))
    snippet = snippet.replace('"runs/label-1"', repr(str(tmp_path / "out")))
    snippet = snippet.replace('"relabel.jsonl"', repr(str(tmp_path / "relabel.jsonl")))
    exec(compile(snippet, "README.md", "exec"), {})
    got = [json.loads(x) for x in (tmp_path / "relabel.jsonl").read_text().splitlines()]
    assert got == [{"id": "id1", "image": str(tmp_path / "o6.jpg"), "text": "the red part"}]
