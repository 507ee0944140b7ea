"""Atomic writes on every backend, in one place: exclusive create and compare-and-swap.

Everything that must never be written twice or torn goes through here: the reviewed-label
store's commit log, the adapter registry's metadata, events and lock, a job output's lease.

* `create` makes ``path`` with ``data`` only if it does not exist: the object is visible whole or
  not at all, and of two racing writers exactly one wins (the other gets ``FileExistsError``).
* `read` gives the bytes and a *token* (the S3 ETag; locally a hash of the bytes);
  `replace` and `delete` act only if the object still has that token, else `Conflict`.

How, per backend:

* **Local folder**: `create` writes a temporary file beside ``path`` and hard-links it into
  place (``os.link`` fails if ``path`` exists; fsspec's own ``mode="create"`` is an ``exists()``
  check followed by a write, which two processes can both pass). `replace`/`delete` hold an
  ``fcntl.flock`` on a sidecar file while they compare and ``os.replace``/unlink, so a
  compare-and-swap is one step for every process of the machine.
* **S3** (and S3-compatible stores): conditional requests. ``PUT If-None-Match: *`` (412 = taken),
  ``PUT``/``DELETE If-Match: <etag>`` (412 = changed). A 409 ``ConditionalRequestConflict``
  (another conditional write on the key in flight) is retried with backoff.

Some S3-compatible stores ignore the conditional headers and overwrite without a word. `probe`
checks, once per store and process, that a second exclusive create of the same key fails and
that a stale ``If-Match`` is refused; a store that does not honour them is refused with
`UnsafeStorage` rather than silently losing a commit.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
import uuid

RETRIES = 8


class Conflict(RuntimeError):
    """The object changed (or vanished) since it was read: the compare-and-swap lost."""


class UnsafeStorage(RuntimeError):
    """The storage backend does not honour exclusive create / compare-and-swap."""


def is_local(fs) -> bool:
    proto = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in proto or "local" in proto


def _local_token(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _s3_code(e: BaseException) -> tuple[str, int]:
    """(error code, HTTP status) of an s3fs error (the botocore ClientError is its cause)."""
    resp = getattr(e.__cause__, "response", None) or getattr(e, "response", None) or {}
    err = resp.get("Error", {})
    return str(err.get("Code", "")), int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _s3_call(fs, op: str, path: str, **kw):
    """One conditional S3 request; 409 (a concurrent conditional write) is retried."""
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(path)
    for attempt in range(RETRIES):
        try:
            out = sync(fs.loop, fs._call_s3, op, Bucket=bucket, Key=key, **kw)
            fs.invalidate_cache(path)
            return out
        except OSError as e:
            code, status = _s3_code(e)
            if status == 409 or code == "ConditionalRequestConflict":
                time.sleep(min(2.0, 0.05 * 2 ** attempt) * (0.5 + random.random()))
                continue
            if status == 412 or code == "PreconditionFailed":
                if "IfNoneMatch" in kw:
                    raise FileExistsError(path) from None
                raise Conflict(f"{path} changed since it was read") from None
            if code in ("NoSuchKey", "404") or isinstance(e, FileNotFoundError):
                raise Conflict(f"{path} is gone") from None
            raise
    raise OSError(f"{path}: {op} kept conflicting with concurrent writers ({RETRIES} tries)")


# ---- the three operations ------------------------------------------------------------------
def create(fs, path: str, data: bytes) -> str:
    """Create ``path`` holding ``data`` iff it does not exist; returns its token.

    Raises ``FileExistsError`` when it exists (someone else won)."""
    if is_local(fs):
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic; EEXIST if taken. Complete before it is visible.
        finally:
            os.unlink(tmp)
        return _local_token(data)
    out = _s3_call(fs, "put_object", path, Body=data, IfNoneMatch="*")
    return out["ETag"]


def read(fs, path: str) -> tuple[bytes, str]:
    """``(bytes, token)`` of ``path``; ``FileNotFoundError`` if it does not exist."""
    if is_local(fs):
        with open(path, "rb") as f:
            data = f.read()
        return data, _local_token(data)
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(path)

    async def get():
        # One GET: the bytes and the ETag of the same version of the object.
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        try:
            return await resp["Body"].read(), resp["ETag"]
        finally:
            resp["Body"].close()

    return sync(fs.loop, get)


class _flock:
    """An exclusive ``flock`` on a sidecar of ``path``: local compare-and-swap is one step."""

    def __init__(self, path: str):
        d, b = os.path.split(path)
        self.lock_path = os.path.join(d, f".{b}.flock")

    def __enter__(self):
        import fcntl

        self.fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _expect_local(path: str, token: str) -> None:
    """`Conflict` unless the local file at ``path`` still has ``token`` (hold its flock)."""
    try:
        with open(path, "rb") as f:
            if _local_token(f.read()) != token:
                raise Conflict(f"{path} changed since it was read")
    except FileNotFoundError:
        raise Conflict(f"{path} is gone") from None


def replace(fs, path: str, data: bytes, token: str) -> str:
    """Overwrite ``path`` with ``data`` iff it still has ``token``; returns the new token.

    Raises `Conflict` when it changed or vanished since it was read."""
    if is_local(fs):
        with _flock(path):
            _expect_local(path, token)
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        return _local_token(data)
    return _s3_call(fs, "put_object", path, Body=data, IfMatch=token)["ETag"]


def delete(fs, path: str, token: str) -> None:
    """Delete ``path`` iff it still has ``token``; `Conflict` otherwise."""
    if is_local(fs):
        with _flock(path):
            _expect_local(path, token)
            os.unlink(path)
        return
    _s3_call(fs, "delete_object", path, IfMatch=token)


# ---- is the backend safe? ------------------------------------------------------------------
_PROBED: set[tuple[str, str]] = set()


def probe(fs, root: str, what: str) -> None:
    """Refuse (`UnsafeStorage`) a backend that does not honour exclusive create and
    compare-and-swap; checked once per (backend, root) per process."""
    if is_local(fs):
        return  # os.link and flock: the kernel guarantees them
    key = (str(fs.protocol), root)
    if key in _PROBED:
        return
    path = f"{root.rstrip('/')}/_probe/{uuid.uuid4().hex}"
    why = None
    try:
        token = create(fs, path, b"1")
        try:
            create(fs, path, b"2")
            why = "a second exclusive create (PUT If-None-Match: *) of the same key succeeded"
        except FileExistsError:
            pass
        if why is None:
            try:
                replace(fs, path, b"3", '"0123456789abcdef0123456789abcdef"')
                why = "a PUT with a stale If-Match succeeded"
            except Conflict:
                pass
        if why is None:
            replace(fs, path, b"4", token)  # the right token must work
    finally:
        try:
            fs.rm(path)
        except OSError:
            pass
    if why:
        raise UnsafeStorage(
            f"{what} {root}: this object store ignores conditional writes ({why}). groundlabel "
            "needs them so that two writers can never both commit the same version; use AWS "
            "S3, MinIO or another store that supports If-None-Match / If-Match on PUT.")
    _PROBED.add(key)
