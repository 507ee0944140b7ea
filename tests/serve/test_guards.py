"""The image-URI allow-list compares parsed URLs: every bypass of a raw ``startswith`` is a
row here."""

from __future__ import annotations

import pytest

from serve.guards import UriAllowList

PREFIXES = ["s3://bucket/images", "https://cdn.example.com/pub/", "/data/images/"]


@pytest.mark.parametrize("uri", [
    "s3://bucket/images/a.png",
    "s3://bucket/images/sub/dir/b.jpg",
    "S3://bucket/images/a.png",                          # scheme case does not matter
    "https://cdn.example.com/pub/x.png",
    "https://CDN.example.com/pub/x.png",                 # nor host case
    "https://cdn.example.com:443/pub/x.png",             # the default port, spelt out
    "https://cdn.example.com/pub/x.png?sig=abc",         # a query (signed URLs) is fine
    "/data/images/x.png",
    "file:///data/images/x.png",
    "/data/images//x.png",                               # '//' collapses to '/'
])
def test_allowed(uri):
    assert UriAllowList(PREFIXES).why_not(uri) is None


@pytest.mark.parametrize("uri, why", [
    ("s3://bucket/images-private/a.png", "not under"),   # prefix without a trailing '/'
    ("s3://bucket/imagesX", "not under"),
    ("s3://bucket/images", "not under"),                 # the folder itself is no image
    ("s3://other/images/a.png", "not under"),            # another bucket
    ("https://cdn.example.com@evil.example/pub/x.png", "user information"),  # userinfo
    ("https://cdn.example.com:pw@evil.example/pub/x.png", "user information"),
    ("https://cdn.example.com.evil.example/pub/x.png", "not under"),  # host suffix trick
    ("https://cdn.example.com:8443/pub/x.png", "not under"),          # another port
    ("http://cdn.example.com/pub/x.png", "not under"),                # another scheme
    ("https://cdn.example.com/pub/../secret.png", "'..'"),            # traversal
    ("https://cdn.example.com/pub/%2e%2e/secret.png", "'..'"),        # encoded traversal
    ("https://cdn.example.com/pub/%2E%2E/secret.png", "'..'"),
    ("/data/images/../../etc/passwd", "'..'"),
    ("/data/images/./x.png", "'..'"),
    ("/data/images\\..\\x.png", "backslash"),
    ("/data/images/x.png\x00.jpg", "control character"),
    ("data/images/x.png", "absolute path"),              # relative: resolved against what?
    ("https://cdn.example.com:99999/pub/x.png", "bad port"),
    ("gs://bucket/images/a.png", "not under"),
])
def test_refused_with_a_reason(uri, why):
    reason = UriAllowList(PREFIXES).why_not(uri)
    assert reason is not None and why in reason, reason


def test_an_empty_list_allows_no_uri():
    assert "base64" in UriAllowList([]).why_not("s3://bucket/images/a.png")


@pytest.mark.parametrize("prefix", [
    "https://user@cdn.example.com/pub/",                 # a prefix with user information
    "https://cdn.example.com/pub/../",                   # a prefix that escapes itself
    "relative/folder/",
])
def test_a_bad_prefix_is_a_configuration_error(prefix):
    with pytest.raises(ValueError):
        UriAllowList([prefix])


@pytest.fixture(scope="module")
def http_server(tmp_path_factory):
    """A real HTTP server on loopback (its own process): /img.png is an image, /hop redirects
    to it, /gone is 404."""
    import subprocess
    import sys
    import time

    from support import free_port, port_open

    root = tmp_path_factory.mktemp("www")
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 10, 10)).save(root / "img.png")
    port = free_port()
    code = f"""
import http.server, functools
class H(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/hop":
            self.send_response(302); self.send_header("Location", "/img.png"); self.end_headers()
            return
        super().do_GET()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", {port}),
    functools.partial(H, directory={str(root)!r})).serve_forever()
"""
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 20
    while not port_open(port):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    proc.kill()
    proc.wait()


