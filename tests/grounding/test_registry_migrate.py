"""``groundlabel adapters migrate OLD NEW``: a registry of the old layout (adapters/<name>/ with
meta.json, events/NNN.json, calibration/<owner>/<digest>/NNN.json, production.json, _lock),
written here file by file as the lease-era registry wrote it, becomes a registry on a Delta
table with every adapter, calibration and event kept; on a folder and on moto's S3."""

from __future__ import annotations

import json
import random
import uuid

import pytest

from grounding import calibration as C
from grounding.registry import AdapterRegistry, RegistryError, read_old
from grounding.storage import StorageOptions, filesystem, join
from groundlabel.cli import main

KEY = C.Key(model="/models/tiny-qwen3-vl", adapter=None, prompt_version="qwen3_vl:1a2b3c4d")


def _cal(seed: int, key: C.Key) -> C.Calibration:
    rng = random.Random(seed)
    data = []
    for i in range(300):
        s = rng.random() ** 0.3
        data.append(C.Outcome(item_id=f"r{i}", key=key, score=s, hit=rng.random() < s ** 2))
    return C.fit(data)


def _old_registry(uri: str, opts: StorageOptions) -> dict:
    """Three adapters, calibrations of the base (two refits) and of one adapter, and the events
    of its life: promote a, promote b, a refused candidate, a rollback, a forced unlock, promote
    c; production.json says c."""
    fs, root = filesystem(uri, opts)

    def put(rel: str, data: bytes) -> None:
        fs.makedirs(join(root, rel).rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(join(root, rel), data)

    files = {}
    for i, n in enumerate(["gl-a", "gl-b", "gl-c"]):
        f = {"adapter_config.json": json.dumps({"r": 8, "peft_type": "LORA", "i": i}).encode(),
             "adapter_model.safetensors": bytes([i + 1]) * 512, "README.md": b"card %d" % i}
        for k, v in f.items():
            put(f"adapters/{n}/{k}", v)
        put(f"adapters/{n}/meta.json", json.dumps({
            "name": n, "registered_at": f"2026-11-0{i + 1}T03:00:00+00:00",
            "snapshot_version": 10 + i, "gate": {"passed": i != 1, "reasons": []}}).encode())
        files[n] = f
    cals = [_cal(1, KEY), _cal(2, KEY), _cal(3, KEY.model_copy(update={"adapter": "gl-a"}))]
    for n, cal in enumerate(cals[:2], 1):
        put(f"calibration/_base/{KEY.digest()}/{n:08d}.json", cal.model_dump_json().encode())
    put(f"calibration/gl-a/{KEY.digest()}/00000001.json", cals[2].model_dump_json().encode())
    events = [{"kind": "promote", "name": "gl-a", "previous": None, "reason": "gate",
               "metrics": {"n": 200}, "lease": 1},
              {"kind": "promote", "name": "gl-b", "previous": "gl-a", "reason": "manual",
               "metrics": None, "lease": 2},
              {"kind": "refuse", "name": "gl-c", "production": "gl-b", "reason": "not better",
               "metrics": {"p": 0.3}},
              {"kind": "rollback", "name": "gl-a", "previous": "gl-b", "reason": "bad",
               "lease": 3},
              {"kind": "force-unlock", "previous_holder": {"owner": "h:1"}, "lease": 4},
              {"kind": "promote", "name": "gl-c", "previous": "gl-a", "reason": "manual",
               "metrics": None, "lease": 4}]
    for n, e in enumerate(events, 1):
        put(f"events/{n:08d}.json", json.dumps(dict(e, event=n,
                                                     at=f"2026-11-1{n}T00:00:00+00:00")).encode())
    put("production.json", json.dumps({"name": "gl-c", "event": 6}).encode())
    put("_lock", json.dumps({"owner": "gone:1", "until": 0}).encode())
    return {"files": files, "cals": cals, "events": events}


@pytest.fixture(params=["local", "s3"])
def places(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "old"), str(tmp_path / "new"), StorageOptions()
    import boto3

    ep = request.getfixturevalue("s3_endpoint")
    bucket = f"mig-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=ep).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/old", f"s3://{bucket}/new", StorageOptions(s3_endpoint_url=ep)


def test_migrate_keeps_every_adapter_calibration_and_event(places, tmp_path, capsys):
    old, new, opts = places
    made = _old_registry(old, opts)
    before = read_old(old, opts)
    with pytest.raises(RegistryError, match="adapters migrate"):
        AdapterRegistry(old, opts).production()           # the old layout is not read as is
    ep = ["--s3-endpoint-url", opts.s3_endpoint_url] if opts.s3_endpoint_url else []
    assert main(["adapters", "migrate", old, new, *ep]) == 0
    said = json.loads(capsys.readouterr().out)
    assert (said["adapters"], said["calibrations"], said["events"]) == (3, 3, 6)
    reg = AdapterRegistry(new, opts)
    # adapters: the same names, meta and bytes
    metas = reg.list()
    assert [m["name"] for m in metas] == ["gl-a", "gl-b", "gl-c"]
    for m, o in zip(metas, before["adapters"], strict=True):
        assert {k: m[k] for k in o} == o
        local = reg.download(m["name"], tmp_path / "cache")
        for f, data in made["files"][m["name"]].items():
            assert (tmp_path / "cache" / m["name"] / f).read_bytes() == data
    # calibrations: the newest in force, per key
    assert reg.calibration(KEY).model_dump() == made["cals"][1].model_dump()
    akey = KEY.model_copy(update={"adapter": "gl-a"})
    assert reg.calibration(akey).model_dump() == made["cals"][2].model_dump()
    # events: all of them, in order, their times and fields kept; production as it was
    got = reg.events()
    assert len(got) == len(before["events"]) == 6
    for g, o in zip(got, before["events"], strict=True):
        assert {k: g[k] for k in o if k != "event"} == {k: v for k, v in o.items()
                                                         if k != "event"}
        assert g["migrated_from"] == {"event": o["event"]}
    assert reg.production() == "gl-c"
    # a rerun (of a stopped migration, or once more) is harmless: nothing migrated twice
    assert main(["adapters", "migrate", old, new, *ep]) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["adapters"], again["calibrations"], again["events"]) == (0, 0, 0)
    assert len(reg.events()) == 6 and local
    assert reg.rollback("after migration") == "gl-a"    # the history still drives rollback
    # once in use, the new registry is no migration target any more
    assert main(["adapters", "migrate", old, new, *ep]) == 2
    assert "not a migration of" in capsys.readouterr().err


def test_migrate_refuses_a_target_holding_another_registry(tmp_path, capsys):
    opts = StorageOptions()
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    _old_registry(old, opts)
    other = tmp_path / "ad"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (other / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    AdapterRegistry(new).register(other, {}, name="someone-else")
    assert main(["adapters", "migrate", old, new]) == 2
    assert "not a migration of" in capsys.readouterr().err
