"""The adapter registry decides by one commit: the four defects of the lease-and-pointer
registry, reproduced with processes on a folder and on moto's S3 (through a loopback proxy
that loses a response after the store applied the write), and six processes racing promote and
rollback while a reader checks every state it sees.

Each defect test drives the registry the way its caller does: a promotion that read
production earlier (a retrain's gate, a CLI call) and commits later. On the registry of lease
and pointer files (before issue 30) the same tests drive ``lock``/``promote_locked``; there
they fail.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest
from support import fault_proxy

from grounding.registry import AdapterRegistry, RegistryError
from grounding.storage import StorageOptions

LEASED = hasattr(AdapterRegistry, "promote_locked")  # the registry before issue 30


def _adapter(d: Path, seed: int, files: int = 1) -> Path:
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA",
                                                       "seed": seed}))
    (d / "adapter_model.safetensors").write_bytes(bytes([seed]) * 4096)
    for i in range(files - 1):  # more files: more room for two uploads to interleave
        (d / f"extra-{i}.bin").write_bytes(bytes([seed, i]) * 2048)
    return d


def _bucket(endpoint: str) -> str:
    import boto3

    bucket = f"regc-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """(registry URI, S3 endpoint or None)."""
    if request.param == "local":
        return str(tmp_path / "reg"), None
    ep = request.getfixturevalue("s3_endpoint")
    return f"s3://{_bucket(ep)}/registry", ep


def _open(uri: str, endpoint: str | None, **kw) -> AdapterRegistry:
    return AdapterRegistry(uri, StorageOptions(s3_endpoint_url=endpoint), **kw)


def _wait_file(path: Path, timeout: float = 120) -> None:
    t = time.time()
    while not path.exists():
        if time.time() - t > timeout:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.02)


def _wait_stopped(pid: int, timeout: float = 60) -> None:
    import psutil

    t = time.time()
    while psutil.Process(pid).status() != psutil.STATUS_STOPPED:
        if time.time() - t > timeout:
            raise TimeoutError(f"process {pid} never paused")
        time.sleep(0.02)


# ---- 1. a lost response on S3 records one promotion once -------------------------------------
def test_a_lost_response_on_a_promotion_records_it_once(s3_endpoint, tmp_path):
    """The store applies the promotion's write but its 200 never reaches the client, which
    re-sends the conditional PUT and gets 412. One promotion event, and a rollback then goes
    back to the base model (before: the event twice, and rollback stayed on the adapter)."""
    uri = f"s3://{_bucket(s3_endpoint)}/registry"
    direct = _open(uri, s3_endpoint)
    a = direct.register(_adapter(tmp_path / "a", 1), {}, name="ad-a")
    # The first PUT of an event (old: events/N.json; now: the log entry of the commit).
    with fault_proxy(s3_endpoint, r"(events|_delta_log)/\d+\.json$") as proxy:
        _open(uri, proxy["url"]).promote(a, reason="gate")
    dropped = proxy["said"]
    assert "dropped PUT" in dropped and "-> 200" in dropped, dropped  # the store applied it
    promotions = [e for e in direct.events() if e["kind"] == "promote"]
    assert [e["name"] for e in promotions] == [a]                    # once
    assert direct.production() == a
    assert direct.rollback() is None and direct.production() is None


def test_a_promotion_sent_again_with_its_key_is_recorded_once(where, tmp_path):
    """The caller's own retry (a lost answer one level up): the same idempotency key is the
    same event, answered with its number, not a second promotion."""
    if LEASED:
        pytest.fail("the registry before issue 30 has no idempotency keys")
    reg = _open(*where)
    a = reg.register(_adapter(tmp_path / "a", 1), {}, name="ad-a")
    first = reg.promote(a, reason="gate", key="retrain-xyz:promote")
    again = reg.promote(a, reason="gate", key="retrain-xyz:promote")
    assert first == again
    assert [e["name"] for e in reg.events() if e["kind"] == "promote"] == [a]
    assert reg.rollback() is None


# ---- 2. a paused promoter cannot overwrite a later promotion ---------------------------------
def _pausing_promoter(uri: str, endpoint, name: str, flag: str) -> None:
    """Promote ``name``, pausing (SIGSTOP, a real pause of this process) right before the
    write that moves production, after every check was made."""
    reg = _open(uri, endpoint, **({"lease_s": 1.0} if LEASED else {}))
    seam = "_set_production" if LEASED else "_write"
    real = getattr(AdapterRegistry, seam)

    def paused(self, *a, **kw):
        Path(flag).write_text("paused")
        os.kill(os.getpid(), signal.SIGSTOP)
        return real(self, *a, **kw)

    setattr(AdapterRegistry, seam, paused)
    try:
        reg.promote(name, reason="paused holder")
    except RegistryError as e:
        print("refused:", e, flush=True)
        sys.exit(3)


def test_a_paused_promoter_does_not_overwrite_a_later_promotion(where, tmp_path):
    uri, ep = where
    reg = _open(uri, ep)
    p, x, y = (reg.register(_adapter(tmp_path / n, i), {}, name=f"ad-{n}")
               for i, n in enumerate("pxy"))
    reg.promote(p)
    flag = tmp_path / "paused"
    ctx = mp.get_context("spawn")
    slow = ctx.Process(target=_pausing_promoter, args=(uri, ep, x, str(flag)))
    slow.start()
    try:
        _wait_file(flag)
        _wait_stopped(slow.pid)
        # The successor (on the old registry: once the paused holder's lease expired).
        _open(uri, ep).promote(y, reason="successor", **({"wait_s": 30} if LEASED else {}))
    finally:
        os.kill(slow.pid, signal.SIGCONT)
        slow.join(120)
    assert reg.production() == y                                   # not overwritten by x
    assert reg.events()[-1]["kind"] == "promote" and reg.events()[-1]["name"] == y
    assert slow.exitcode == 3                                      # told it was refused
    assert reg.rollback() == p and reg.production() == p


# ---- 3. after --force, the earlier promoter is refused ---------------------------------------
def _old_holder(uri: str, endpoint, name: str, ready: str, go: str) -> None:
    """A retrain: reads production when its gate starts, promotes when the gate passed."""
    reg = _open(uri, endpoint)
    try:
        if LEASED:
            with reg.lock() as lease:
                reg.production()
                Path(ready).write_text("1")
                _wait_file(Path(go))
                reg.promote_locked(name, "gate", lease)
        else:
            seen = reg.production()
            Path(ready).write_text("1")
            _wait_file(Path(go))
            reg.promote(name, "gate", expected=seen)
    except RegistryError as e:
        print("refused:", e, flush=True)
        sys.exit(3)


def test_after_a_forced_promotion_an_earlier_promoter_is_refused(where, tmp_path):
    uri, ep = where
    reg = _open(uri, ep)
    p, x, z = (reg.register(_adapter(tmp_path / n, i), {}, name=f"ad-{n}")
               for i, n in enumerate("pxz"))
    reg.promote(p)
    ready, go = tmp_path / "ready", tmp_path / "go"
    ctx = mp.get_context("spawn")
    holder = ctx.Process(target=_old_holder, args=(uri, ep, x, str(ready), str(go)))
    holder.start()
    try:
        _wait_file(ready)
        reg.promote(z, reason="operator", force=True)
    finally:
        go.write_text("1")
        holder.join(120)
    assert holder.exitcode == 3
    assert reg.production() == z
    last = reg.events()[-1]
    assert (last["kind"], last["name"]) == ("promote", z)
    if not LEASED:
        assert last["forced"] is True and last["previous"] == p  # what it replaced


# ---- 4. two registrations of one name never mix their files -----------------------------------
def _registrar(uri: str, endpoint, src: str, names: list[str], barrier, out) -> None:
    reg = _open(uri, endpoint)
    for name in names:
        barrier.wait(60)
        try:
            reg.register(src, {"source": src}, name=name)
            out.put((name, src))
        except RegistryError:
            out.put((name, None))


def test_two_registrations_of_one_name_never_mix_their_files(where, tmp_path):
    uri, ep = where
    srcs = [str(_adapter(tmp_path / s, i + 1, files=8)) for i, s in enumerate("ab")]
    names = [f"same-{i}" for i in range(10)]
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_registrar, args=(uri, ep, s, names, barrier, out))
             for s in srcs]
    for q in procs:
        q.start()
    got: dict[str, list] = {}
    for _ in range(2 * len(names)):
        name, src = out.get(timeout=300)
        got.setdefault(name, []).append(src)
    for q in procs:
        q.join(60)
    reg = _open(uri, ep)
    for name in names:
        winners = [s for s in got[name] if s]
        assert len(winners) == 1, (name, got[name])              # one registration wins
        meta = reg.show(name)
        assert meta["source"] == winners[0]                      # and its meta says whose
        local = Path(reg.download(name, tmp_path / "cache"))
        for f in Path(winners[0]).iterdir():                     # the files are the winner's
            assert (local / f.name).read_bytes() == f.read_bytes(), (name, f.name)


# ---- six processes racing promote and rollback, a reader checking every state ------------------
def _racer(uri: str, endpoint, me: int, rounds: int, names: list[str], out) -> None:
    import random

    reg = _open(uri, endpoint)
    rng = random.Random(me)
    done, refused = [], 0
    for _ in range(rounds):
        seen = reg.production()
        try:
            if rng.random() < 0.6 or seen is None:
                name = rng.choice(names)
                reg.promote(name, f"racer {me}", expected=seen)
                done.append(("promote", name))
            else:
                done.append(("rollback", reg.rollback(f"racer {me}", expected=seen)))
        except RegistryError:  # production moved since it was read, or nothing to undo
            refused += 1
        time.sleep(rng.random() * 0.05)
    out.put(("done", me, done, refused))


def _reader(uri: str, endpoint, stop: str, out) -> None:
    reg = _open(uri, endpoint)
    seen, bad = 0, []
    while not Path(stop).exists():
        try:
            state = reg.state()                   # one snapshot: events, adapters, production
            seen += 1
            stack = [None]
            for e in state.events:
                stack.append(e["name"]) if e["kind"] == "promote" else stack.pop()
            if stack[-1] != state.production:
                bad.append(("replay", stack[-1], state.production))
            if state.production is not None and state.production not in state.adapters:
                bad.append(("unregistered", state.production))
        except Exception as e:  # noqa: BLE001 - reported to the test
            bad.append(repr(e))
    out.put(("reader", seen, bad))


def test_six_processes_racing_promote_and_rollback(where, tmp_path):
    uri, ep = where
    reg = _open(uri, ep)
    names = [reg.register(_adapter(tmp_path / f"a{i}", i), {}, name=f"ad-{i}") for i in range(3)]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    stop = tmp_path / "stop"
    rounds = 5
    racers = [ctx.Process(target=_racer, args=(uri, ep, i, rounds, names, out)) for i in range(6)]
    reader = ctx.Process(target=_reader, args=(uri, ep, str(stop), out))
    reader.start()
    for p in racers:
        p.start()
    actions, refused = [], 0
    for _ in racers:
        msg = out.get(timeout=600)
        actions += msg[2]
        refused += msg[3]
    for p in racers:
        p.join(60)
        assert p.exitcode == 0
    stop.write_text("1")
    msg = out.get(timeout=120)
    reader.join(60)
    assert msg[0] == "reader" and msg[1] > 0 and msg[2] == [], msg
    assert len(actions) + refused == 6 * rounds and actions
    events = reg.events()
    # Every success is one event and every event a success; none twice, none lost.
    assert sorted(repr((e["kind"], e["name"])) for e in events) == sorted(map(repr, actions))
    numbers = [e["event"] for e in events]
    assert numbers == sorted(set(numbers))
    stack = [None]
    for e in events:
        assert e["previous"] == stack[-1]        # each commit moved from what it saw
        stack.append(e["name"]) if e["kind"] == "promote" else stack.pop()
    assert reg.production() == stack[-1]