def test_the_endpoint_fetch_follows_no_redirect(http_server):
    from grounding.images import ImageError, read_bytes

    assert read_bytes(f"{http_server}/img.png", follow_redirects=False)[:4] == b"\x89PNG"
    with pytest.raises(ImageError, match="redirects") as e:
        read_bytes(f"{http_server}/hop", follow_redirects=False)
    assert e.value.code == "fetch_failed"
    with pytest.raises(ImageError) as e:
        read_bytes(f"{http_server}/gone.png", follow_redirects=False)
    assert e.value.code == "missing"
    with pytest.raises(ImageError) as e:
        read_bytes(f"{http_server}/img.png", follow_redirects=False, max_bytes=10)
    assert e.value.code == "too_large"


# ---- the body: JSON nesting is bounded explicitly ----------------------------------------------
@pytest.mark.parametrize("body, code", [
    (b"[" * 100_000 + b"]" * 100_000, "json_too_deep"),   # past the C parser's recursion limit
    (b'{"a":' * 5000 + b"1" + b"}" * 5000, "json_too_deep"),  # objects, same
    (b"[" * 9 + b"]" * 9, "json_too_deep"),                # just over MAX_JSON_DEPTH
    (b'{"image": [[[[[[[[[["x"]]]]]]]]]]}', "json_too_deep"),  # deep inside a valid-looking body
    (b"[" * 100_000, "json_too_deep"),                      # deep AND unterminated: a clean 400
    (b"\xff\xfe{", "bad_json"),                             # not UTF-8
    (b"", "bad_json"),                                      # empty body
])
def test_bad_json_is_a_400(body, code):
    from serve.guards import ApiError, parse_json

    with pytest.raises(ApiError) as e:
        parse_json(body)
    assert (e.value.status, e.value.code) == (400, code)


@pytest.mark.parametrize("body", [
    b'{"image": "x", "text": "y"}',                         # the normal body: depth 1
    b"[" * 8 + b"]" * 8,                                    # exactly MAX_JSON_DEPTH
    b'"a string"',                                          # a scalar (the schema refuses it)
])
def test_shallow_json_parses(body):
    from serve.guards import parse_json

    parse_json(body)


# ---- the image: the label job's aspect-ratio rule ----------------------------------------------
@pytest.mark.parametrize("size, ok", [
    ((64, 64), True),            # square
    ((1, 1), True),              # one pixel: upscaled to min_pixels
    ((200, 1), True),            # exactly MAX_RATIO
    ((201, 1), False),           # just over, wide
    ((1, 201), False),           # just over, tall
    ((20_000, 10), False),       # 2000:1 strip
])
def test_aspect_ratio(tiny_model, size, ok):
    from grounding.checkpoint import resize_spec
    from serve.guards import ApiError, check_image_shape

    spec = resize_spec(tiny_model)
    if ok:
        w, h = check_image_shape(spec, size)
        assert w % spec.factor == 0 and h % spec.factor == 0
    else:
        with pytest.raises(ApiError) as e:
            check_image_shape(spec, size)
        assert (e.value.status, e.value.code) == (422, "bad_aspect_ratio")


# ---- tokens: prompt + image + answer within max_model_len --------------------------------------
@pytest.fixture(scope="module")
def budget(tiny_model):
    from grounding.checkpoint import resize_spec
    from serve.guards import TokenBudget

    return TokenBudget(str(tiny_model), resize_spec(tiny_model), max_model_len=1024,
                       max_new_tokens=64)


@pytest.mark.parametrize("model_size, tokens", [
    ((64, 64), 4),               # 2x2 patches of 32 px (patch 16, merge 2)
    ((256, 256), 64),            # the tiny model's max_pixels (65536): 8x8
    ((32, 2048), 64),            # a strip of the same area
])
def test_image_tokens(budget, model_size, tokens):
    assert budget.image_tokens(model_size) == tokens


