"""Which adapters a replica serves: the registry's production pointer, followed.

A `Follower` belongs to one replica. It loads an adapter into the replica's engine only after a
probe (one real generation) passed, reads the production pointer every ``poll_s`` from a
watcher thread, and swaps the default adapter with one reference assignment, so a request
reads it once on arrival and is never answered by a mix of adapters.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time

from serve.guards import ApiError

log = logging.getLogger("groundlabel.serve")


class Follower:
    """The adapters of one replica's engine, and the production adapter it serves by default.

    ``engine``/``grounder``: the replica's; ``gen_lock``: held around every engine call (vLLM is
    not re-entrant); ``swaps``/``refusals``: Prometheus counters.
    """

    def __init__(self, cfg, engine, grounder, gen_lock: threading.Lock, swaps, refusals):
        self.cfg, self.engine, self.grounder, self.gen_lock = cfg, engine, grounder, gen_lock
        self.m_swaps, self.m_refused = swaps, refusals
        self.cache = tempfile.mkdtemp(prefix="groundlabel-serve-")
        self.refused: dict[str, str] = {}
        self.production: str | None = None
        self.switched_at: float | None = None
        self.registry = None

    def start(self) -> None:
        """First read of the registry (or the adapters folder), then the watcher thread."""
        if self.cfg.registry:
            from grounding.registry import AdapterRegistry

            self.registry = AdapterRegistry(self.cfg.registry, self.cfg.storage)
            self._follow_once()
            threading.Thread(target=self._watch, daemon=True, name="registry-watch").start()
        elif self.cfg.adapters_dir:
            for d in sorted(os.scandir(self.cfg.adapters_dir), key=lambda d: d.name):
                if d.is_dir():
                    self._load_adapter(d.name, d.path)

    def _load_adapter(self, name: str, path: str) -> bool:
        """Register and probe an adapter with one real generation; refuse it if that fails."""
        from PIL import Image

        from grounding.engines.base import EngineInput

        if name in self.engine.adapters:
            return True
        try:
            self.engine.add_adapter(name, path)
            probe = EngineInput(self.grounder.prompt("the object"), Image.new("RGB", (64, 64)),
                                name)
            with self.gen_lock:
                self.engine.generate([probe])
            return True
        except Exception as e:  # noqa: BLE001 - any failure means: do not serve it
            self.engine.remove_adapter(name)
            self.refused[name] = f"{type(e).__name__}: {e}"[:300]
            self.m_refused.inc()
            log.warning("refused adapter %s: %s", name, self.refused[name])
            return False

    def _from_registry(self, name: str) -> bool:
        from grounding.registry import RegistryError

        if name in self.engine.adapters:
            return True
        if name in self.refused:
            return False
        try:
            path = self.registry.download(name, self.cache)
        except (RegistryError, OSError, ValueError) as e:
            self.refused[name] = str(e)
            return False
        return self._load_adapter(name, path)

    def _follow_once(self) -> None:
        name = self.registry.production()
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
                log.warning("registry watch failed: %s", e)

    def adapter_for(self, requested: str | None) -> str | None:
        """The adapter a request is answered by (its own, or production now), or ApiError 404."""
        if requested is None:
            return self.production
        ok = (self._from_registry(requested) if self.registry is not None
              else requested in self.engine.adapters)
        if not ok:
            why = self.refused.get(requested, "not in the registry or adapters folder")
            raise ApiError(404, "unknown_adapter", f"adapter {requested!r}: {why}")
        return requested
