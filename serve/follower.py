"""Which adapters a replica serves: the registry's production pointer, followed.

A `Follower` belongs to one replica. It reads the registry every ``poll_s`` from a watcher
thread: the production pointer, and the set of registered names (one listing). A new adapter is
downloaded, added to the engine and probed with one real generation; only after the probe
passed is it *visible* (`adapter_for` returns it), so no request is ever routed to an adapter
whose probe has not passed. The default adapter is swapped with one reference assignment, so a
request reads it once on arrival and is never answered by a mix of adapters.

Failures are of two kinds, handled differently:

* **I/O** (the object store or registry does not answer, a read fails half-way): retried with
  backoff (`retry`), then given up *for this poll only*; nothing is marked, the next poll tries
  again, so a store outage during a promotion delays the switch by the outage, never longer.
* **The adapter itself** (its folder fails validation, or the probe generation fails): the
  adapter is refused on this replica, removed from the engine and from the local cache, and the
  refusal recorded once as a ``serve-refuse`` event in the registry. Refusals are kept in an LRU
  of ``REFUSED_MAX`` names (an evicted one is probed again when next named).

A request naming an adapter costs no storage call unless the adapter is registered and not yet
loaded: a malformed name is a 422 (`check_name`), a name not in the cached listing a 404 without
I/O. An adapter registered since the last poll is therefore unknown (404) for up to ``poll_s``.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

from serve.guards import ApiError

log = logging.getLogger("groundlabel.serve")
T = TypeVar("T")
REFUSED_MAX = 256


class AdapterRefused(Exception):
    """The adapter itself is bad (validation or probe failed): do not serve it."""


def retry(fn: Callable[[], T], what: str, tries: int = 4, base_s: float = 0.25,
          max_s: float = 2.0, retry_on: tuple[type[BaseException], ...] = (Exception,),
          give_up_on: tuple[type[BaseException], ...] = ()) -> T:
    """``fn()``, retried up to ``tries`` times with exponential backoff (``base_s``, doubling,
    at most ``max_s``) on ``retry_on``; ``give_up_on`` is raised at once. The last error is
    raised. (The shape of Ray Serve's LoRA loader's ``retry_with_exponential_backoff``.)"""
    delay = base_s
    for attempt in range(1, tries + 1):
        try:
            return fn()
        except give_up_on:
            raise
        except retry_on as e:
            if attempt == tries:
                raise
            log.warning("%s failed (try %d/%d, again in %.2f s): %s", what, attempt, tries,
                        delay, e)
            time.sleep(delay)
            delay = min(max_s, delay * 2)
    raise AssertionError("unreachable")


class Follower:
    """The adapters of one replica's engine, and the production adapter it serves by default.

    ``engine``/``grounder``: the replica's; ``gen_lock``: held around every engine call (vLLM is
    not re-entrant); ``swaps``/``refusals``: Prometheus counters.
    """

    def __init__(self, cfg, engine, grounder, gen_lock: threading.Lock, swaps, refusals):
        self.cfg, self.engine, self.grounder, self.gen_lock = cfg, engine, grounder, gen_lock
        self.m_swaps, self.m_refused = swaps, refusals
        self.cache = tempfile.mkdtemp(prefix="groundlabel-serve-")
        self.refused: OrderedDict[str, str] = OrderedDict()  # LRU, at most REFUSED_MAX
        self.visible: frozenset[str] = frozenset()  # probed: the only names requests get
        self.known: frozenset[str] = frozenset()  # registered names at the last poll
        self.production: str | None = None
        self.switched_at: float | None = None
        self.registry = None
        # Which replica answered (host:pid): names it in responses and refusal events.
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self._load_lock = threading.Lock()  # one download+probe at a time, no double loads

    def start(self) -> None:
        """First read of the registry (or the adapters folder), then the watcher thread."""
        if self.cfg.registry:
            from grounding.registry import AdapterRegistry

            self.registry = AdapterRegistry(self.cfg.registry, self.cfg.storage)
            try:
                self._follow_once()
            except Exception as e:  # noqa: BLE001 - a store down at start: the watcher retries
                log.warning("first registry read failed, the watcher retries: %s", e)
            threading.Thread(target=self._watch, daemon=True, name="registry-watch").start()
        elif self.cfg.adapters_dir:
            for d in sorted(os.scandir(self.cfg.adapters_dir), key=lambda d: d.name):
                if d.is_dir():
                    try:
                        self._load_adapter(d.name, d.path)
                    except AdapterRefused:
                        pass

    # -- loading -------------------------------------------------------------------------
    def _refuse(self, name: str, reason: str) -> None:
        self.refused[name] = reason
        self.refused.move_to_end(name)
        while len(self.refused) > REFUSED_MAX:
            self.refused.popitem(last=False)
        self.m_refused.inc()
        log.warning("refused adapter %s: %s", name, reason)
        if self.registry is not None:
            try:
                # One event per adapter and replica, whatever the retries (its key).
                retry(lambda: self.registry.record(
                    "serve-refuse", key=f"serve-refuse:{name}:{self.replica}", name=name,
                    reason=reason, replica=self.replica), "recording a refusal")
            except Exception as e:  # noqa: BLE001 - the refusal stands; only its record is lost
                log.warning("could not record the refusal of %s: %s", name, e)

    def _load_adapter(self, name: str, path: str) -> None:
        """Add an adapter to the engine and probe it with one real generation; visible to
        requests only after that. Raises AdapterRefused (and leaves no trace) if either fails."""
        from PIL import Image

        from grounding.engines.base import EngineInput

        if name in self.visible:
            return
        try:
            self.engine.add_adapter(name, path)
            probe = EngineInput(self.grounder.prompt("the object"), Image.new("RGB", (64, 64)),
                                name)
            with self.gen_lock:
                self.engine.generate([probe])
        except Exception as e:  # noqa: BLE001 - any failure of the adapter means: do not serve it
            with self.gen_lock:  # vLLM is not re-entrant: drop it between engine calls
                self.engine.remove_adapter(name)
            if os.path.dirname(os.path.abspath(path)) == os.path.abspath(self.cache):
                shutil.rmtree(path, ignore_errors=True)  # our download, not an adapters_dir
            reason = f"{type(e).__name__}: {e}"[:300]
            self._refuse(name, reason)
            raise AdapterRefused(reason) from None
        self.visible = self.visible | {name}  # one reference swap, after the probe passed

    def _from_registry(self, name: str) -> bool:
        """Make a registered adapter visible: True when it is; False when it is refused (now or
        before). I/O errors are retried, then raised: they refuse nothing."""
        from grounding.registry import RegistryError

        if name in self.visible:
            return True
        with self._load_lock:
            if name in self.visible:  # another request or the watcher loaded it meanwhile
                return True
            if name in self.refused:
                self.refused.move_to_end(name)
                return False
            path = retry(lambda: self.registry.download(name, self.cache),
                         f"downloading adapter {name}",
                         give_up_on=(RegistryError,))  # not registered: no point retrying
            try:
                self._load_adapter(name, path)
            except AdapterRefused:
                return False
            return True

    def _follow_once(self) -> None:
        self.known = frozenset(retry(self.registry.names, "listing the registry"))
        name = retry(self.registry.production, "reading the production pointer")
        if name == self.production:
            return
        if name is None or self._from_registry(name):
            self.production = name  # one reference swap: requests read it once on arrival
            self.switched_at = time.time()
            self.m_swaps.inc()
            log.warning("serving adapter %s", name)

    def _watch(self) -> None:
        while True:
            time.sleep(self.cfg.poll_s)
            try:
                self._follow_once()
            except Exception as e:  # noqa: BLE001 - a registry hiccup must not stop the watcher
                log.warning("registry watch failed, next poll tries again: %s", e)

    # -- requests ------------------------------------------------------------------------
    def adapter_for(self, requested: str | None) -> str | None:
        """The adapter a request is answered by (its own, or production now), or ApiError:
        422 for a malformed name, 404 unknown or refused, 503 when the store does not answer."""
        from grounding.registry import AdapterNameError, RegistryError, check_name

        if requested is None:
            return self.production
        try:
            check_name(requested)
        except AdapterNameError as e:
            raise ApiError(422, "invalid_adapter_name", str(e)) from None
        if requested in self.visible:
            return requested
        why = self.refused.get(requested)
        if why is None and self.registry is not None and requested in self.known:
            try:
                if self._from_registry(requested):
                    return requested
            except RegistryError:  # gone from the registry since the listing
                raise ApiError(404, "unknown_adapter",
                               f"adapter {requested!r} is not in the registry") from None
            except Exception as e:  # noqa: BLE001 - I/O after retries: try again later
                log.warning("adapter %s could not be loaded: %s", requested, e)
                raise ApiError(503, "registry_unavailable", f"adapter {requested!r} could not "
                               "be loaded now; try again") from None
            why = self.refused.get(requested)
        # The reason's text (paths, shapes, buckets) stays in the logs and the registry's events.
        raise ApiError(404, "unknown_adapter", f"adapter {requested!r} was refused (it failed "
                       "its checks or its probe)" if why else f"adapter {requested!r} is not in "
                       "the registry or adapters folder")
