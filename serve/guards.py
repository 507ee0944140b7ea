"""The endpoint's guards, checked before a request reaches the engine: API keys, the body
(size, JSON, schema), the image (URI allow-list, fetch, decode, size) and the errors they raise
(`ApiError`, answered as a 4xx JSON ``{"error": {"code", "message"}}``).

Run::

    python -c "from serve.guards import UriAllowList as U; print(U(['s3://b/img/']).why_not('s3://b/img/x.png'))"
"""

from __future__ import annotations

import hmac
import json
import os
import posixpath
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from pydantic import ValidationError

_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class _Place:
    """A URI taken apart: scheme, host, port, and a normalised absolute path."""

    scheme: str
    host: str
    port: int | None
    path: str


def _parse(uri: str, *, what: str) -> _Place:
    """``uri`` taken apart, or ValueError saying why it cannot be compared safely.

    A plain path is a ``file`` URI. The path is percent-decoded BEFORE it is checked, so
    ``%2e%2e`` is a ``..`` like any other.
    """
    if any(c in uri for c in ("\\", "\x00", "\r", "\n", "\t")):
        raise ValueError(f"{what} has a backslash or a control character")
    if "://" not in uri:
        if not uri.startswith("/"):
            raise ValueError(f"{what} must be an absolute path or a URI with a scheme")
        uri = "file://" + uri
    parts = urlsplit(uri)
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ValueError(f"{what} carries user information (user@host): refused")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{what} has a bad port") from None
    scheme = parts.scheme.lower()
    path = unquote(parts.path) or "/"
    segments = path.split("/")
    if ".." in segments or "." in segments:
        raise ValueError(f"{what} has '.' or '..' in its path")
    path = posixpath.normpath(path)  # collapses '//' (the only change left to make)
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    return _Place(scheme, (parts.hostname or "").lower(), port or _DEFAULT_PORTS.get(scheme),
                  path)


class UriAllowList:
    """Image URIs a request may name, compared on PARSED parts, never on raw text:

    * the scheme and the host (case-insensitive) and the port must be a prefix's own;
    * the path must lie under the prefix's path, which is taken to end at a ``/``
      (``s3://b/img`` allows ``s3://b/img/x.png``, never ``s3://b/img-private/x.png``);
    * user information (``https://trusted@evil.example/``) is refused, in prefixes too;
    * ``.``/``..`` segments (also percent-encoded), backslashes and control characters are
      refused rather than normalised away.

    An empty list allows nothing (requests send the image itself, base64). Redirects are
    checked by the fetch, which follows none (`grounding.images.read_bytes`).
    """

    def __init__(self, prefixes: list[str]):
        self.prefixes = list(prefixes)
        self._places = []
        for p in prefixes:
            place = _parse(p, what=f"allowed URI prefix {p!r}")
            path = place.path if place.path.endswith("/") else place.path + "/"
            self._places.append(_Place(place.scheme, place.host, place.port, path))

    def why_not(self, uri: str) -> str | None:
        """None when ``uri`` is allowed, else the reason (safe to show to the client)."""
        if not self._places:
            return "image URIs are not accepted here: send the image as base64"
        try:
            got = _parse(uri, what="the image URI")
        except ValueError as e:
            return str(e)
        for want in self._places:
            if (got.scheme, got.host, got.port) == (want.scheme, want.host, want.port) and (
                    got.path + "/").startswith(want.path) and got.path + "/" != want.path:
                return None
        return ("the image URI is not under an allowed prefix ("
                + ", ".join(self.prefixes) + ")")


class ApiError(Exception):
    """A request refused with an HTTP status and a stable error code."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# Image errors -> HTTP status.
_IMAGE_STATUS = {"too_large": 413, "missing": 422, "fetch_failed": 422, "empty_image": 422,
                 "corrupt": 422, "zero_size": 422, "bad_image_ref": 400}


def check_auth(cfg, request) -> None:
    """ApiError 401 unless the request carries one of the configured API keys."""
    keys = [k for k in os.environ.get(cfg.api_keys_env, "").split(",") if k.strip()]
    if not keys:
        return
    got = request.headers.get("x-api-key") or ""
    auth = request.headers.get("authorization") or ""
    if auth.lower().startswith("bearer "):
        got = got or auth[7:]
    if not any(hmac.compare_digest(got.encode(), k.strip().encode()) for k in keys):
        raise ApiError(401, "unauthorized", "missing or wrong API key (X-API-Key header "
                       "or Authorization: Bearer)")

async def read_request(cfg, request, family: str):
    """The body as a `GroundRequest`, or ApiError 4xx (size, JSON, schema, text, family)."""
    from serve.schema import GroundRequest

    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cfg.max_body_bytes:
        raise ApiError(413, "payload_too_large",
                       f"body of {declared} bytes, limit {cfg.max_body_bytes}")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > cfg.max_body_bytes:
            raise ApiError(413, "payload_too_large",
                           f"body over the limit of {cfg.max_body_bytes} bytes")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "bad_json", "the body is not JSON") from None
    try:
        req = GroundRequest.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, p['loc'])) or 'body'}: {p['msg']}"
                             for p in e.errors()[:5])
        raise ApiError(422, "bad_request", problems) from None
    if not req.text.strip():
        raise ApiError(422, "empty_text", "text (the referring expression) is empty")
    if len(req.text) > cfg.max_text_chars:
        raise ApiError(413, "text_too_long",
                       f"text has {len(req.text)} characters, limit {cfg.max_text_chars}")
    if req.family and req.family != family:
        raise ApiError(422, "wrong_family", f"this endpoint serves family {family!r}, "
                       f"not {req.family!r}")
    return req

def load_image(cfg, uris: UriAllowList, ref: str):
    """The request's image (RGB PIL), or ApiError 4xx."""
    from grounding.images import ImageError, decode, is_base64_image, read_bytes

    try:
        is_ref = not (ref.startswith("data:") or is_base64_image(ref))
        if is_ref and (why := uris.why_not(ref)):
            raise ApiError(403, "uri_not_allowed", why)
        # The allow-list checked this URI only: a redirect elsewhere is refused, not followed.
        data = read_bytes(ref, cfg.storage, max_bytes=cfg.max_body_bytes,
                          follow_redirects=False)
        return decode(data, cfg.max_image_pixels)
    except ImageError as e:
        raise ApiError(_IMAGE_STATUS.get(e.code, 422), e.code, str(e)) from None
