"""The adapter registry: immutable, versioned LoRA adapters in object storage (or a folder),
their calibrations, and the production pointer with history and rollback, all decided by
commits to ONE Delta table (delta-rs, through `grounding.tables`), as the job output and the
reviewed-label store are.

Layout under the registry root::

    log/                       the registry's Delta table: one row per event, one commit per
                               event; the registry's whole state is this table
    adapters/<name>/<upload>/  an adapter's files, uploaded to a unique staging folder first;
                               visible only through the ``register`` event that names them

Every change is one event, committed as the table's next version (its ``event`` number is that
version) and only as that version: the commit is the conditional creation of the next log entry
(an exclusive create locally, ``PUT If-None-Match`` on S3) with delta-rs's own retries off
(``max_commit_retries=0``), so a commit built on a state that another commit changed is refused
and `grounding.tables.commit` rebuilds it from the new state, where the event's own condition
is checked again:

* ``register``: the name is not taken (two registrations of one name: one wins, and the files
  are the winner's, from its own staging folder);
* ``promote``: "production was P, now Q", refused if production is no longer P (P is what the
  caller read: a retrain's gate compared against it, or what production was when the call
  started); ``force``: unconditional, recorded with what it replaced;
* ``rollback``: the same, back to what production was before the last promotion in effect;
* ``calibration``, ``refuse``, ``pass``, ``serve-refuse``: recorded, no condition.

Every event carries an idempotency key (a Delta application transaction ``event:<key>``): a
commit whose key the table already holds is that event, answered with its number, never a
second one; a commit whose response was lost (S3 answered, the client never heard) is found
in the log by its commit id (`grounding.tables.commit`). Nothing here is a lock: a paused or
partitioned writer can only fail its commit. The one lease left, `training_lease`, keeps two
retrains from training at once to save the compute; no decision depends on it.

Names are never reused (vLLM and Ray Serve cache adapters by name):
``<prefix>-<UTC time>-<6 hex of the weights>``. Every name any caller gives (the endpoint, a
label job's ``--adapter``, the CLI) passes `check_name` here first: one path segment of
``[A-Za-z0-9._-]``, starting with a letter or digit, no ``..``, at most 100 characters, so a name
can neither leave the registry's folder nor be an alias (``./x``, ``x/``) of another.

Registries of the old layout (``adapters/<name>/meta.json``, ``events/NNN.json``,
``production.json``, ``_lock``) are read only by `migrate` (``groundlabel adapters migrate OLD
NEW``); opening one says so.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from grounding import tables
from grounding.storage import StorageOptions, filesystem, join


class RegistryError(RuntimeError):
    """The registry refused (unknown adapter, name taken, production moved, nothing to roll
    back, another retrain training)."""


class AdapterNameError(RegistryError, ValueError):
    """A name outside the rule (`check_name`): refused before any storage is touched."""


NAME_MAX = 100
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
LOG = "log"
POINTER = ("promote", "rollback")          # events that move production
NOT_EVENTS = ("register", "calibration")   # rows that `events` leaves out
COMPACT_FILES = 64                          # small files a writer leaves before compacting
PROPERTIES = {"delta.enableChangeDataFeed": "true",     # new rows since a version: cheap reads
              "delta.enableExpiredLogCleanup": "false"}  # the whole history stays readable
_UNSET = object()


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


def _schema():
    import pyarrow as pa

    return pa.schema([
        pa.field("event", pa.int64(), metadata={"doc": "event number = the table version of "
                                                "the commit that added it"}),
        pa.field("kind", pa.string(), metadata={"doc": "register | promote | rollback | "
                                                "calibration | refuse | pass | serve-refuse"}),
        pa.field("name", pa.string(), metadata={"doc": "the adapter (promote, rollback: "
                                                "production after it; null = base model)"}),
        pa.field("previous", pa.string(), metadata={"doc": "production before (promote, "
                                                    "rollback)"}),
        pa.field("key", pa.string(), metadata={"doc": "idempotency key (unique)"}),
        pa.field("at", pa.string(), metadata={"doc": "ISO 8601, UTC"}),
        pa.field("data", pa.string(), metadata={"doc": "JSON: the event's other fields"}),
    ])


def replay(events: list[dict]) -> list[str | None]:
    """Production's moves as a stack (bottom: None, the base model): a promotion pushes, a
    rollback pops. The top is production; a rollback goes to the one below it."""
    stack: list[str | None] = [None]
    for e in events:
        if e["kind"] == "promote":
            stack.append(e["name"])
        elif e["kind"] == "rollback" and len(stack) > 1:
            stack.pop()
    return stack


@dataclass
class State:
    """The registry as of one table version: everything a decision reads."""

    version: int = 0
    rows: list[dict] = field(default_factory=list)        # every event, oldest first
    adapters: dict[str, dict] = field(default_factory=dict)  # name -> its register event
    production: str | None = None
    events: list[dict] = field(default_factory=list)      # all but register and calibration
    keys: dict[str, dict] = field(default_factory=dict)   # idempotency key -> event

    @classmethod
    def of(cls, version: int, rows: list[dict]) -> State:
        s = cls(version=version, rows=rows)
        for r in rows:
            s.keys[r["key"]] = r
            if r["kind"] == "register":
                s.adapters[r["name"]] = r
            elif r["kind"] != "calibration":
                s.events.append(r)
                if r["kind"] in POINTER:
                    s.production = r["name"]
        return s


class _Done(Exception):
    """The event's key is already in the table: it happened (carries that event)."""

    def __init__(self, event: dict):
        self.event = event


