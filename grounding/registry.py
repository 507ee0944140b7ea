"""The adapter registry: immutable, versioned LoRA adapters in object storage (or a folder),
and an atomic "production" pointer with history and rollback.

Layout under the registry root::

    adapters/<name>/adapter_model.safetensors, adapter_config.json, ...   the adapter files
    adapters/<name>/meta.json     written LAST with an exclusive create: an adapter exists
                                  iff its meta.json does, so a crash mid-upload leaves nothing
                                  visible, and a name can never be taken twice
    events/00000001.json ...      every promotion, refusal and rollback, in order (exclusive
                                  create: concurrent writers each get their own number)
    calibration/<adapter|_base>/<model+prompt digest>/00000001.json ...
                                  calibrations (`grounding.calibration`) of the adapter (or
                                  the base model) for one model + prompt version; each refit is
                                  the next number (exclusive create), the newest is in force
    production.json               the pointer: {"name": ..., "event": N}, one atomic PUT
    _lock                         the lock (`grounding.lease`): held by a retrain from training
                                  to promotion and by every promotion and rollback; renewed by
                                  compare-and-swap, taken over atomically when stale, checked
                                  right before the pointer moves (a holder that lost it stops)

Every exclusive create and compare-and-swap goes through `grounding.atomic` (``os.link`` /
``flock`` on a folder, conditional PUTs on S3); a store that ignores conditional writes is
refused before the first write.

Names are never reused (vLLM and Ray Serve cache adapters by name):
``<prefix>-<UTC time>-<6 hex of the weights>``. Every name any caller gives (the endpoint, a
label job's ``--adapter``, the CLI) passes `check_name` here first: one path segment of
``[A-Za-z0-9._-]``, starting with a letter or digit, no ``..``, at most 100 characters, so a name
can neither leave the registry's folder nor be an alias (``./x``, ``x/``) of another.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import uuid
from contextlib import contextmanager
from pathlib import Path

from grounding import atomic
from grounding.lease import Lease, LeaseHeld, LeaseLost
from grounding.storage import StorageOptions, filesystem, join


class RegistryError(RuntimeError):
    """The registry refused (unknown adapter, name taken, lock held, nothing to roll back)."""


class AdapterNameError(RegistryError, ValueError):
    """A name outside the rule (`check_name`): refused before any storage is touched."""


NAME_MAX = 100
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_name(name) -> str:
    """``name`` when it follows the one rule for adapter names, else AdapterNameError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name \
            or len(name) > NAME_MAX:
        shown = repr(name)[:60]
        raise AdapterNameError(f"bad adapter name {shown}: 1-{NAME_MAX} characters of A-Z a-z "
                               "0-9 . _ -, starting with a letter or digit, without '..'")
    return name


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class AdapterRegistry:
    """Adapters and the production pointer at ``uri`` (``s3://bucket/prefix`` or a folder)."""

    def __init__(self, uri: str, opts: StorageOptions | None = None, lease_s: float = 120.0):
        self.uri = uri.rstrip("/")
        self.opts = opts or StorageOptions()
        self.fs, self.root = filesystem(self.uri, self.opts)
        self.lease_s = lease_s

    def _p(self, *parts: str) -> str:
        return join(self.root, *parts)

    # -- adapters ------------------------------------------------------------------------
    def new_name(self, adapter_dir: str | Path, prefix: str = "gl") -> str:
        """A fresh, never-used name for the adapter in ``adapter_dir``."""
        h = hashlib.sha256()
        for f in sorted(Path(adapter_dir).glob("*.safetensors")):
            h.update(f.read_bytes())
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
        return f"{prefix}-{stamp}-{h.hexdigest()[:6]}"

    def register(self, adapter_dir: str | Path, meta: dict, name: str | None = None) -> str:
        """Upload an adapter folder under a new immutable name; returns the name.

        ``meta``: metrics, snapshot version of the reviewed labels, base model, recipe (stored
        with the adapter along with its name and time).
        """
        from grounding.engines.base import check_adapter_dir

        check_adapter_dir(str(adapter_dir))  # a folder vLLM/peft can load, or a clear error
        atomic.probe(self.fs, self.root, f"adapter registry {self.uri}")
        name = check_name(name if name is not None else self.new_name(adapter_dir))
        if self.exists(name):
            raise RegistryError(f"adapter name {name!r} is taken: names are never reused")
        dest = self._p("adapters", name)
        self.fs.makedirs(dest, exist_ok=True)
        for f in sorted(Path(adapter_dir).iterdir()):
            # A folder from `download` holds the meta.json of the adapter it was: not this one's
            # (and uploading it would take the name's exclusive create).
            if f.is_file() and f.name != "meta.json":
                self.fs.put_file(str(f), join(dest, f.name))
        record = dict(meta, name=name, registered_at=_now())
        try:
            atomic.create(self.fs, join(dest, "meta.json"), json.dumps(record, indent=2).encode())
        except FileExistsError:
            raise RegistryError(f"adapter name {name!r} is taken: names are never reused") from None
        return name

    def exists(self, name: str) -> bool:
        return self.fs.exists(self._p("adapters", check_name(name), "meta.json"))

    def show(self, name: str) -> dict:
        path = self._p("adapters", check_name(name), "meta.json")
        if not self.fs.exists(path):
            known = ", ".join(a["name"] for a in self.list()[-5:]) or "none"
            raise RegistryError(f"no adapter {name!r} in {self.uri} (latest: {known})")
        return json.loads(self.fs.cat_file(path))

    def list(self) -> list[dict]:
        """Every registered adapter (with meta.json), oldest first."""
        base = self._p("adapters")
        if not self.fs.exists(base):
            return []
        self.fs.invalidate_cache(base)
        out = []
        for d in self.fs.ls(base, detail=False):
            meta = join(d, "meta.json")
            if self.fs.exists(meta):
                out.append(json.loads(self.fs.cat_file(meta)))
        return sorted(out, key=lambda m: (m["registered_at"], m["name"]))

    def names(self) -> set[str]:
        """Names of every registered adapter, from ONE listing of the adapters folder (no
        meta.json reads: `list` costs about two requests per adapter, this one in all)."""
        base = self._p("adapters")
        self.fs.invalidate_cache(base)
        try:
            files = self.fs.find(base)
        except FileNotFoundError:
            return set()
        prefix = base.rstrip("/") + "/"
        out = set()
        for f in files:
            rel = f[len(prefix):] if f.startswith(prefix) else ""
            parts = rel.split("/")
            if len(parts) == 2 and parts[1] == "meta.json":  # an adapter exists iff meta.json
                out.add(parts[0])
        return out

    def download(self, name: str, cache_dir: str | Path) -> str:
        """The adapter's files in a local folder (``cache_dir/name``), for vLLM/peft."""
        self.show(name)
        dest = Path(cache_dir) / name
        if (dest / "meta.json").is_file():
            return str(dest)  # immutable: a cached copy is always current
        tmp = Path(cache_dir) / f".{name}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        src = self._p("adapters", name)
        for f in self.fs.ls(src, detail=False):
            if f.endswith("/meta.json"):
                continue
            self.fs.get_file(f, str(tmp / f.rsplit("/", 1)[-1]))
        self.fs.get_file(join(src, "meta.json"), str(tmp / "meta.json"))
        try:
            os.rename(tmp, dest)
        except OSError:  # another process cached it first: same immutable files
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        return str(dest)

    # -- calibrations ----------------------------------------------------------------------
    def _cal_dir(self, key) -> str:
        owner = check_name(key.adapter) if key.adapter else "_base"
        return self._p("calibration", owner, key.digest())

    def save_calibration(self, cal) -> str:
        """Store a `grounding.calibration.Calibration` as its key's next version; returns its
        path. The adapter must be registered (base-model calibrations need no adapter)."""
        if cal.key.adapter:
            self.show(cal.key.adapter)
        atomic.probe(self.fs, self.root, f"adapter registry {self.uri}")
        d = self._cal_dir(cal.key)
        self.fs.makedirs(d, exist_ok=True)
        n = len(self._cal_files(d)) + 1
        while True:
            path = join(d, f"{n:08d}.json")
            try:
                atomic.create(self.fs, path, cal.model_dump_json(indent=1).encode())
                return path
            except FileExistsError:
                n += 1

    def _cal_files(self, d: str) -> list[str]:
        if not self.fs.exists(d):
            return []
        self.fs.invalidate_cache(d)
        return sorted(p for p in self.fs.ls(d, detail=False) if p.endswith(".json"))

    def calibration(self, key):
        """The newest `Calibration` for ``key`` (model + adapter + prompt version), or None."""
        from grounding.calibration import Calibration

        files = self._cal_files(self._cal_dir(key))
        if not files:
            return None
        cal = Calibration.model_validate_json(self.fs.cat_file(files[-1]))
        return cal if cal.key == key else None

    # -- production pointer ----------------------------------------------------------------
    def production(self) -> str | None:
        """Name of the adapter in production (None: the base model)."""
        path = self._p("production.json")
        if not self.fs.exists(path):
            return None
        self.fs.invalidate_cache(path)
        return json.loads(self.fs.cat_file(path)).get("name")

    def events(self) -> list[dict]:
        base = self._p("events")
        if not self.fs.exists(base):
            return []
        self.fs.invalidate_cache(base)
        return [json.loads(self.fs.cat_file(p))
                for p in sorted(self.fs.ls(base, detail=False)) if p.endswith(".json")]

    def _event(self, record: dict) -> int:
        atomic.probe(self.fs, self.root, f"adapter registry {self.uri}")
        self.fs.makedirs(self._p("events"), exist_ok=True)
        n = len(self.events()) + 1
        while True:
            rec = dict(record, event=n, at=_now())
            try:
                atomic.create(self.fs, self._p("events", f"{n:08d}.json"),
                              json.dumps(rec).encode())
                return n
            except FileExistsError:
                n += 1

    def _set_production(self, name: str | None, event: int) -> None:
        # One object, one PUT (S3) / one rename (local): readers see the old or the new pointer.
        data = json.dumps({"name": name, "event": event, "at": _now()}).encode()
        path = self._p("production.json")
        if self.fs.protocol in ("file", "local") or "file" in self.fs.protocol:
            tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
            self.fs.pipe_file(tmp, data)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def record(self, kind: str, **fields) -> int:
        """Record a decision (e.g. a refused promotion) without moving the pointer."""
        return self._event(dict(fields, kind=kind))

    def promote(self, name: str, reason: str = "manual", metrics: dict | None = None,
                wait_s: float = 0.0, force: bool = False) -> int:
        """Point production at ``name`` (under the lock, waiting up to ``wait_s`` for it, or
        taking it with ``force``); returns the event number."""
        check_name(name)  # before the lock: a bad name touches nothing
        with self.lock(wait_s, force) as lease:
            return self.promote_locked(name, reason, lease, metrics)

    def promote_locked(self, name: str, reason: str, lease: Lease,
                       metrics: dict | None = None) -> int:
        """`promote` for a caller holding ``lease`` (a retrain holds it throughout)."""
        self.show(name)
        prev = self.production()
        self._fence(lease)
        n = self._event({"kind": "promote", "name": name, "previous": prev,
                         "reason": reason, "metrics": metrics, "lease": lease.seq})
        self._fence(lease)
        self._set_production(name, n)
        return n

    def _fence(self, lease: Lease) -> None:
        """Stop before an irreversible step if the lock is no longer ours."""
        try:
            lease.check()
        except LeaseLost as e:
            raise RegistryError(f"{e}: not moving the production pointer") from None

    def rollback(self, reason: str = "manual", wait_s: float = 0.0,
                 force: bool = False) -> str | None:
        """Undo the last promotion still in effect: production goes back to what it was
        before (None = the base model). Returns the new production name."""
        with self.lock(wait_s, force) as lease:
            return self.rollback_locked(reason, lease)

    def rollback_locked(self, reason: str, lease: Lease) -> str | None:
        """`rollback` for a caller holding ``lease``."""
        cur = self.production()
        # Replay the pointer's moves as a stack: a promotion pushes, a rollback pops, so
        # rolling back twice undoes the last two promotions.
        stack: list[str | None] = [None]
        for e in self.events():
            if e["kind"] == "promote":
                stack.append(e["name"])
            elif e["kind"] == "rollback" and len(stack) > 1:
                stack.pop()
        if len(stack) < 2 or stack[-1] != cur:
            raise RegistryError("nothing to roll back: no promotion left to undo")
        target = stack[-2]
        self._fence(lease)
        n = self._event({"kind": "rollback", "name": target, "previous": cur,
                         "reason": reason, "lease": lease.seq})
        self._fence(lease)
        self._set_production(target, n)
        return target

    # -- lock ----------------------------------------------------------------------------
    @contextmanager
    def lock(self, wait_s: float = 0.0, force: bool = False):
        """Hold the registry lock for the ``with`` block; yields the `Lease`.

        Waits up to ``wait_s`` for another holder; ``force`` takes the lock from a live holder
        and records that as a ``force-unlock`` event. The holder renews its lease from a
        heartbeat; a crashed holder's lock expires within ``lease_s`` (at once when its process
        on this host is gone). Raises RegistryError when the lock stays held.
        """
        lease = Lease(self.fs, self._p("_lock"), f"adapter registry {self.uri}", self.lease_s)
        self.fs.makedirs(self.root, exist_ok=True)
        try:
            lease.acquire(wait_s, force)
        except LeaseHeld as e:
            raise RegistryError(f"registry {self.uri} is locked by {e.holder} for another "
                                f"{e.left_s:.0f} s (another retrain or promotion is running; "
                                "wait longer or use --force)") from None
        try:
            if lease.taken_over:
                self._event({"kind": "force-unlock", "previous_holder": lease.taken_over,
                             "lease": lease.seq})
            yield lease
        finally:
            lease.release()
