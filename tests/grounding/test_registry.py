"""The adapter registry: immutable names, metadata, an atomic production pointer with rollback,
and a lock, on a folder and on a real S3 endpoint (moto server)."""

from __future__ import annotations

import json
import multiprocessing as mp
import time

import pytest

from grounding.registry import AdapterRegistry, RegistryError
from grounding.storage import StorageOptions


def _adapter(d, seed: int):
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (d / "adapter_model.safetensors").write_bytes(bytes([seed]) * 64)
    return d


def _registry(kind, tmp_path, s3_endpoint=None) -> AdapterRegistry:
    if kind == "local":
        return AdapterRegistry(str(tmp_path / "reg"))
    import s3fs

    bucket = f"reg-{time.time_ns()}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}).mkdir(bucket)
    return AdapterRegistry(f"s3://{bucket}/registry", StorageOptions(s3_endpoint_url=s3_endpoint))


@pytest.fixture(params=["local", "s3"])
def reg(request, tmp_path):
    if request.param == "s3":
        return _registry("s3", tmp_path, request.getfixturevalue("s3_endpoint"))
    return _registry("local", tmp_path)


def test_register_promote_rollback(reg, tmp_path):
    a = reg.register(_adapter(tmp_path / "a", 1), {"metrics": {"acc@0.5": 0.5},
                                                   "snapshot_version": 3, "base_model": "m"})
    b = reg.register(_adapter(tmp_path / "b", 2), {"metrics": {"acc@0.5": 0.7}})
    assert a != b and [m["name"] for m in reg.list()] == [a, b]
    assert reg.show(a)["snapshot_version"] == 3 and reg.show(a)["registered_at"]
    assert reg.production() is None
    reg.promote(a, reason="gate")
    reg.promote(b, reason="gate")
    assert reg.production() == b
    assert reg.rollback() == a and reg.production() == a
    assert reg.rollback() is None and reg.production() is None  # back to the base model
    kinds = [(e["kind"], e["name"]) for e in reg.events()]
    assert kinds == [("promote", a), ("promote", b), ("rollback", a), ("rollback", None)]
    with pytest.raises(RegistryError, match="nothing to roll back"):
        reg.rollback()
    # downloaded copies are complete peft folders, cached by (immutable) name
    local = reg.download(b, tmp_path / "cache")
    assert (tmp_path / "cache" / b / "adapter_model.safetensors").read_bytes() == bytes([2]) * 64
    assert reg.download(b, tmp_path / "cache") == local


def test_names_are_never_reused_and_bad_adapters_refused(reg, tmp_path):
    name = reg.register(_adapter(tmp_path / "a", 1), {}, name="fixed-name")
    with pytest.raises(RegistryError, match="taken"):
        reg.register(_adapter(tmp_path / "b", 2), {}, name=name)
    assert (tmp_path / "a").exists()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{")
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        reg.register(tmp_path / "broken", {})
    with pytest.raises(RegistryError, match="no adapter 'nope'"):
        reg.promote("nope")
    with pytest.raises(RegistryError, match="no adapter 'nope'"):
        reg.download("nope", tmp_path / "cache")


def test_crash_mid_upload_is_invisible(tmp_path):
    reg = _registry("local", tmp_path)
    # files uploaded, meta.json (the commit) never written: not an adapter, name still free
    _adapter(tmp_path / "reg" / "adapters" / "half-done", 1)
    assert reg.list() == [] and not reg.exists("half-done")
    assert reg.register(_adapter(tmp_path / "a", 1), {}, name="half-done") == "half-done"


def _hold_lock(uri: str, endpoint, seconds: float, ready) -> None:
    reg = AdapterRegistry(uri, StorageOptions(s3_endpoint_url=endpoint))
    with reg.lock():
        ready.set()
        time.sleep(seconds)


def _lock_holder(reg, seconds: float):
    """Another process holding the registry lock for ``seconds`` (returns once it holds it)."""
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(reg.uri, reg.opts.s3_endpoint_url, seconds, ready))
    p.start()
    assert ready.wait(60)
    return p


def test_lock_keeps_two_promotions_apart(reg, tmp_path):
    name = reg.register(_adapter(tmp_path / "a", 1), {})
    p = _lock_holder(reg, 6)
    with pytest.raises(RegistryError, match="locked by"):
        reg.promote(name)
    assert reg.production() is None
    p.join(60)
    reg.promote(name)  # released
    assert reg.production() == name