# Rows read per table (immutable once committed): a poller reads only the versions since.
_ROWS: dict[tuple[str, str, str], tuple[int, list[dict]]] = {}


class AdapterRegistry:
    """Adapters, calibrations and the production pointer at ``uri`` (``s3://bucket/prefix``
    or a folder)."""

    def __init__(self, uri: str, opts: StorageOptions | None = None, lease_s: float = 120.0):
        self.uri = uri.rstrip("/")
        self.opts = opts or StorageOptions()
        self.fs, self.root = filesystem(self.uri, self.opts)
        self.lease_s = lease_s
        self.log_uri = join(self.uri, LOG) if "://" in self.uri else os.path.join(self.uri, LOG)

    def _p(self, *parts: str) -> str:
        return join(self.root, *parts)

    # -- the table -------------------------------------------------------------------------
    def _table(self):
        """The newest snapshot of the registry's table, or None when nothing was written yet
        (RegistryError for a registry of the old layout)."""
        try:
            return tables.latest(self.log_uri, self.opts)
        except FileNotFoundError:
            if _old_layout(self.fs, self.root):
                raise RegistryError(
                    f"{self.uri} is an adapter registry of the old layout (meta.json, events/, "
                    "production.json); convert it with `groundlabel adapters migrate "
                    f"{self.uri} NEW` and use NEW") from None
            return None

    def _rows(self, dtable) -> list[dict]:
        """Every event in the snapshot ``dtable``, oldest first. Read whole (the snapshot's
        files: few, as writers compact them) the first time in a process; afterwards only the
        versions since, from the change data feed (committed rows never change)."""
        import pyarrow as pa

        # The table's id too: a registry deleted and made again at the same place is another
        # table, whose rows were never read here.
        key = (tables.table_uri(self.log_uri), dtable.metadata().id,
               json.dumps(self.opts.model_dump(), sort_keys=True))
        v = dtable.version()
        cached = _ROWS.get(key)
        names = _schema().names
        if cached is None or cached[0] > v:
            # delta-rs's own query engine (`tables.read_all`), not to_pyarrow_table, which can
            # abort the interpreter at exit.
            t = tables.read_all(dtable, names) if v else None
            raw = [] if t is None else t.to_pylist()
        elif v > cached[0]:
            t = pa.table(dtable.load_cdf(starting_version=cached[0] + 1, ending_version=v))
            # Only inserts: rows are never updated nor deleted (a compaction adds no change).
            raw = [r for r in t.select([*names, "_change_type"]).to_pylist()
                   if r.pop("_change_type") == "insert"]
        else:
            return cached[1]
        new = sorted((dict(json.loads(r.pop("data") or "{}"), **r) for r in raw),
                     key=lambda r: r["event"])
        rows = new if cached is None or cached[0] > v else cached[1] + new
        if cached is None or cached[0] <= v:
            _ROWS[key] = (v, rows)
        return rows

    def state(self) -> State:
        """The registry as of its newest version (one snapshot: adapters, events and
        production always agree)."""
        dtable = self._table()
        if dtable is None:
            return State()
        return State.of(dtable.version(), self._rows(dtable))

    def _writable(self):
        from grounding import atomic

        if self._table() is None:
            atomic.probe(self.fs, self.root, f"adapter registry {self.uri}")
            tables.create(self.log_uri, _schema(), self.opts,
                          description=f"groundlabel adapter registry {self.uri}",
                          configuration=PROPERTIES, record={"kind": "create"})

    def _write(self, dtable, data, props) -> None:
        """The write of one commit (a seam: tests pause a writer here)."""
        from deltalake import write_deltalake

        write_deltalake(dtable, data, mode="append", commit_properties=props)

    def _append(self, kind: str, build, key: str | None = None) -> dict:
        """Commit one event as the table's next version; returns it (with its ``event``).

        ``build(state)`` gives the event's fields (``name``, ``previous``, anything else) from
        the state the commit is built on, or raises RegistryError when the event's condition
        fails there. It runs again on the new state whenever another commit got in first. An
        event whose ``key`` is already in the table is returned as it was committed."""
        import pyarrow as pa
        from deltalake import CommitProperties

        self._writable()
        key = key or f"{kind}:{uuid.uuid4().hex}"
        app = f"event:{key}"
        row: dict = {}

        def check(dtable) -> None:
            state = State.of(dtable.version(), self._rows(dtable))
            if key in state.keys:
                raise _Done(state.keys[key])
            fields = dict(build(state))
            row.clear()
            row.update(kind=kind, name=fields.pop("name", None),
                       previous=fields.pop("previous", None), key=key,
                       at=fields.pop("at", None) or _now(),
                       data=json.dumps(fields, default=str))

        def do(dtable, props) -> None:
            # The event number is the version this commit creates, and only that one.
            row["event"] = dtable.version() + 1
            self._write(dtable, pa.Table.from_pylist([row], schema=_schema()),
                        CommitProperties(custom_metadata=props.custom_metadata,
                                         app_transactions=props.app_transactions,
                                         max_commit_retries=0))

        try:
            done = tables.commit(self.log_uri, self.opts, do,
                                 record={"kind": kind, "key": key},
                                 txns=lambda dtable: {app: 1}, check=check, tries=60)
        except _Done as d:
            return d.event
        except tables.TableConflict as e:
            raise RegistryError(f"adapter registry {self.uri}: {e}") from None
        out = dict(json.loads(row["data"]), **{k: v for k, v in row.items() if k != "data"})
        out["event"] = done.version
        self._compact()
        return out

    def _compact(self) -> None:
        """One event is one small file: past ``COMPACT_FILES`` files, rewrite them as one
        (delta-rs OPTIMIZE: a commit that changes no data, so events and the change data feed
        are untouched), so that a new process reads the registry in a few requests. Best
        effort: a concurrent commit makes it fail harmlessly, and the next writer tries again.
        The old files stay (never VACUUM a registry: its history must stay readable)."""
        import logging

        try:
            dtable = tables.latest(self.log_uri, self.opts)
            if len(dtable.file_uris()) > COMPACT_FILES:
                dtable.optimize.compact()
        except Exception as e:  # noqa: BLE001 - only slower reads until the next try
            logging.getLogger(__name__).info("registry %s: compaction skipped: %s", self.uri, e)

    # -- adapters ------------------------------------------------------------------------
    def new_name(self, adapter_dir: str | Path, prefix: str = "gl") -> str:
        """A fresh, never-used name for the adapter in ``adapter_dir``."""
        h = hashlib.sha256()
        for f in sorted(Path(adapter_dir).glob("*.safetensors")):
            h.update(f.read_bytes())
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
        return f"{prefix}-{stamp}-{h.hexdigest()[:6]}"

    def register(self, adapter_dir: str | Path, meta: dict, name: str | None = None,
                 key: str | None = None) -> str:
        """Upload an adapter folder under a new immutable name; returns the name.

        ``meta``: metrics, snapshot version of the reviewed labels, base model, recipe (stored
        with the adapter along with its name and time). The files go to a staging folder of
        their own; the ``register`` commit names them, and is refused if the name is taken
        (then the staged files are removed).
        """
        from grounding.engines.base import check_adapter_dir

        check_adapter_dir(str(adapter_dir))  # a folder vLLM/peft can load, or a clear error
        name = check_name(name if name is not None else self.new_name(adapter_dir))
        if name in self.state().adapters:  # early, before uploading: the commit decides
            raise RegistryError(f"adapter name {name!r} is taken: names are never reused")
        self._writable()
        upload = uuid.uuid4().hex[:12]
        rel = f"adapters/{name}/{upload}"
        self.fs.makedirs(self._p(rel), exist_ok=True)
        files = {}
        for f in sorted(Path(adapter_dir).iterdir()):
            # A folder from `download` holds the meta.json of the adapter it was: not this one's.
            if f.is_file() and f.name != "meta.json":
                self.fs.put_file(str(f), self._p(rel, f.name))
                files[f.name] = f.stat().st_size

        def build(state: State) -> dict:
            if name in state.adapters:
                raise RegistryError(f"adapter name {name!r} is taken: names are never reused")
            return dict(meta, name=name, registered_at=_now(), files=files, path=rel)

        try:
            self._append("register", build, key or f"register:{name}:{upload}")
        except RegistryError:
            self.fs.rm(self._p(rel), recursive=True)  # staged, never named: nobody reads it
            raise
        return name

    def exists(self, name: str) -> bool:
        return check_name(name) in self.state().adapters

    def show(self, name: str, state: State | None = None) -> dict:
        """The adapter's record: its meta plus ``name``, ``registered_at``, ``event`` (of its
        registration), ``path`` and ``files`` (its staged folder and file sizes)."""
        state = state or self.state()
        row = state.adapters.get(check_name(name))
        if row is None:
            known = ", ".join(list(state.adapters)[-5:]) or "none"
            raise RegistryError(f"no adapter {name!r} in {self.uri} (latest: {known})")
        return {k: v for k, v in row.items() if k not in ("kind", "previous", "key", "at")}

    def list(self) -> list[dict]:
        """Every registered adapter, oldest first."""
        state = self.state()
        return sorted((self.show(n, state) for n in state.adapters),
                      key=lambda m: (m["registered_at"], m["name"]))

    def names(self) -> set[str]:
        """Names of every registered adapter."""
        return set(self.state().adapters)

    def download(self, name: str, cache_dir: str | Path) -> str:
        """The adapter's files in a local folder (``cache_dir/name``, with its record as
        meta.json), for vLLM/peft."""
        meta = self.show(name)
        dest = Path(cache_dir) / name
        if (dest / "meta.json").is_file():
            return str(dest)  # immutable: a cached copy is always current
        tmp = Path(cache_dir) / f".{name}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        for f, size in meta["files"].items():
            self.fs.get_file(self._p(meta["path"], f), str(tmp / f))
            if (tmp / f).stat().st_size != size:
                shutil.rmtree(tmp, ignore_errors=True)
                raise RegistryError(f"adapter {name}: {f} in {meta['path']} is not the file "
                                    f"registered ({size} bytes)")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.rename(tmp, dest)
        except OSError:  # another process cached it first: same immutable files
            shutil.rmtree(tmp, ignore_errors=True)
        return str(dest)

    # -- calibrations ----------------------------------------------------------------------
    def save_calibration(self, cal) -> str:
        """Record a `grounding.calibration.Calibration` (it is in force for its key until a
        newer one is saved); returns a reference ``<registry>#event=<n>``. The adapter must be
        registered (base-model calibrations need no adapter)."""
        def build(state: State) -> dict:
            if cal.key.adapter:
                self.show(cal.key.adapter, state)
            return {"name": cal.key.adapter, "digest": cal.key.digest(),
                    "calibration": cal.model_dump(mode="json")}

        ev = self._append("calibration", build)
        return f"{self.uri}#event={ev['event']}"

    def calibration(self, key):
        """The newest `Calibration` for ``key`` (model + adapter + prompt version), or None."""
        from grounding.calibration import Calibration

        digest = key.digest()
        for r in reversed(self.state().rows):
            if r["kind"] == "calibration" and r["name"] == key.adapter \
                    and r["digest"] == digest:
                cal = Calibration.model_validate(r["calibration"])
                return cal if cal.key == key else None
        return None

    # -- production pointer ----------------------------------------------------------------
    def production(self) -> str | None:
        """Name of the adapter in production (None: the base model)."""
        return self.state().production

    def events(self) -> list[dict]:
        """Every promotion, rollback and recorded decision, oldest first (registrations and
        calibrations are in `state().rows`)."""
        return self.state().events

    def record(self, kind: str, key: str | None = None, **fields) -> int:
        """Record a decision (e.g. a refused promotion) without moving the pointer."""
        if kind in POINTER + NOT_EVENTS:
            raise ValueError(f"{kind!r} events are made by their own methods")
        return self._append(kind, lambda _: fields, key)["event"]

    def promote(self, name: str, reason: str = "manual", metrics: dict | None = None, *,
                expected=_UNSET, force: bool = False, key: str | None = None) -> int:
        """Point production at ``name``: one commit, "production was ``expected``, now
        ``name``", refused (RegistryError) if production is no longer ``expected`` when it
        commits. ``expected`` defaults to production as this call first reads it; a retrain
        passes the production its gate compared against. ``force``: unconditional, recorded
        with what it replaced. ``key``: the idempotency key (a retried call with the same key
        is the same event). Returns the event number."""
        check_name(name)
        seen: list = [] if expected is _UNSET else [expected]

        def build(state: State) -> dict:
            self.show(name, state)
            if not seen:
                seen.append(state.production)
            if not force and state.production != seen[0]:
                raise RegistryError(_moved(seen[0], state.production, f"promoting {name}"))
            return {"name": name, "previous": state.production, "reason": reason,
                    "metrics": metrics, "forced": force,
                    **({"expected": seen[0]} if not force else {})}

        return self._append("promote", build, key)["event"]

    def rollback(self, reason: str = "manual", *, expected=_UNSET, force: bool = False,
                 key: str | None = None) -> str | None:
        """Undo the last promotion still in effect: production goes back to what it was
        before (None = the base model). Conditional like `promote`. Returns the new
        production name."""
        seen: list = [] if expected is _UNSET else [expected]

        def build(state: State) -> dict:
            if not seen:
                seen.append(state.production)
            if not force and state.production != seen[0]:
                raise RegistryError(_moved(seen[0], state.production, "rolling back"))
            stack = replay(state.events)
            if len(stack) < 2 or stack[-1] != state.production:
                raise RegistryError("nothing to roll back: no promotion left to undo")
            return {"name": stack[-2], "previous": state.production, "reason": reason,
                    "forced": force}

        return self._append("rollback", build, key)["name"]

    # -- a courtesy between retrains -------------------------------------------------------
    @contextmanager
    def training_lease(self, wait_s: float = 0.0):
        """Keep two retrains from training at once (the compute of one is wasted otherwise):
        a lease (`grounding.lease`) held from training to promotion. Nothing depends on it: a
        retrain that lost it, or never had it, still promotes only if production is what its
        gate compared against. RegistryError when another retrain holds it."""
        from grounding.lease import Lease, LeaseHeld

        lease = Lease(self.fs, self._p("_training"), f"adapter registry {self.uri}",
                      self.lease_s)
        self.fs.makedirs(self.root, exist_ok=True)
        try:
            lease.acquire(wait_s)
        except LeaseHeld as e:
            raise RegistryError(f"another retrain on {self.uri} is training ({e.holder}, for "
                                f"another {e.left_s:.0f} s at most)") from None
        try:
            yield lease
        finally:
            lease.release()


