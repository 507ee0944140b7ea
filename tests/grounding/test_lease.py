"""The lease (`grounding.lease`): what is left of it is a courtesy (one job writing an output at
a time, one retrain training at a time); nothing decides by it. Its own promises still hold."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time

import pytest

from grounding.lease import Lease, LeaseHeld, LeaseLost
from grounding.storage import filesystem


def _lease(tmp_path, what: str = "t", lease_s: float = 120.0) -> Lease:
    fs, root = filesystem(str(tmp_path))
    return Lease(fs, f"{root}/_lease", what, lease_s)


def test_a_held_lease_is_refused_then_free_once_released(tmp_path):
    a = _lease(tmp_path, "a").acquire()
    with pytest.raises(LeaseHeld, match="held by"):
        _lease(tmp_path, "b").acquire()
    a.release()
    _lease(tmp_path, "b").acquire().release()


def test_an_expired_lease_and_one_of_a_dead_process_here_are_taken_over(tmp_path):
    (tmp_path / "_lease").write_text(json.dumps({"owner": "dead:1", "until": time.time() - 1}))
    _lease(tmp_path).acquire().release()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "_lease").write_text(json.dumps(
        {"owner": f"{socket.gethostname()}:{dead.pid}:x", "until": time.time() + 3600}))
    _lease(tmp_path).acquire().release()


def test_a_long_holder_keeps_its_lease_by_renewing_it(tmp_path):
    held = _lease(tmp_path, "a", lease_s=0.6).acquire()
    time.sleep(1.5)  # well past one lease: still held, because it was renewed
    with pytest.raises(LeaseHeld):
        _lease(tmp_path, "b", lease_s=0.6).acquire()
    held.check()
    held.release()


def test_a_holder_whose_lease_was_taken_learns_it(tmp_path):
    mine = _lease(tmp_path, "a", lease_s=0.6).acquire()
    thief = _lease(tmp_path, "thief", lease_s=60).acquire(force=True)
    time.sleep(0.6)  # the holder's next renewal finds its token gone
    with pytest.raises(LeaseLost, match="taken over"):
        mine.check()
    thief.release()


def test_only_the_holder_releases_and_a_stale_lease_has_one_taker(tmp_path):
    (tmp_path / "_lease").write_text(json.dumps({"owner": "gone:1", "seq": 7,
                                                 "until": time.time() - 1}))
    winners, losers = [], []

    def wait_for_it(i):
        try:
            winners.append(_lease(tmp_path, f"w{i}").acquire(wait_s=0))
        except LeaseHeld:
            losers.append(i)

    ts = [threading.Thread(target=wait_for_it, args=(i,)) for i in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(winners) == 1 and len(losers) == 5 and winners[0].seq == 8
    other = _lease(tmp_path, "other")
    other.token = "forged"
    other.release()                      # not the holder: nothing happens
    assert (tmp_path / "_lease").exists()
    winners[0].release()
    assert not (tmp_path / "_lease").exists()
