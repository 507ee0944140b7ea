"""Image URIs are parsed once (`grounding.uris`): what is refused, the one canonical string a
fetcher gets, and local files read by real path, regular files only, without blocking."""

from __future__ import annotations

import os
import threading

import pytest

from grounding.images import ImageError, read_bytes
from grounding.uris import Uri, UriError, parse_uri


@pytest.mark.parametrize("ref, canonical", [
    ("/data/a.png", "file:///data/a.png"),
    ("/data//a.png", "file:///data/a.png"),                         # '//' collapses
    ("/data/a b%20c#1?.png", "file:///data/a%20b%2520c%231%3F.png"),  # a plain path is literal
    ("file:///data/a%20b.png", "file:///data/a%20b.png"),           # a file URI is decoded
    ("file://localhost/data/a.png", "file:///data/a.png"),
    ("HTTPS://CDN.Example.com:443/p/x.png?sig=a%2Fb", "https://cdn.example.com/p/x.png?sig=a%2Fb"),
    ("http://127.0.0.1:8000/p/%7Ex.png", "http://127.0.0.1:8000/p/~x.png"),
    ("http://[::1]:8000/p/x.png", "http://[::1]:8000/p/x.png"),     # '::' of an IPv6 host is fine
    ("s3://bucket/k/a%20b.png", "s3://bucket/k/a%20b.png"),         # object keys are literal
    ("gs://bucket/k/x.png", "gs://bucket/k/x.png"),
])
def test_canonical_form(ref, canonical):
    uri = parse_uri(ref)
    assert str(uri) == canonical
    assert parse_uri(str(uri)) == uri            # the canonical string parses to the same object


@pytest.mark.parametrize("ref, why", [
    (" http://h/x.png", "whitespace"),            # urlsplit strips these, fsspec does not
    ("\vfile:///x.png", "whitespace"),
    ("http://h/x.png\n", "whitespace"),
    ("http://h/x\x00.png", "control character"),
    ("http://h/x\x85.png", "control character"),   # C1 control
    ("http://h/x.png%00", "encoded control"),
    ("/data/x.png::http://h/secret", "'::'"),    # fsspec's chaining
    ("file:///data/x.png::nope", "'::'"),
    ("s3://b/x.png::file:///etc/passwd", "'::'"),
    ("simplecache::s3://b/x.png", "absolute path"),
    ("http://h/a%2fb.png", "encoded '/'"),
    ("s3://b/a%2Fb.png", "encoded '/'"),
    ("http://h/a%5cb.png", "encoded '/'"),
    ("http://h/a/%2e%2e/b.png", "'..'"),
    ("http://h/a/./b.png", "'..'"),
    ("/a/../b.png", "'..'"),
    ("http://h/a.png#x", "fragment"),
    ("file:///a.png?x=1", "query"),
    ("s3://b/a.png?versionId=1", "query"),       # s3fs reads versions from the query
    ("http://u@h/a.png", "user information"),
    ("s3://b:99/a.png", "port"),
    ("http://h:99999/a.png", "bad port"),
    ("http://h:0/a.png", "bad port"),            # not the default port in disguise
    ("file://other/a.png", "another machine"),
    ("ftp://h/a.png", "unsupported scheme"),
    ("zip://a.png", "unsupported scheme"),
    ("http://h\\@evil/a.png", "backslash"),
    ("http://exa_mple..com/a.png", None),        # accepted host characters
    ("http:///a.png", "host"),
    ("a.png", "absolute path"),
    ("./a.png", "absolute path"),                # relative: only where asked for
    ("http://h/%ff.png", "UTF-8"),
    ("http://[::1/a.png", "cannot be parsed"),   # urlsplit's own ValueError
    ("http://h\uff0fevil/a.png", "cannot be parsed"),  # a netloc NFKC would change
])
def test_refused(ref, why):
    if why is None:
        parse_uri(ref)
        return
    with pytest.raises(UriError) as e:
        parse_uri(ref)
    assert why in str(e.value)


def test_relative_paths_where_allowed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_uri("./a.png", relative=True) == Uri("file", "", None, f"{tmp_path}/a.png")


def test_local_files_are_read_by_real_path_and_regular_only(tmp_path):
    (tmp_path / "real.png").write_bytes(b"\x89PNG bytes")
    (tmp_path / "link.png").symlink_to(tmp_path / "real.png")
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "dir.png").mkdir()
    # the label job follows links (datasets of symlinks are common), through the real path
    assert read_bytes(str(tmp_path / "link.png"), max_bytes=100) == b"\x89PNG bytes"
    assert parse_uri(str(tmp_path / "link.png")).resolved_path().path == str(tmp_path / "real.png")
    got = {}

    def run():
        for name in ("fifo.png", "dir.png"):
            try:
                read_bytes(str(tmp_path / name))
            except ImageError as e:
                got[name] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "opening a FIFO blocked"
    assert {n: e.code for n, e in got.items()} == {"fifo.png": "bad_image_ref",
                                                   "dir.png": "bad_image_ref"}
    with pytest.raises(ImageError) as e:
        read_bytes("/dev/zero")
    assert e.value.code == "bad_image_ref"
    with pytest.raises(ImageError) as e:
        read_bytes(str(tmp_path / "real.png"), max_bytes=4)
    assert e.value.code == "too_large"


def test_a_link_put_in_place_after_the_check_is_not_followed(tmp_path):
    """The checked object is a resolved path; if a link replaces it before the read, the read
    refuses (O_NOFOLLOW) instead of reading where the link points."""
    (tmp_path / "ok.png").write_bytes(b"ok")
    (tmp_path / "secret.png").write_bytes(b"secret")
    checked = parse_uri(str(tmp_path / "ok.png")).resolved_path()
    (tmp_path / "ok.png").unlink()
    (tmp_path / "ok.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(ImageError) as e:
        read_bytes(checked)
    assert e.value.code == "fetch_failed"
    # a folder swapped for a link: the opened file's own path differs from the checked one
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.png").write_bytes(b"ok")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "x.png").write_bytes(b"secret")
    checked = parse_uri(str(tmp_path / "d" / "x.png")).resolved_path()
    os.rename(tmp_path / "d", tmp_path / "d-old")
    (tmp_path / "d").symlink_to(tmp_path / "e")
    with pytest.raises(ImageError) as e:
        read_bytes(checked)
    assert e.value.code == "fetch_failed"