def _moved(expected, now, doing: str) -> str:
    show = lambda n: n or "the base model"  # noqa: E731
    return (f"production moved from {show(expected)} to {show(now)} since it was read: not "
            f"{doing} (check `groundlabel adapters list` and decide again, or --force)")


# -- the old layout, read only to migrate it ------------------------------------------------
def _old_layout(fs, root: str) -> bool:
    try:
        fs.invalidate_cache(root)
    except Exception:  # noqa: BLE001 - a cache miss is only slower
        pass
    if fs.exists(join(root, "production.json")) or fs.exists(join(root, "events")):
        return True
    try:
        return bool(fs.glob(join(root, "adapters", "*", "meta.json")))
    except FileNotFoundError:
        return False


def _old_json(fs, folder: str) -> list[tuple[str, dict]]:
    """(path, record) of every ``*.json`` in ``folder``, in name order."""
    if not fs.exists(folder):
        return []
    return [(p, json.loads(fs.cat_file(p))) for p in sorted(fs.ls(folder, detail=False))
            if p.endswith(".json")]


def read_old(uri: str, opts: StorageOptions | None = None) -> dict:
    """Everything an old-layout registry holds: ``adapters`` (meta.json records, oldest
    first), ``calibrations`` ((owner, digest, file, record) in order), ``events`` and
    ``production``."""
    fs, root = filesystem(uri.rstrip("/"), opts)
    if not _old_layout(fs, root):
        raise RegistryError(f"{uri}: no registry of the old layout there")
    fs.invalidate_cache()
    metas = []
    base = join(root, "adapters")
    if fs.exists(base):
        for d in fs.ls(base, detail=False):
            if fs.exists(join(d, "meta.json")):
                metas.append(json.loads(fs.cat_file(join(d, "meta.json"))))
    metas.sort(key=lambda m: (m["registered_at"], m["name"]))
    cals = []
    cbase = join(root, "calibration")
    if fs.exists(cbase):
        for owner in sorted(fs.ls(cbase, detail=False)):
            for digest in sorted(fs.ls(owner, detail=False)):
                for path, rec in _old_json(fs, digest):
                    cals.append((owner.rsplit("/", 1)[-1], digest.rsplit("/", 1)[-1],
                                 path.rsplit("/", 1)[-1], rec))
    events = [e for _, e in _old_json(fs, join(root, "events"))]
    prod = None
    if fs.exists(join(root, "production.json")):
        prod = json.loads(fs.cat_file(join(root, "production.json"))).get("name")
    return {"adapters": metas, "calibrations": cals, "events": events, "production": prod,
            "fs": fs, "root": root}


