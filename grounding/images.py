"""Image input: fetch bytes from a URI or inline data, decode safely, normalise to RGB.

Every failure is an `ImageError` with a stable ``code`` so that a batch job can turn it into
an error row and go on:

| code                 | cause                                                            |
|----------------------|------------------------------------------------------------------|
| ``missing``          | the file or object does not exist                                |
| ``fetch_failed``     | any other I/O error while reading it                             |
| ``empty_image``      | zero bytes                                                       |
| ``too_large``        | more bytes than allowed, or a decompression bomb (pixels over limit) |
| ``corrupt``          | bytes that no allowed decoder accepts, or a truncated file       |
| ``unsupported_format`` | a known image format outside `FORMATS` (SVG, EPS, PSD, PDF ...)  |
| ``zero_size``        | an image with a zero width or height                             |
| ``bad_image_ref``    | an image reference of an unsupported kind: a URI `grounding.uris` refuses, or a local path that is no regular file (FIFO, device, folder) |

One reference, one meaning: a string is inline data (``data:`` URI, or base64 whose bytes start
like an allowed format) or a path/URI parsed ONCE by `grounding.uris.parse_uri`; the parsed
`grounding.uris.Uri` is what an allow-list checks and what `read_bytes` fetches.

Decoding (`decode`, `decode_for_model`) opens only `FORMATS` (the first frame/page), checks the
declared size before any pixel is decoded, applies the EXIF orientation (sizes and pixels are
those a browser or Label Studio DISPLAYS), and, given the model's pixel budget, decodes no
larger than the model needs. CMYK, 16-bit, palette and alpha images become 8-bit RGB
(transparent pixels composited on white). Sizes are ``(width, height)`` in pixels of the
displayed image.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import struct
from typing import NamedTuple

from grounding.storage import StorageOptions
from grounding.uris import Uri, UriError, looks_like_uri, parse_uri

MAX_BYTES = 50 * 1024 * 1024
MAX_PIXELS = 64_000_000  # decoded pixels; beyond this a file is treated as a decompression bomb

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP")
"""Pillow formats an image may have; every other decoder stays off."""

# Magic bytes of the allowed formats (WebP: RIFF....WEBP, checked in `_format_of`).
_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF87a": "GIF",
          b"GIF89a": "GIF", b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"BM": "BMP"}
# Formats we know and refuse (so the error says so instead of "corrupt").
_REFUSED = {b"%!PS": "EPS", b"\xc5\xd0\xd3\xc6": "EPS", b"%PDF": "PDF", b"8BPS": "PSD",
            b"SIMPLE  =": "FITS", b"\x00\x00\x00\x0cjP  ": "JPEG 2000",
            b"\xffO\xffQ": "JPEG 2000", b"\x00\x00\x01\x00": "ICO", b"\x00\x00\x02\x00": "CUR",
            b"P1": "PNM", b"P2": "PNM", b"P3": "PNM", b"P4": "PNM", b"P5": "PNM", b"P6": "PNM",
            b"icns": "ICNS", b"DDS ": "DDS", b"qoif": "QOI", b"\x76\x2f\x31\x01": "OpenEXR"}


class ImageError(ValueError):
    """A bad image, with a stable error code (see the module table)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _format_of(head: bytes) -> str | None:
    """The allowed format these leading bytes start, or None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((f for m, f in _MAGIC.items() if head.startswith(m)), None)


def _refused_format(head: bytes) -> str | None:
    if head[4:8] == b"ftyp":
        return "HEIF/AVIF"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:64].lower()
    if text.startswith((b"<?xml", b"<svg", b"<!doctype svg")):
        return "SVG"
    return next((f for m, f in _REFUSED.items() if head.startswith(m)), None)


_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def is_base64_image(ref: str) -> bool:
    """True for base64 text of an image in an allowed format (by its decoded first bytes, not
    its length): only base64 characters, a length that is a multiple of 4, and bytes that start
    like a PNG, JPEG, GIF, WebP, TIFF or BMP file. Anything else is a path or URI."""
    if not isinstance(ref, str) or len(ref) < 8 or len(ref) % 4 or not _B64.fullmatch(ref):
        return False
    try:
        head = base64.b64decode(ref[:24], validate=True)
    except (binascii.Error, ValueError):
        return False
    return _format_of(head) is not None


def is_uri(ref: str) -> bool:
    """True when ``ref`` names an image to fetch (a path or URI), not inline data."""
    if ref.startswith("data:") or is_base64_image(ref):
        return False
    return looks_like_uri(ref)


def image_source(ref: str, *, relative: bool = True) -> bytes | Uri:
    """What a string image reference is: inline bytes (a ``data:`` URI, base64) or a parsed
    `Uri` to fetch. ``relative``: accept ``./x.png`` (the label job; the endpoint does not).

    A string that is meant as a path/URI but is refused becomes ``bad_image_ref`` with the
    reason; one that is neither a URI nor base64 too."""
    if ref.startswith("data:"):
        return _b64(ref.split(",", 1)[-1])
    if is_base64_image(ref):
        return _b64(ref)
    if looks_like_uri(ref):
        try:
            return parse_uri(ref, relative=relative)
        except UriError as e:
            raise ImageError("bad_image_ref", str(e)) from None
    return _b64(ref)


def read_bytes(ref: str | bytes | Uri, storage: StorageOptions | None = None,
               max_bytes: int = MAX_BYTES, follow_redirects: bool = True) -> bytes:
    """Bytes of an image given as raw bytes, a ``data:`` URI, base64 text, a parsed `Uri`, or a
    string path/URI (parsed here by `grounding.uris.parse_uri`: ``s3://bucket/key``,
    ``https://...``, ``file://...``, ``/abs/path``, ``./rel/path``; reached with ``storage``).

    The fetch gets the parsed object (its canonical string for fsspec and HTTP), never the raw
    text. Local files: their real path, opened without following a link and without blocking,
    regular files only (`grounding.uris.open_local`).

    ``follow_redirects=False`` (the endpoint, whose URIs come from clients): an HTTP(S) answer
    that redirects is refused (``fetch_failed``) instead of followed, since the target was
    never checked against the allow-list."""
    if isinstance(ref, bytes | bytearray | memoryview):
        data = bytes(ref)
    elif isinstance(ref, Uri):
        data = _fetch_uri(ref, storage, max_bytes, follow_redirects)
    elif not isinstance(ref, str):
        raise ImageError("bad_image_ref", f"image must be bytes or a string, got {type(ref).__name__}")
    else:
        src = image_source(ref)
        data = src if isinstance(src, bytes) else _fetch_uri(src, storage, max_bytes,
                                                              follow_redirects)
    if not data:
        raise ImageError("empty_image", "image has zero bytes")
    if len(data) > max_bytes:
        raise ImageError("too_large", f"image has {len(data)} bytes, limit {max_bytes}")
    return data


def _fetch_uri(uri: Uri, storage: StorageOptions | None, max_bytes: int,
               follow_redirects: bool) -> bytes:
    if uri.is_local:
        return _read_local(uri, max_bytes)
    text = str(uri)  # the one canonical string, built from the parsed parts
    if not follow_redirects and uri.scheme in ("http", "https"):
        return _fetch_no_redirect(text, max_bytes)
    return _fetch(text, (storage or StorageOptions()).fsspec_kwargs(text), max_bytes)


def _read_local(uri: Uri, max_bytes: int) -> bytes:
    from grounding.uris import NotRegularFile, TooLarge, open_local

    try:
        return open_local(uri, max_bytes)
    except FileNotFoundError as e:
        raise ImageError("missing", f"image not found: {uri.path}") from e
    except NotRegularFile as e:
        raise ImageError("bad_image_ref", str(e)) from e
    except TooLarge as e:
        raise ImageError("too_large", f"{uri.path} has {e.args[0]} bytes, limit {max_bytes}") from e
    except OSError as e:  # ELOOP (a link where a resolved path was checked), EACCES ...
        raise ImageError("fetch_failed", f"could not read {uri.path}: {e.strerror or e}") from e


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError("bad_image_ref", "image is neither a path/URI nor valid base64") from e


def _fetch(uri: str, storage_options: dict, max_bytes: int) -> bytes:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options if "://" in uri else {}))
        size = fs.size(path)
        if size is not None and size > max_bytes:
            raise ImageError("too_large", f"{uri} has {size} bytes, limit {max_bytes}")
        with fs.open(path, "rb") as f:
            return f.read(max_bytes + 1)
    except ImageError:
        raise
    except FileNotFoundError as e:
        # fsspec's HTTP filesystem reports every failed request as FileNotFoundError; only a
        # 404 means the image is gone. A server that is down or refuses the connection is a
        # transient failure (labeled again by a rerun), not a missing image.
        cause = e.__cause__
        if (uri.lower().startswith(("http://", "https://")) and cause is not None
                and getattr(cause, "status", None) != 404):
            raise ImageError("fetch_failed", f"could not read {uri}: "
                             f"{type(cause).__name__}: {cause}") from e
        raise ImageError("missing", f"image not found: {uri}") from e
    except OSError as e:
        if "NoSuchKey" in str(e) or "Not Found" in str(e) or "404" in str(e):
            raise ImageError("missing", f"image not found: {uri}") from e
        raise ImageError("fetch_failed", f"could not read {uri}: {e}") from e


def _fetch_no_redirect(uri: str, max_bytes: int, timeout_s: float = 10.0) -> bytes:
    """GET ``uri`` without following redirects, reading at most ``max_bytes`` + 1 bytes."""
    import requests

    try:
        with requests.get(uri, allow_redirects=False, stream=True, timeout=timeout_s) as r:
            if r.is_redirect or 300 <= r.status_code < 400:
                raise ImageError("fetch_failed", f"{uri} redirects ({r.status_code}); redirects "
                                 "are not followed")
            if r.status_code == 404:
                raise ImageError("missing", f"image not found: {uri}")
            if r.status_code >= 400:
                raise ImageError("fetch_failed", f"could not read {uri}: HTTP {r.status_code}")
            data = b""
            for chunk in r.iter_content(64 * 1024):
                data += chunk
                if len(data) > max_bytes:
                    raise ImageError("too_large", f"{uri} has over {max_bytes} bytes")
            return data
    except requests.RequestException as e:
        raise ImageError("fetch_failed", f"could not read {uri}: {type(e).__name__}") from e


class Decoded(NamedTuple):
    """A decoded image for the model and the size boxes are reported in.

    ``image``: 8-bit RGB in the DISPLAYED frame (EXIF orientation applied), at least as large
    on each side as the model input needs, possibly smaller than the original. ``size``:
    ``(width, height)`` of the displayed ORIGINAL image in pixels: the size to pass to
    `grounding.resize.ResizeSpec.resized_size` and to the box readers, and to report."""

    image: object
    size: tuple[int, int]


def decode(data: bytes, max_pixels: int = MAX_PIXELS):
    """Decode bytes to an 8-bit RGB PIL image at the displayed original size (EXIF orientation
    applied), refusing bombs, broken files and formats outside `FORMATS`."""
    return decode_for_model(data, None, max_pixels).image


def decode_for_model(data: bytes, target_pixels: int | None = None,
                     max_pixels: int = MAX_PIXELS) -> Decoded:
    """Decode bytes for a model whose input holds at most ``target_pixels`` pixels (the resize
    spec's ``max_pixels``); None decodes every pixel.

    The declared size (for a GIF its logical screen and first frame) is checked against
    ``max_pixels`` before any pixel is decoded. JPEGs are decoded at a DCT scale (``draft``),
    other formats reduced by an integer factor right after decoding, never below the model's
    need: each side keeps at least ``side * sqrt(target_pixels / (width * height))`` pixels,
    which is at least what `grounding.resize.smart_resize` gives that side. 16-bit images are
    scaled to 8 bits with integers after the reduction. `Decoded.size` is the displayed
    ORIGINAL ``(width, height)``: boxes are mapped to it, not to ``image.size``.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError("empty_image", "image has zero bytes")
    fmt = _format_of(data[:16])
    if fmt is None:
        if refused := _refused_format(data[:64]):
            raise ImageError("unsupported_format", f"{refused} images are not accepted "
                             f"(accepted: {', '.join(FORMATS)})")
        if _png_zero_side(data):
            raise ImageError("zero_size", "PNG header declares a zero width or height")
        raise ImageError("corrupt", "bytes are not an image in an accepted format "
                         f"({', '.join(FORMATS)})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[fmt])
            w, h = _declared_size(img)
            if w * h > max_pixels:
                raise ImageError("too_large", f"image is {w}x{h} = {w * h} pixels, limit {max_pixels}")
            if w == 0 or h == 0:
                raise ImageError("zero_size", f"image has a zero side ({w}x{h})")
            orientation = _orientation(img)
            need = None
            if target_pixels and w * h > target_pixels:
                k = math.sqrt(target_pixels / (w * h))
                need = (math.ceil(w * k), math.ceil(h * k))
                if fmt == "JPEG":
                    img.draft(None, need)  # decode at 1/2, 1/4 or 1/8 scale when it covers `need`
            img.load()
            if need is not None:
                img = _reduce(img, need)
            img = _transpose(img, orientation)
            out = to_rgb(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("too_large", f"decompression bomb refused: {e}") from e
    except UnidentifiedImageError as e:
        if _png_zero_side(data):
            raise ImageError("zero_size", "PNG header declares a zero width or height") from e
        raise ImageError("corrupt", f"bytes are not a valid {fmt} image") from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError,
            ZeroDivisionError, struct.error) as e:
        # what a decoder raises on bytes it cannot make sense of
        raise ImageError("corrupt", f"image could not be decoded: {e}") from e
    displayed = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    # Pixels only: the EXIF block (its orientation tag, already applied, would turn the image
    # AGAIN in code that calls exif_transpose, as transformers' load_image does; GPS) and XMP
    # stay behind.
    out.info = {}
    return Decoded(out, displayed)


def _declared_size(img) -> tuple[int, int]:
    """Pixels the decoder will allocate: the image size, for a GIF also its first frame."""
    w, h = img.size
    for tile in getattr(img, "tile", None) or []:
        x0, y0, x1, y1 = tile[1]
        w, h = max(w, x1), max(h, y1)
    return w, h


def _orientation(img) -> int:
    """The EXIF orientation (1-8; 1 when absent or unreadable)."""
    try:
        o = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not fail the image
        return 1
    return o if isinstance(o, int) and 1 <= o <= 8 else 1


def _transpose(img, orientation: int):
    """``img`` turned as a viewer shows it (EXIF 2.32, tag 0x0112), as
    `PIL.ImageOps.exif_transpose` does, on the already reduced image."""
    from PIL import Image

    method = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}.get(orientation)
    return img if method is None else img.transpose(method)


def _reduce(img, need: tuple[int, int]):
    """``img`` shrunk by the largest integer factor that keeps each side >= ``need``."""
    from PIL import Image

    w, h = img.size
    r = min(w // need[0], h // need[1])
    if r < 2:
        return img
    size = (math.ceil(w / r), math.ceil(h / r))
    if img.mode in ("P", "1", "PA"):
        # Palette indexes cannot be averaged: pick pixels down to twice the size, convert the
        # small image, then average (a GIF's canvas is never converted at full size).
        pre = (min(w, 2 * size[0]), min(h, 2 * size[1]))
        if pre != (w, h):
            img = img.resize(pre, Image.Resampling.NEAREST)
        img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
        return img.resize(size, Image.Resampling.BOX)
    try:
        return img.reduce(r)
    except ValueError:  # a mode reduce() does not take (I;16 ...): same box filter
        return img.resize(size, Image.Resampling.BOX)


def _png_zero_side(data: bytes) -> bool:
    # PIL refuses to identify a PNG whose IHDR says 0 x N; say what is wrong instead of "corrupt"
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR" or len(data) < 24:
        return False
    return int.from_bytes(data[16:20], "big") == 0 or int.from_bytes(data[20:24], "big") == 0


def to_rgb(img):
    """8-bit RGB: alpha composited on white, 16/32-bit scaled with integers, CMYK converted."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit or float greyscale: scale the actual range into 0..255 with integers (a
        # lookup table for 16 bits), band by band: no float64 or full-size wide copy
        import numpy as np

        lo, hi = img.getextrema()
        w, h = img.size
        out = np.empty((h, w), np.uint8)
        lut = None
        if img.mode.startswith("I;16"):
            span = max(int(hi) - int(lo), 1)
            lut = ((np.arange(65536, dtype=np.int64) - int(lo)).clip(0, span) * 255
                   // span).astype(np.uint8)
        for y in range(0, h, 256):
            a = np.asarray(img.crop((0, y, w, min(h, y + 256))))
            if lut is not None:
                out[y:y + 256] = lut[a]
            elif a.dtype.kind == "f":
                span = float(hi - lo) or 1.0
                out[y:y + 256] = ((a - np.float32(lo)) * np.float32(255.0 / span)).clip(0, 255)
            else:
                span = max(int(hi) - int(lo), 1)
                out[y:y + 256] = (a.astype(np.int64) - int(lo)) * 255 // span
        return Image.fromarray(out, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(ref: str | bytes, storage: StorageOptions | None = None,
               max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS):
    """`read_bytes` + `decode`: an RGB PIL image or an `ImageError`."""
    return decode(read_bytes(ref, storage, max_bytes), max_pixels)


def fit_to_model(dec: Decoded, resize):
    """``dec.image`` resized to exactly ``resize.resized_size(dec.size)`` (``resize`` a
    `grounding.resize.ResizeSpec`): the model input computed from the ORIGINAL displayed size,
    so that boxes the model gives in its input's pixels map back to ``dec.size``. ValueError
    for an aspect ratio the model cannot take."""
    from PIL import Image

    size = resize.resized_size(dec.size)
    return dec.image if dec.image.size == size else dec.image.resize(size, Image.BICUBIC)


def exif_orientation(ref: str | bytes | Uri, storage: StorageOptions | None = None,
                     max_bytes: int = MAX_BYTES) -> int:
    """The EXIF orientation (1-8, 1 when there is none) of an image reference, read from its
    header without decoding pixels. Rows labeled before the orientation was applied (issue 27)
    have sizes and boxes in the STORED frame where this is 2-8 (README, "Images as displayed")."""
    return _header(read_bytes(ref, storage, max_bytes))[1]


def displayed_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` of an image as displayed (EXIF orientation applied), from its header
    without decoding pixels; `ImageError` when it is no image in `FORMATS`."""
    (w, h), orientation = _header(data)
    if not w or not h:
        raise ImageError("corrupt", "bytes are not an image in an accepted format "
                         f"({', '.join(FORMATS)})")
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _header(data: bytes) -> tuple[tuple[int, int], int]:
    """The stored size and EXIF orientation ((0, 0) and 1 when unreadable)."""
    from PIL import Image

    fmt = _format_of(data[:16])
    if fmt is None:
        return (0, 0), 1
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as img:
            return img.size, _orientation(img)
    except (OSError, SyntaxError, ValueError):
        return (0, 0), 1
