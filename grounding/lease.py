"""An exclusive lease on one object, with fencing. A courtesy wherever it is used: a job output's
"one job at a time" and the registry's "one retrain training at a time" (`AdapterRegistry
.training_lease`) refuse a second comer early, but no decision depends on a lease: a job's rows
are committed exactly once by the table's commits, and production moves only by a conditional
commit (`grounding.registry`).

The lease object holds ``{"owner", "seq", "until", "acquired"}``. Every change goes through
`grounding.atomic`:

* **Take**: exclusive create; or, when the holder's lease expired (or its process on this host is
  gone), a compare-and-swap from exactly the stale record read: two waiters can never both win.
* **Renew**: a compare-and-swap from the holder's own last token, from a heartbeat thread every
  ``lease_s / 3``. A swap that loses (someone took it over) marks the lease *lost* at once; an
  error (network, credentials) is retried until the lease would expire, then marks it lost. The
  thread never dies silently.
* **Fence**: `Lease.check` raises `LeaseLost` when the lease is lost or within ``margin_s`` of
  expiry; holders call it right before an irreversible step (a promotion, a job's last write).
  ``seq`` grows by one at every take-over, so records written under a lease can name it.
* **Release**: a conditional delete with the holder's own token: only the holder can release.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from grounding import atomic

log = logging.getLogger(__name__)


class LeaseHeld(RuntimeError):
    """Someone else holds the lease (the message says who and until when)."""

    def __init__(self, message: str, holder: str | None = None, left_s: float = 0.0):
        super().__init__(message)
        self.holder, self.left_s = holder, left_s


class LeaseLost(RuntimeError):
    """This process's lease was taken over or expired: it must stop before writing more."""


def dead_here(owner: str) -> bool:
    """True when ``owner`` (host:pid:tag) is a process of this host that no longer exists."""
    host, _, rest = owner.partition(":")
    pid = rest.split(":", 1)[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
        return False
    except ProcessLookupError:
        return True
    except PermissionError:
        return False


class Lease:
    """An exclusive lease on ``path`` of filesystem ``fs``; ``what`` names it in messages."""

    def __init__(self, fs, path: str, what: str, lease_s: float = 120.0,
                 margin_s: float | None = None):
        self.fs, self.path, self.what = fs, path, what
        self.lease_s = lease_s
        self.margin_s = lease_s / 4 if margin_s is None else margin_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.token: str | None = None
        self.seq = 0
        self.until = 0.0
        self.lost: str | None = None
        self.taken_over: dict | None = None  # the record a forced take-over replaced
        self._stop = threading.Event()
        self._mutex = threading.Lock()

    # ---- take ---------------------------------------------------------------------------
    def _record(self, seq: int) -> tuple[bytes, float]:
        until = time.time() + self.lease_s
        return json.dumps({"owner": self.owner, "seq": seq, "until": until,
                           "acquired": time.time()}).encode(), until

    def acquire(self, wait_s: float = 0.0, force: bool = False) -> Lease:
        """Take the lease, waiting up to ``wait_s`` for the holder; ``force`` takes it from a
        live holder (recorded in `taken_over`). Raises `LeaseHeld` when it stays held."""
        atomic.probe(self.fs, self.path.rsplit("/", 1)[0], self.what)
        deadline = time.time() + wait_s
        while True:
            try:
                data, until = self._record(1)
                self.token = atomic.create(self.fs, self.path, data)
                self.seq, self.until = 1, until
                break
            except FileExistsError:
                pass
            try:
                data, token = atomic.read(self.fs, self.path)
                held = json.loads(data)
            except FileNotFoundError:
                continue  # released meanwhile: try to create it again
            except ValueError:  # not ours to parse: a foreign or damaged file
                raise LeaseHeld(f"{self.what}: {self.path} is not a lease record") from None
            stale = held.get("until", 0) < time.time() or dead_here(held.get("owner", ""))
            if stale or force:
                try:
                    seq = int(held.get("seq", 0)) + 1
                    data, until = self._record(seq)
                    self.token = atomic.replace(self.fs, self.path, data, token)
                    self.seq, self.until = seq, until
                    if force and not stale:
                        self.taken_over = held
                    break
                except atomic.Conflict:
                    continue  # another waiter took it first, or the holder renewed
            if time.time() >= deadline:
                left = max(0, held.get("until", 0) - time.time())
                raise LeaseHeld(f"{self.what} is held by {held.get('owner')} (lease for another "
                                f"{left:.0f} s)", held.get("owner"), left)
            time.sleep(0.2 + 0.3 * (os.getpid() % 7) / 7)
        self.lost = None
        self._stop.clear()
        threading.Thread(target=self._heartbeat, daemon=True, name="lease-heartbeat").start()
        return self

    # ---- keep ---------------------------------------------------------------------------
    def renew(self) -> None:
        """Extend the lease (compare-and-swap from our own token); `LeaseLost` if it is gone."""
        with self._mutex:
            if self.lost:
                raise LeaseLost(self.lost)
            data, until = self._record(self.seq)
            try:
                self.token = atomic.replace(self.fs, self.path, data, self.token)
                self.until = until
            except atomic.Conflict:
                self.lost = f"{self.what}: the lease was taken over by another process"
                raise LeaseLost(self.lost) from None

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.renew()
            except LeaseLost as e:
                log.error("%s", e)
                return
            except Exception as e:  # noqa: BLE001 - a network blip: retry until expiry
                if time.time() > self.until - self.margin_s:
                    self.lost = f"{self.what}: could not renew the lease before it expired ({e})"
                    log.error("%s", self.lost)
                    return
                log.warning("%s: renewing the lease failed, retrying: %s", self.what, e)

    def check(self) -> None:
        """Raise `LeaseLost` unless the lease is still ours for at least ``margin_s``."""
        if self.lost:
            raise LeaseLost(self.lost)
        if time.time() > self.until - self.margin_s:
            raise LeaseLost(f"{self.what}: the lease is about to expire (renewal is failing)")

    # ---- let go -------------------------------------------------------------------------
    def release(self) -> None:
        """Give the lease back (only if it is still ours)."""
        self._stop.set()
        with self._mutex:
            if self.token is None or self.lost:
                return
            try:
                atomic.delete(self.fs, self.path, self.token)
            except atomic.Conflict:
                log.warning("%s: lease was no longer ours at release", self.what)
            self.token = None

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