def test_expired_lock_of_a_crashed_holder_is_taken_over(tmp_path):
    reg = AdapterRegistry(str(tmp_path / "reg"), lease_s=900)
    (tmp_path / "reg").mkdir()
    (tmp_path / "reg" / "_lock").write_text(json.dumps({"owner": "dead:1", "until": time.time() - 1}))
    name = reg.register(_adapter(tmp_path / "a", 1), {})
    reg.promote(name)
    assert reg.production() == name and not (tmp_path / "reg" / "_lock").exists()


def test_lock_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    import socket
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    reg = AdapterRegistry(str(tmp_path / "reg"))
    (tmp_path / "reg").mkdir()
    (tmp_path / "reg" / "_lock").write_text(json.dumps(
        {"owner": f"{socket.gethostname()}:{dead.pid}:x", "until": time.time() + 3600}))
    name = reg.register(_adapter(tmp_path / "a", 1), {})
    reg.promote(name)
    assert reg.production() == name


def test_a_long_holder_keeps_its_lock_by_renewing_the_lease(tmp_path):
    import threading

    reg = AdapterRegistry(str(tmp_path / "reg"), lease_s=0.6)
    name = reg.register(_adapter(tmp_path / "a", 1), {})
    held, done = threading.Event(), threading.Event()

    def hold():
        with reg.lock():
            held.set()
            done.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(10)
    time.sleep(1.5)  # well past one lease: still held, because it was renewed
    with pytest.raises(RegistryError, match="locked by"):
        AdapterRegistry(str(tmp_path / "reg"), lease_s=0.6).promote(name)
    done.set()
    t.join()
    reg.promote(name)


# ---- the lock under concurrency and faults (processes, on a folder and on moto's S3) ---------
def _racer(uri: str, endpoint, me: int, rounds: int, names: list[str], out) -> None:
    import random

    reg = AdapterRegistry(uri, StorageOptions(s3_endpoint_url=endpoint))
    rng = random.Random(me)
    done = []
    for _ in range(rounds):
        with reg.lock(wait_s=120) as lease:
            t0 = time.time()
            if rng.random() < 0.6 or reg.production() is None:
                name = rng.choice(names)
                reg.promote_locked(name, f"racer {me}", lease)
                done.append(("promote", name))
            else:
                try:
                    done.append(("rollback", reg.rollback_locked(f"racer {me}", lease)))
                except RegistryError:  # nothing left to undo
                    pass
            time.sleep(rng.random() * 0.05)
            t1 = time.time()
        out.put(("held", me, t0, t1))
    out.put(("done", me, done))


def _reader(uri: str, endpoint, seconds: float, out) -> None:
    reg = AdapterRegistry(uri, StorageOptions(s3_endpoint_url=endpoint))
    seen, bad = 0, []
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            seen += 1
            name = reg.production()   # parses production.json: must never be torn
            if name is not None and not reg.exists(name):
                bad.append(name)
        except Exception as e:  # noqa: BLE001 - reported to the test
            bad.append(repr(e))
    out.put(("reader", seen, bad))


def test_four_processes_racing_promote_rollback_and_the_lock(reg, tmp_path):
    names = [reg.register(_adapter(tmp_path / f"a{i}", i), {}, name=f"ad-{i}") for i in range(3)]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    ep = reg.opts.s3_endpoint_url
    rounds = 6
    procs = [ctx.Process(target=_racer, args=(reg.uri, ep, i, rounds, names, out))
             for i in range(4)]
    procs.append(ctx.Process(target=_reader, args=(reg.uri, ep, 20, out)))
    for p in procs:
        p.start()
    held, actions, reader = [], [], None
    for _ in range(4 * rounds + 4 + 1):
        msg = out.get(timeout=300)
        if msg[0] == "held":
            held.append(msg[2:])
        elif msg[0] == "done":
            actions += msg[2]
        else:
            reader = msg
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    held.sort()
    for (_, end), (start, _) in zip(held, held[1:], strict=False):
        assert start >= end, "two processes held the registry lock at once"
    assert reader[1] > 0 and reader[2] == [], reader        # the pointer was never torn
    events = reg.events()
    assert [e["event"] for e in events] == list(range(1, len(events) + 1))  # complete, in order
    assert sorted(repr((e["kind"], e["name"])) for e in events) == sorted(map(repr, actions))
    stack = [None]                                            # replaying them gives the pointer
    for e in events:
        stack.append(e["name"]) if e["kind"] == "promote" else stack.pop()
    assert reg.production() == stack[-1]
    assert all(isinstance(e["lease"], int) for e in events)  # each names the lease it ran under