def test_token_count_adds_text_image_and_answer(budget):
    prompt = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>find x<|im_end|>\n"
    text = len(budget.tokenizer.encode(prompt, add_special_tokens=False))
    assert budget.count(prompt, (256, 256)) == text - 1 + 64 + 64


@pytest.mark.parametrize("text, ok", [
    ("the red circle", True),                        # a normal expression
    ("a " * 400, True),                              # 800 chars of one-token words: fits
    ("\U0001d518\u00e9\u4e2d" * 300, False),          # 900 chars, ~3 tokens each: over 1024
])
def test_prompt_over_max_model_len_is_a_413(budget, text, ok):
    from serve.guards import ApiError

    prompt = f"<|vision_start|><|image_pad|><|vision_end|>{text}"
    if ok:
        assert budget.check(prompt, (256, 256)) <= 1024
    else:
        with pytest.raises(ApiError) as e:
            budget.check(prompt, (256, 256))
        assert (e.value.status, e.value.code) == (413, "prompt_too_long")


# ---- the image URI: one parsed object is checked and fetched (issue 27) ------------------------
@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """A served folder (``/img/ok.png`` allowed, ``/secret.png`` not) on a real web server, an
    allowed local folder holding ``ok.png`` beside a secret folder, and the allow-list."""
    from PIL import Image
    from support import free_port, web_server

    from serve.config import ServeConfig

    root = tmp_path_factory.mktemp("places")
    www = root / "www"
    (www / "img").mkdir(parents=True)
    Image.new("RGB", (8, 8), (10, 200, 10)).save(www / "img" / "ok.png")
    Image.new("RGB", (9, 9), (200, 10, 10)).save(www / "secret.png")
    allowed, secret = root / "allowed", root / "secret"
    allowed.mkdir()
    secret.mkdir()
    Image.new("RGB", (8, 8), (10, 200, 10)).save(allowed / "ok.png")
    Image.new("RGB", (9, 9), (200, 10, 10)).save(secret / "pic.png")
    port = free_port()
    web = f"http://127.0.0.1:{port}"
    cfg = ServeConfig(allowed_uri_prefixes=[f"{web}/img/", f"{allowed}/"])
    with web_server(port, www):
        yield {"web": web, "allowed": allowed, "secret": secret, "cfg": cfg,
               "uris": UriAllowList(cfg.allowed_uri_prefixes)}


def _load(places, ref):
    from serve.guards import load_image

    return load_image(places["cfg"], places["uris"], ref)


def _refused(places, ref, status=403, code="uri_not_allowed"):
    from serve.guards import ApiError

    with pytest.raises(ApiError) as e:
        _load(places, ref)
    assert (e.value.status, e.value.code) == (status, code), e.value.message
    return e.value.message


def test_the_allowed_places_answer(places):
    assert _load(places, f"{places['web']}/img/ok.png").size == (8, 8)
    assert _load(places, str(places["allowed"] / "ok.png")).size == (8, 8)
    assert _load(places, f"file://{places['allowed']}/ok.png").size == (8, 8)


@pytest.mark.parametrize("ref, why", [
    # defect 1: urlsplit strips these, fsspec did not (HTTP 500 "Protocol not known")
    (" {web}/img/ok.png", "whitespace"),
    ("\v{file}/ok.png", "whitespace"),
    ("\x01{web}/img/ok.png", "control character"),
    ("{web}/img/ok.png ", "whitespace"),
    # defect 2: fsspec's '::' chaining read another path than the one checked
    ("{file}/ok.png::nope", "'::'"),
    ("{file}/ok.png::{web}/secret.png", "'::'"),
    ("{web}/img/ok.png::{web}/secret.png", "'::'"),
    # defect 8: '%2F' was decoded for the check and sent as it was
    ("{web}/img%2fok.png", "encoded '/'"),
    ("{web}/img%2F..%2Fsecret.png", "encoded '/'"),
    ("{web}/img/ok.png#frag", "fragment"),
    ("{file}/ok.png?x=1", "query"),
])
def test_a_uri_is_checked_and_fetched_as_one_parsed_object(places, ref, why):
    ref = ref.format(web=places["web"], file=f"file://{places['allowed']}")
    assert why in _refused(places, ref)


