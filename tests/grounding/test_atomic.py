"""Exclusive create and compare-and-swap (`grounding.atomic`), raced by processes on a local
folder and on a real S3 endpoint (moto server through s3fs), and the refusal of a store that
ignores conditional writes."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest

from grounding import atomic
from grounding.storage import StorageOptions, filesystem


def _root(kind: str, tmp_path, request) -> tuple[str, StorageOptions]:
    if kind == "local":
        return str(tmp_path / "root"), StorageOptions()
    import s3fs

    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = f"atomic-{time.time_ns()}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).mkdir(bucket)
    return f"s3://{bucket}/root", StorageOptions(s3_endpoint_url=endpoint)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    return _root(request.param, tmp_path, request)


def _claimer(root: str, opts_json: str, me: int, slots: int, out) -> None:
    """Try to claim every slot 0..slots-1 by exclusive create; report the ones won."""
    opts = StorageOptions.model_validate_json(opts_json)
    fs, path = filesystem(root, opts)
    won = []
    for k in range(slots):
        try:
            atomic.create(fs, f"{path}/slot-{k:04d}", f"{me}".encode())
            won.append(k)
        except FileExistsError:
            pass
    out.put((me, won))


def test_eight_processes_racing_exclusive_creates_each_slot_is_won_once(root):
    uri, opts = root
    fs, path = filesystem(uri, opts)
    fs.makedirs(path, exist_ok=True)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    slots = 40
    procs = [ctx.Process(target=_claimer, args=(uri, opts.model_dump_json(), i, slots, out))
             for i in range(8)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    won = sorted(k for ks in results.values() for k in ks)
    assert won == list(range(slots))  # every slot won exactly once
    for me, ks in results.items():      # and what is stored is the winner's, whole
        for k in ks:
            assert atomic.read(fs, f"{path}/slot-{k:04d}")[0] == f"{me}".encode()


def test_compare_and_swap_refuses_a_stale_token(root):
    uri, opts = root
    fs, path = filesystem(uri, opts)
    p = f"{path}/cas"
    t1 = atomic.create(fs, p, b"one")
    with pytest.raises(FileExistsError):
        atomic.create(fs, p, b"again")
    data, t = atomic.read(fs, p)
    assert (data, t) == (b"one", t1)
    t2 = atomic.replace(fs, p, b"two", t1)
    with pytest.raises(atomic.Conflict):
        atomic.replace(fs, p, b"three", t1)          # someone else's write came first
    with pytest.raises(atomic.Conflict):
        atomic.delete(fs, p, t1)
    assert atomic.read(fs, p)[0] == b"two"
    atomic.delete(fs, p, t2)
    with pytest.raises(atomic.Conflict):
        atomic.replace(fs, p, b"four", t2)           # gone
    with pytest.raises(FileNotFoundError):
        atomic.read(fs, p)


def test_a_store_that_ignores_conditional_writes_is_refused(s3_endpoint):
    """An S3-compatible store that overwrites despite If-None-Match / If-Match (some do): the
    probe finds out before the first write and refuses it by name."""
    import s3fs

    class Ignoring(s3fs.S3FileSystem):
        async def _call_s3(self, method, *a, **kw):
            kw.pop("IfNoneMatch", None)
            kw.pop("IfMatch", None)
            return await super()._call_s3(method, *a, **kw)

    bucket = f"careless-{time.time_ns()}"
    fs = Ignoring(client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True)
    fs.mkdir(bucket)
    with pytest.raises(atomic.UnsafeStorage, match="ignores conditional writes"):
        atomic.probe(fs, f"{bucket}/store", "reviewed-label store")
    assert not fs.find(f"{bucket}/store")  # the probe cleaned up after itself
    honest = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint},
                               skip_instance_cache=True)
    atomic.probe(honest, f"{bucket}/store", "reviewed-label store")  # moto honours them