def test_a_holder_that_lost_its_lease_stops_before_promoting(tmp_path):
    from grounding.lease import Lease

    reg = AdapterRegistry(str(tmp_path / "reg"), lease_s=0.6)
    name = reg.register(_adapter(tmp_path / "a", 1), {})
    with reg.lock() as lease:
        # Another process takes the lock over (here: by force, as `--force` does).
        thief = Lease(reg.fs, reg._p("_lock"), "thief", lease_s=60).acquire(force=True)
        time.sleep(0.6)  # the holder's next renewal finds its token gone
        with pytest.raises(RegistryError, match="taken over"):
            reg.promote_locked(name, "gate", lease)
        thief.release()
    assert reg.production() is None and reg.events() == []


def test_only_the_holder_releases_and_takeover_of_a_stale_lock_has_one_winner(tmp_path):
    import threading

    from grounding.lease import Lease, LeaseHeld

    reg = AdapterRegistry(str(tmp_path / "reg"))
    (tmp_path / "reg").mkdir()
    (tmp_path / "reg" / "_lock").write_text(json.dumps({"owner": "gone:1", "seq": 7,
                                                        "until": time.time() - 1}))
    winners, losers = [], []

    def wait_for_it(i):
        try:
            winners.append(Lease(reg.fs, reg._p("_lock"), f"w{i}").acquire(wait_s=0))
        except LeaseHeld:
            losers.append(i)

    ts = [threading.Thread(target=wait_for_it, args=(i,)) for i in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(winners) == 1 and len(losers) == 5 and winners[0].seq == 8
    other = Lease(reg.fs, reg._p("_lock"), "other")
    other.token = "forged"
    other.release()                      # not the holder: nothing happens
    assert (tmp_path / "reg" / "_lock").exists()
    winners[0].release()
    assert not (tmp_path / "reg" / "_lock").exists()


def test_promote_and_rollback_wait_for_the_lock_or_force_it(reg, tmp_path):
    a = reg.register(_adapter(tmp_path / "a", 1), {})
    b = reg.register(_adapter(tmp_path / "b", 2), {})
    p = _lock_holder(reg, 4)
    t0 = time.time()
    reg.promote(a, wait_s=60)             # waits for the holder, then promotes
    assert time.time() - t0 > 1 and reg.production() == a
    p.join(60)
    p = _lock_holder(reg, 30)
    reg.promote(b, force=True)            # takes the lock; recorded
    p.terminate()
    p.join(60)
    kinds = [e["kind"] for e in reg.events()]
    assert kinds[-2:] == ["force-unlock", "promote"] and reg.production() == b
    assert reg.events()[-2]["previous_holder"]["owner"]
    assert reg.rollback(wait_s=5) == a


# One rule for adapter names, inside the registry: every caller (serve, the label job, the CLI)
# goes through it. A name is a single path segment that can name nothing else.
@pytest.mark.parametrize("name", [
    "..",                      # the registry's parent
    "../other-registry/x",     # traversal
    "a/../../b",
    "x/",                      # alias of x on a file system
    "./x",                     # alias of x
    "/abs/path",               # absolute
    "a\\b",                    # a Windows separator
    ".hidden",                 # a leading dot: '.', '..' and temp folders start so
    "x..y",                    # '..' anywhere
    "",                        # empty
    " x",                      # blanks
    "x\n",                     # control characters
    "ａｄａｐｔｅｒ",              # full-width look-alikes
    "a" * 101,                 # over the length cap
    "x?y", "x*y", "x:y",       # glob and scheme characters
])
def test_adapter_names_outside_the_rule_are_refused_everywhere(reg, tmp_path, name):
    from grounding.registry import AdapterNameError

    good = _adapter(tmp_path / "a1", 1)
    for call in (lambda: reg.register(good, {}, name=name), lambda: reg.show(name),
                 lambda: reg.exists(name), lambda: reg.download(name, tmp_path / "cache"),
                 lambda: reg.promote(name)):
        with pytest.raises(AdapterNameError, match="adapter name"):
            call()
    assert not (tmp_path / "cache").exists()  # nothing was read or written for it


@pytest.mark.parametrize("name", ["gl-20261126-010203-abc123", "prod.v2", "A_b-9", "x" * 100])
def test_adapter_names_inside_the_rule_work(reg, tmp_path, name):
    good = _adapter(tmp_path / "a1", 1)
    assert reg.register(good, {}, name=name) == name and reg.exists(name)
    assert reg.show(name)["name"] == name
