"""Image input: fetch bytes from a URI or inline data, decode safely, normalise to RGB.

Every failure is an `ImageError` with a stable ``code`` so that a batch job can turn it into
an error row and go on:

| code             | cause                                                               |
|------------------|---------------------------------------------------------------------|
| ``missing``      | the file or object does not exist                                   |
| ``fetch_failed`` | any other I/O error while reading it                                |
| ``empty_image``  | zero bytes                                                          |
| ``too_large``    | more bytes than allowed, or a decompression bomb (pixels over limit) |
| ``corrupt``      | bytes that no decoder accepts, or a truncated file                  |
| ``zero_size``    | an image with a zero width or height                                |
| ``bad_image_ref``| an image reference of an unsupported kind                           |

CMYK, 16-bit, palette and alpha images are accepted: they are converted to 8-bit RGB
(transparent pixels composited on white). Sizes are ``(width, height)`` in pixels.
"""

from __future__ import annotations

import base64
import binascii
import io
import re

from grounding.storage import StorageOptions

MAX_BYTES = 50 * 1024 * 1024
MAX_PIXELS = 64_000_000  # decoded pixels; beyond this a file is treated as a decompression bomb


class ImageError(ValueError):
    """A bad image, with a stable error code (see the module table)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


_B64 = re.compile(r"[A-Za-z0-9+/=\s]+")
# Base64 of common image files starts with these (JPEG's "/9j/" looks like an absolute path).
_B64_MAGIC = ("/9j/", "iVBORw0KGg", "R0lGOD", "UklGR", "Qk", "SUkq", "TU0A", "AAAA")


def is_base64_image(ref: str) -> bool:
    """True for base64 text of an image rather than a path: only base64 characters, and either
    an image file's base64 signature or longer than any sane path (512)."""
    if len(ref) < 64 or not _B64.fullmatch(ref[:4096]):
        return False
    return ref.startswith(_B64_MAGIC) or len(ref) > 512


def is_uri(ref: str) -> bool:
    if is_base64_image(ref):
        return False
    return "://" in ref[:16] or ref.startswith("/") or ref.startswith("./")


def read_bytes(ref: str | bytes, storage: StorageOptions | None = None,
               max_bytes: int = MAX_BYTES, follow_redirects: bool = True) -> bytes:
    """Bytes of an image given as raw bytes, a ``data:`` URI, base64 text, a local path or an
    fsspec URI (``s3://bucket/key``, ``file://...``, reached with ``storage``).

    ``follow_redirects=False`` (the endpoint, whose URIs come from clients): an HTTP(S) answer
    that redirects is refused (``fetch_failed``) instead of followed, since the target was
    never checked against the allow-list."""
    if isinstance(ref, bytes | bytearray | memoryview):
        data = bytes(ref)
    elif not isinstance(ref, str):
        raise ImageError("bad_image_ref", f"image must be bytes or a string, got {type(ref).__name__}")
    elif ref.startswith("data:"):
        data = _b64(ref.split(",", 1)[-1])
    elif is_uri(ref) and not follow_redirects and ref.lower().startswith(("http://", "https://")):
        data = _fetch_no_redirect(ref, max_bytes)
    elif is_uri(ref):
        data = _fetch(ref, (storage or StorageOptions()).fsspec_kwargs(ref), max_bytes)
    else:
        data = _b64(ref)
    if not data:
        raise ImageError("empty_image", "image has zero bytes")
    if len(data) > max_bytes:
        raise ImageError("too_large", f"image has {len(data)} bytes, limit {max_bytes}")
    return data


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


def decode(data: bytes, max_pixels: int = MAX_PIXELS):
    """Decode bytes to an 8-bit RGB PIL image, refusing bombs and broken files."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError("empty_image", "image has zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError("too_large", f"image is {w}x{h} = {w * h} pixels, limit {max_pixels}")
            if w == 0 or h == 0:
                raise ImageError("zero_size", f"image has a zero side ({w}x{h})")
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("too_large", f"decompression bomb refused: {e}") from e
    except UnidentifiedImageError as e:
        if _png_zero_side(data):
            raise ImageError("zero_size", "PNG header declares a zero width or height") from e
        raise ImageError("corrupt", "bytes are not an image any decoder knows") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError("corrupt", f"image could not be decoded: {e}") from e
    return to_rgb(img)


def _png_zero_side(data: bytes) -> bool:
    # PIL refuses to identify a PNG whose IHDR says 0 x N; say what is wrong instead of "corrupt"
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR" or len(data) < 24:
        return False
    return int.from_bytes(data[16:20], "big") == 0 or int.from_bytes(data[20:24], "big") == 0


def to_rgb(img):
    """8-bit RGB: alpha composited on white, 16-bit and CMYK converted."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale the actual range into 0..255
        import numpy as np

        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        return Image.fromarray(a.astype(np.uint8), "L").convert("RGB")
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
