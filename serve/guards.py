"""The endpoint's guards that are pure functions of a request: the image-URI allow-list.

Run::

    python -c "from serve.guards import UriAllowList as U; print(U(['s3://b/img/']).why_not('s3://b/img/x.png'))"
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

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
