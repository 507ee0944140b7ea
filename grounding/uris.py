"""Image URIs parsed once: the object that is checked (`serve.guards.UriAllowList`) is the
object that is fetched (`grounding.images.read_bytes`), never the raw string.

`parse_uri` turns a string into a `Uri` or raises `UriError` saying why. It refuses rather than
repairs anything that two readers of the same string could take differently:

* leading/trailing whitespace and control characters anywhere (Python's ``urlsplit`` strips
  them, fsspec does not), backslashes (some servers read them as ``/``);
* ``::`` in the path or query (fsspec chains filesystems with it: ``ok.png::http://other/``);
* ``.``/``..`` segments, also percent-encoded; an encoded ``/`` (``%2F``) or backslash;
* user information (``https://trusted@evil.example/``), a port outside http(s);
* a query outside http(s) (signed URLs need one), and a fragment anywhere;
* schemes other than `SCHEMES`.

Paths are absolute and normalised (``//`` collapses). For ``http``, ``https`` and ``file``
URIs the path is percent-DECODED (and re-encoded in `Uri.__str__`, the one string a fetcher
is given); object-store keys (``s3://``, ``gs://`` ...) are literal, as s3fs and gcsfs send
them. A plain path (``/data/a.png``, or ``./a.png`` where relative paths are allowed) is a
local file taken literally: ``%``, ``?`` and ``#`` are file-name characters there.

Local files: `Uri.resolved` gives the real path (symlinks followed, ``os.path.realpath``);
an allow-list compares THAT path with its folder's real path, and the reader opens exactly
that path without following a link (`open_local`).
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass, replace
from urllib.parse import quote, unquote_to_bytes, urlsplit

SCHEMES = frozenset({"file", "http", "https", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})
"""Schemes an image URI may have (fsspec knows many more: archives, caches, ssh ...)."""

_WEB = ("http", "https")
_DECODED = ("http", "https", "file")  # path percent-decoded; object-store keys are literal
_DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST = re.compile(r"[a-z0-9]([a-z0-9_.-]*[a-z0-9])?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


class UriError(ValueError):
    """A string that is not a URI this code will check and fetch; the message says why."""


@dataclass(frozen=True)
class Uri:
    """One parsed image URI; `str` gives its one canonical form (what fetchers receive).

    ``path`` is absolute and normalised: decoded for http(s)/file, literal for object stores.
    ``resolved`` is True once a ``file`` path is the real path (`Uri.resolved_path`).
    """

    scheme: str
    host: str
    port: int | None
    path: str
    query: str = ""
    resolved: bool = False

    def __str__(self) -> str:
        if self.scheme == "file":
            return "file://" + quote(self.path, safe="/")
        if self.scheme in _WEB:
            port = "" if self.port == _DEFAULT_PORTS[self.scheme] else f":{self.port}"
            path = quote(self.path, safe="/!$&'()*+,;=:@-._~")
            return f"{self.scheme}://{self.host}{port}{path}" + (
                f"?{self.query}" if self.query else "")
        return f"{self.scheme}://{self.host}{self.path}"

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    def resolved_path(self) -> Uri:
        """A ``file`` URI with its real path (every symlink followed), marked resolved; any
        other URI unchanged. Check and open THIS object, so both see the same file."""
        if not self.is_local or self.resolved:
            return self
        return replace(self, path=os.path.realpath(self.path), resolved=True)


def looks_like_uri(ref: str) -> bool:
    """True when ``ref`` is meant as a path or URI (then `parse_uri` decides whether it is a
    good one), False for what can only be inline data. Leading blanks are ignored HERE only,
    so that ``" http://..."`` is parsed (and refused), not taken for base64."""
    s = ref[:32].lstrip("".join(map(chr, range(33))))
    return bool(_SCHEME.match(s)) or s.startswith(("/", "./"))


def parse_uri(ref: str, *, what: str = "the image URI", relative: bool = False) -> Uri:
    """``ref`` as a `Uri`, or `UriError` naming ``what`` and the reason.

    ``relative``: accept ``./x.png`` (a local file under the current directory; the label
    job's input may use them); the endpoint never does.
    """
    if not isinstance(ref, str):
        raise UriError(f"{what} must be a string")
    if ref != ref.strip():
        raise UriError(f"{what} has leading or trailing whitespace")
    if _CONTROL.search(ref):
        raise UriError(f"{what} has a control character")
    if "\\" in ref:
        raise UriError(f"{what} has a backslash")
    m = _SCHEME.match(ref)
    if m is None:
        return _plain_path(ref, what, relative)
    scheme = m.group(1).lower()
    if scheme not in SCHEMES:
        raise UriError(f"{what} has an unsupported scheme {scheme!r} "
                       f"(use one of {', '.join(sorted(SCHEMES))})")
    try:
        parts = urlsplit(ref)
    except ValueError as e:  # an unbalanced '[', netloc characters that NFKC changes ...
        raise UriError(f"{what} cannot be parsed: {e}") from None
    if "#" in ref:
        raise UriError(f"{what} has a fragment ('#')")
    if parts.query or "?" in ref:
        if scheme not in _WEB:
            raise UriError(f"{what} has a query ('?'), which only http(s) URIs may carry")
    if "@" in parts.netloc:
        raise UriError(f"{what} carries user information (user@host): refused")
    try:
        port = parts.port
    except ValueError:
        raise UriError(f"{what} has a bad port") from None
    if port is not None and scheme not in _WEB:
        raise UriError(f"{what} has a port, which only http(s) URIs may carry")
    if port == 0:
        raise UriError(f"{what} has a bad port")
    host = (parts.hostname or "").lower()
    if ":" in host:  # an IPv6 literal: urlsplit took its brackets off
        import ipaddress

        try:
            host = f"[{ipaddress.IPv6Address(host).compressed}]"
        except ValueError:
            raise UriError(f"{what} has a bad host") from None
    elif scheme != "file":
        if not _HOST.fullmatch(host):
            raise UriError(f"{what} has no host or a bad one")
    elif host not in ("", "localhost"):
        raise UriError(f"{what} names another machine (file://{host}/)")
    if "::" in parts.path or "::" in parts.query:
        raise UriError(f"{what} has '::' (fsspec chains filesystems with it)")
    path = _path(parts.path, what, decode=scheme in _DECODED)
    if scheme == "file":
        host = ""
    return Uri(scheme, host, port or _DEFAULT_PORTS.get(scheme), path, parts.query)


def _plain_path(ref: str, what: str, relative: bool) -> Uri:
    if ref.startswith("./") and relative:
        ref = os.path.join(os.getcwd(), ref[2:])
    elif not ref.startswith("/"):
        raise UriError(f"{what} must be an absolute path or a URI with a scheme")
    if "::" in ref:
        raise UriError(f"{what} has '::' (fsspec chains filesystems with it)")
    return Uri("file", "", None, _path(ref, what, decode=False))


def _path(raw: str, what: str, *, decode: bool) -> str:
    if re.search(r"%(2f|5c)", raw, re.IGNORECASE):
        raise UriError(f"{what} has an encoded '/' or '\\' (%2F, %5C) in its path")
    if decode:
        try:
            path = unquote_to_bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise UriError(f"{what} has percent-escapes that are not UTF-8") from None
        if _CONTROL.search(path):
            raise UriError(f"{what} has an encoded control character")
    else:
        path = raw
    path = path or "/"
    if not path.startswith("/"):
        path = "/" + path
    segments = path.split("/")
    if ".." in segments or "." in segments:
        raise UriError(f"{what} has '.' or '..' in its path")
    path = posixpath.normpath(path)  # collapses '//' (the only change left to make)
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    return path


def open_local(uri: Uri, max_bytes: int) -> bytes:
    """The bytes of a local regular file, read without blocking on FIFOs or devices.

    A resolved `Uri` is opened as it is (``O_NOFOLLOW``: a symlink put in its place is
    refused) and the opened file's own path (``/proc/self/fd``) must be that path, so a folder
    swapped for a link after the check is refused too. An unresolved one is resolved first.
    Raises FileNotFoundError, `NotRegularFile`, `TooLarge` or another OSError (ELOOP for a
    link, a plain OSError for a path that now leads elsewhere).
    """
    import stat

    uri = uri.resolved_path()
    fd = os.open(uri.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO"
                    if stat.S_ISFIFO(st.st_mode) else "a device or socket")
            raise NotRegularFile(f"{uri.path} is {kind}, not a regular file")
        try:
            opened = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            opened = uri.path  # no /proc (not Linux): O_NOFOLLOW is the guard left
        if opened != uri.path:
            raise OSError(f"{uri.path} was replaced after it was checked (now {opened})")
        if st.st_size > max_bytes:
            raise TooLarge(st.st_size)
        chunks, got = [], 0
        while got <= max_bytes:
            b = os.read(fd, min(1 << 20, max_bytes + 1 - got))
            if not b:
                break
            chunks.append(b)
            got += len(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


class NotRegularFile(OSError):
    """A local image path that is a directory, FIFO, device or socket."""


class TooLarge(OSError):
    """A local file over the byte limit (``args[0]``: its size)."""