def migrate(old: str, new: str, opts: StorageOptions | None = None) -> dict:
    """Convert the old-layout registry at ``old`` into a registry at ``new``: every adapter
    (its files and meta, ``registered_at`` kept), every calibration (in order, so the newest is
    still in force), every event (in order, its time kept, ``migrated_from``: its old number),
    and production as it was. Resumable and idempotent: each piece is an event with the key
    ``migrate:...``, so a rerun skips what is there and goes on.

    If the old production pointer disagrees with its own events (the lease-era defects could
    leave it so), a last forced promotion, recorded as such, sets production to what the old
    pointer said."""
    from grounding.calibration import Calibration

    src = read_old(old, opts)
    fs, root = src["fs"], src["root"]
    reg = AdapterRegistry(new, opts)
    if tables.table_uri(reg.log_uri) == tables.table_uri(join(old.rstrip("/"), LOG)):
        raise RegistryError(f"{old} and {new} are the same place: migrate into a new location")
    foreign = [r for r in reg.state().rows if not str(r["key"]).startswith("migrate:")]
    if foreign:
        raise RegistryError(f"{new} already holds a registry that is not a migration of {old} "
                            f"(event {foreign[0]['event']}: {foreign[0]['kind']})")
    counts = {"adapters": 0, "calibrations": 0, "events": 0}
    for meta in src["adapters"]:
        name = meta["name"]
        key = f"migrate:adapter:{name}"
        if key in reg.state().keys:
            continue
        upload = f"migrated-{uuid.uuid4().hex[:8]}"
        rel = f"adapters/{name}/{upload}"
        reg.fs.makedirs(reg._p(rel), exist_ok=True)
        files = {}
        folder = join(root, "adapters", name)
        for p in sorted(fs.ls(folder, detail=False)):
            fname = p.rsplit("/", 1)[-1]
            if fname == "meta.json" or not fs.isfile(p):
                continue
            data = fs.cat_file(p)
            reg.fs.pipe_file(reg._p(rel, fname), data)
            files[fname] = len(data)
        record = {k: v for k, v in meta.items() if k not in ("files", "path")}
        reg._append("register", lambda _s, r=record, f=files, p=rel: dict(
            r, files=f, path=p, migrated_from={"registry": old}), key)
        counts["adapters"] += 1
    for owner, digest, fname, rec in src["calibrations"]:
        key = f"migrate:calibration:{owner}/{digest}/{fname}"
        if key in reg.state().keys:
            continue
        cal = Calibration.model_validate(rec)
        fields = {"name": cal.key.adapter, "digest": digest,
                  "calibration": cal.model_dump(mode="json"),
                  "migrated_from": {"file": f"calibration/{owner}/{digest}/{fname}"}}
        reg._append("calibration", lambda _s, f=fields: dict(f), key)
        counts["calibrations"] += 1
    for e in src["events"]:
        key = f"migrate:event:{e.get('event')}"
        if key in reg.state().keys:
            continue
        fields = {k: v for k, v in e.items() if k != "event"}
        fields["migrated_from"] = {"event": e.get("event")}
        kind = fields.pop("kind")
        reg._append(kind, lambda _s, f=fields: dict(f), key)
        counts["events"] += 1
    state = reg.state()
    if state.production != src["production"]:
        target = src["production"]
        reg._append("promote", lambda s: {
            "name": target, "previous": s.production, "forced": True,
            "reason": "migrate: the old production.json named it"}, "migrate:production")
        state = reg.state()
    return {"from": old, "to": new, **counts, "production": state.production,
            "version": state.version}
