"""The adapter registry: immutable names, metadata, the production pointer with rollback, on a
folder and on a real S3 endpoint (moto server). Races and faults: test_registry_commits.py."""

from __future__ import annotations

import json
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


def test_an_upload_never_committed_is_invisible(tmp_path):
    reg = _registry("local", tmp_path)
    # files staged, the register commit never made (a crash): not an adapter, name still free
    _adapter(tmp_path / "reg" / "adapters" / "half-done" / "0123abcd", 9)
    assert reg.list() == [] and not reg.exists("half-done")
    assert reg.register(_adapter(tmp_path / "a", 1), {}, name="half-done") == "half-done"
    local = reg.download("half-done", tmp_path / "cache")   # the committed upload's files
    assert (tmp_path / "cache" / "half-done" / "adapter_model.safetensors").read_bytes() == \
        bytes([1]) * 64 and local


def test_the_registry_is_a_delta_table_any_reader_reads(reg, tmp_path):
    """The events are rows of a Delta table (``<registry>/log``): every event one commit, its
    number the table version."""
    from deltalake import DeltaTable

    from grounding.tables import delta_options, read_all, table_uri

    a = reg.register(_adapter(tmp_path / "a", 1), {"snapshot_version": 2})
    reg.promote(a, reason="gate")
    dt = DeltaTable(table_uri(reg.log_uri), storage_options=delta_options(reg.log_uri, reg.opts))
    rows = sorted(read_all(dt).to_pylist(), key=lambda r: r["event"])
    assert [(r["event"], r["kind"], r["name"]) for r in rows] == [(1, "register", a),
                                                                  (2, "promote", a)]
    assert dt.version() == 2 and json.loads(rows[0]["data"])["snapshot_version"] == 2
    assert rows[1]["previous"] is None and reg.events()[0]["event"] == 2


def test_a_second_retrain_does_not_train_while_one_holds_the_training_lease(reg):
    with reg.training_lease():
        with pytest.raises(RegistryError, match="another retrain .* is training"):
            with AdapterRegistry(reg.uri, reg.opts).training_lease():
                pass
    with reg.training_lease():  # released
        pass


def test_an_old_layout_registry_is_refused_with_the_migration_command(tmp_path):
    old = tmp_path / "old"
    (old / "events").mkdir(parents=True)
    (old / "production.json").write_text(json.dumps({"name": None, "event": 0}))
    with pytest.raises(RegistryError, match="groundlabel adapters migrate"):
        AdapterRegistry(str(old)).production()


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


def test_writers_compact_the_small_files_and_every_reader_sees_the_same_events(tmp_path):
    """One event is one small file; past COMPACT_FILES a writer rewrites them as one (OPTIMIZE,
    a commit that changes no data). A reader that had read before (change data feed) and a
    new one (the snapshot) see the same events."""
    from grounding import registry as R

    reg = _registry("local", tmp_path)
    a = reg.register(_adapter(tmp_path / "a", 1), {}, name="ad-a")
    seen_before = reg.events()
    for i in range(R.COMPACT_FILES + 5):
        reg.promote(a, f"round {i}") if i % 2 == 0 else reg.rollback(f"round {i}")
    files = len(R.tables.latest(reg.log_uri).file_uris())
    assert files < R.COMPACT_FILES                      # compacted along the way
    warm = reg.events()                                 # read on top of what was read before
    R._ROWS.clear()                                     # as a new process
    cold = reg.events()
    assert warm == cold and len(cold) == R.COMPACT_FILES + 5 and seen_before == []
    assert [e["reason"] for e in cold] == [f"round {i}" for i in range(R.COMPACT_FILES + 5)]
    assert reg.production() == (a if (R.COMPACT_FILES + 5) % 2 else None)


def test_a_process_reading_the_registry_exits_cleanly(tmp_path):
    """A process that reads the registry (a user's script, `groundlabel adapters list`) gives
    its answer and exits 0. Reading a table through a pyarrow dataset (delta-rs 1.6.6's
    to_pyarrow_table) can make the interpreter abort at exit ("terminate called without an
    active exception"): a bare deltalake script did in 6 of 6 runs, the registry's first
    reader did intermittently (it crashed bench_registry's cold reads). A guard: it did not
    fail reliably on that code."""
    import subprocess
    import sys

    reg = _registry("local", tmp_path)
    a = reg.register(_adapter(tmp_path / "a", 1), {}, name="ad-a")
    for i in range(6):  # a few files: the abort came with most multi-file reads
        reg.promote(a, f"round {i}") if i % 2 == 0 else reg.rollback(f"round {i}")
    code = ("from grounding.registry import AdapterRegistry; "
            f"r = AdapterRegistry({reg.uri!r}); print(r.production(), len(r.events()))")
    for _ in range(4):
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=120)
        assert (p.returncode, p.stdout.split()) == (0, ["None", "6"]), p.stderr[-300:]
    p = subprocess.run([sys.executable, "-m", "groundlabel.cli", "adapters", "list",
                        "--registry", reg.uri], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "production: (base model)" in p.stdout, p.stderr[-300:]