def test_a_symlink_out_of_the_allowed_folder_is_refused(places):
    """defect 7: ``allowed/out -> ../secret`` was followed (HTTP 200 for a secret picture)."""
    out = places["allowed"] / "out"
    if not out.exists():
        out.symlink_to(places["secret"])
    assert "not under" in _refused(places, str(out / "pic.png"))
    assert "not under" in _refused(places, f"file://{out}/pic.png")
    inside = places["allowed"] / "same.png"  # a link that stays inside is fine
    if not inside.exists():
        inside.symlink_to(places["allowed"] / "ok.png")
    assert _load(places, str(inside)).size == (8, 8)


def test_a_fifo_or_folder_in_the_allowed_folder_is_a_4xx_without_blocking(places):
    """defect 7: a FIFO in the allowed folder held a worker thread for ever."""
    import os
    import threading

    fifo = places["allowed"] / "pipe.png"
    if not fifo.exists():
        os.mkfifo(fifo)
    (places["allowed"] / "dir.png").mkdir(exist_ok=True)
    got = {}

    def run():
        for name in ("pipe.png", "dir.png"):
            try:
                _load(places, str(places["allowed"] / name))
                got[name] = "loaded"
            except Exception as e:  # noqa: BLE001 - reported below
                got[name] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # unblock the reader so the test run goes on
        with open(fifo, "wb"):
            pass
        pytest.fail("reading a FIFO in the allowed folder blocked")
    from serve.guards import ApiError

    for name, e in got.items():
        assert isinstance(e, ApiError) and 400 <= e.status < 500, (name, e)
        assert "regular file" in e.message


def test_short_base64_is_an_image_by_its_content(places):
    """defect 11: a 1x1 GIF under 64 base64 characters got 403 ``uri_not_allowed``; an SVG or
    EPS must be an unsupported format (415), not a refused path."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("P", (1, 1)).save(buf, format="GIF")
    gif = base64.b64encode(buf.getvalue()).decode()
    assert len(gif) < 64
    assert _load(places, gif).size == (1, 1)
    svg = base64.b64encode(b'<svg xmlns="http://www.w3.org/2000/svg"/>').decode()
    eps = base64.b64encode(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\n").decode()
    for b64 in (svg, eps):
        _refused(places, b64, 415, "unsupported_format")


def test_the_endpoint_image_is_the_model_input_and_boxes_map_to_the_displayed_original(places):
    """A 1600x800 JPEG stored turned (EXIF 6) is displayed 800x1600: the endpoint reports that
    size, the engine gets exactly ``resized_size`` of it (decoded at a JPEG scale, never at
    full size), and a mark found in the model input maps back onto the displayed original."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    from grounding.resize import ResizeSpec
    from serve.guards import load_model_image

    shown = Image.new("RGB", (800, 1600), (240, 240, 240))
    shown.paste((0, 0, 0), (100, 1200, 300, 1400))        # the mark, in displayed pixels
    stored = shown.transpose(Image.Transpose.ROTATE_90)   # what a camera writes for EXIF 6
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif)
    spec = ResizeSpec(min_pixels=32 * 32, max_pixels=256 * 256, factor=32)
    dec = load_model_image(places["cfg"], places["uris"], base64.b64encode(buf.getvalue()).decode(),
                           spec)
    assert dec.size == (800, 1600)
    assert dec.image.size == spec.resized_size(dec.size)
    dark = np.argwhere(np.asarray(dec.image.convert("L")) < 100)
    (y0, x0), (y1, x1) = dark.min(0), dark.max(0) + 1
    sx, sy = dec.size[0] / dec.image.width, dec.size[1] / dec.image.height
    box = [x0 * sx, y0 * sy, x1 * sx, y1 * sy]               # model pixels -> original pixels
    assert np.allclose(box, [100, 1200, 300, 1400], atol=16), box
