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
