"""The bulk labeling job against real parts: local Ray, vLLM actors, moto S3, Delta tables."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.config import LabelJobConfig

pytestmark = pytest.mark.slow


def _job(**kw) -> LabelJobConfig:
    kw.setdefault("progress", False)
    kw.setdefault("batch_size", 8)
    return LabelJobConfig(**kw)


def _rows(output: str, **kw) -> list[dict]:
    from pipelines.output import JobOutput

    return JobOutput(output, kw.get("opts")).read().to_pylist()


def test_local_job_labels_every_row_and_eval_agrees(ray_local, synth_shard, tmp_path):
    from pipelines.label import label

    out = tmp_path / "out"
    s = label(_job(input=str(synth_shard), output=str(out)))
    assert s["rows"] == s["unique_rows"] == 12 and s["errors"] == {}
    rows = _rows(str(out))
    assert {r["row_id"] for r in rows} == {f"data.jsonl:{i}" for i in range(12)}
    r = rows[0]
    assert r["model"] and r["family"] == "qwen3_vl" and r["prompt_version"].startswith("qwen3_vl:")
    assert r["job_id"] and r["width"] > 0 and r["raw_text"]
    for row in rows:
        for b in row["boxes"]:
            assert 0 <= b["x1"] <= b["x2"] <= row["width"] and 0 < b["score"] <= 1
    # `groundlabel eval` on the output, with the input as gold, reports the job's numbers
    res = subprocess.run([sys.executable, "-m", "groundlabel", "eval", "--pred", str(out),
                          "--gold", str(synth_shard)], capture_output=True, text=True, check=True)
    ev = json.loads(res.stdout)
    assert ev["n"] == 12 and ev["acc@0.5"] == pytest.approx(s["metrics"]["acc@0.5"])


def test_summary_breaks_down_where_the_start_went(ray_local, synth_shard, tmp_path):
    """`_summary.json` says where the job's start went, phase by phase, from the label call to
    the first commit: the actor's vLLM import, engine start and first block included (each
    actor records its own marks in the output; the job's first commit closes the chain)."""
    from pipelines.label import label
    from pipelines.output import STARTUP, JobOutput

    out = tmp_path / "out"
    s = label(_job(input=str(synth_shard), output=str(out), limit=6))
    st = s["startup"]
    assert json.loads((out / "_summary.json").read_text())["startup"] == st
    assert st["actors"] == 1
    chain = ["label_called", "planned", "ray_connected", "pipeline_started", "actor_init",
             "vllm_imported", "engine_started", "engine_ready", "first_rows_in",
             "first_rows_out", "first_part", "written"]
    times = [st["timeline_s"][k] for k in chain]
    assert times == sorted(times), st["timeline_s"]
    assert set(st["phases_s"]) >= {"ray_init", "actor_scheduling", "vllm_import",
                                   "engine_init", "first_block", "to_first_part"}
    assert st["phases_s"]["vllm_import"] > 0 and st["phases_s"]["engine_init"] > 0
    assert 0 < st["to_first_part_s"] <= st["timeline_s"]["written"]
    # a later run replaces the first run's records, they do not add up (this one has nothing
    # left to label, so no actor records anything)
    first = JobOutput(str(out)).fs.ls(str(out / STARTUP))
    assert label(_job(input=str(synth_shard), output=str(out), limit=6))["rows_this_run"] == 0
    fs = JobOutput(str(out)).fs
    assert len(first) == 1 and not (fs.exists(str(out / STARTUP)) and fs.ls(str(out / STARTUP))
                                    and set(fs.ls(str(out / STARTUP))) & set(first))


def test_feeding_the_engine_continuously_writes_what_one_block_at_a_time_writes(ray_local,
                                                                                tmp_path):
    """The same rows labeled with 8 blocks in the engine at once, and one block at a time
    (the chunked job of before): every content column identical, row for row."""
    from grounding.synth import write_dataset
    from pipelines.label import label

    data = write_dataset(tmp_path / "data", 48, "base", seed=3)
    content = ("row_id", "status", "error_code", "boxes", "score", "raw_text", "num_tokens",
               "adapter", "width", "height")
    outs = {}
    for k in (1, 8):
        s = label(_job(input=str(data), output=str(tmp_path / f"out-{k}"), batch_size=4,
                       batches_in_flight=k))
        assert s["rows"] == s["unique_rows"] == 48
        rows = sorted(_rows(str(tmp_path / f"out-{k}")), key=lambda r: r["row_id"])
        outs[k] = [{c: r[c] for c in content} for r in rows]
    assert sum(r["status"] == "ok" for r in outs[1]) >= 24  # boxes to compare, not only errors
    assert outs[1] == outs[8]


def test_generic_family_end_to_end_with_an_untrained_template(ray_local, tmp_path):
    """Any chat VLM through the generic family: a prompt the bundled model was never trained on,
    0-1 coordinates, on the widened (robust) set. Every row is well formed by construction (in
    the grammar, or cut by the token limit after a complete box), and the template's version is
    in the lineage."""
    import regex

    from grounding.engines import EngineConfig
    from grounding.families import get_family
    from grounding.synth import write_dataset
    from pipelines.label import label, prompt_version

    shard = write_dataset(tmp_path / "in", 16, "robust", seed=1000)
    template = "Where exactly is {text}? Reply with [x1,y1,x2,y2] as fractions of the image."
    eng = EngineConfig(family="generic", prompt_template=template, coords="norm1")
    s = label(_job(input=str(shard), output=str(tmp_path / "out"), inference=eng))
    assert s["rows"] == 16 and s["errors"] == {}
    family = get_family("generic", template, "norm1")
    rows = _rows(str(tmp_path / "out"))
    assert {r["prompt_version"] for r in rows} == {prompt_version(family)}
    assert prompt_version(family) != prompt_version(get_family("generic"))
    for r in rows:
        assert r["family"] == "generic" and r["error_code"] is None, r
        # boxes, or the grammar's "no such object" ([]): never a parse failure
        assert r["status"] in ("ok", "clipped", "truncated", "empty"), r
        assert bool(r["boxes"]) == (r["status"] != "empty"), r
        assert regex.fullmatch(family.grammar, r["raw_text"], partial=r["status"] == "truncated")
        for b in r["boxes"]:
            assert 0 <= b["x1"] < b["x2"] <= r["width"] and 0 <= b["y1"] < b["y2"] <= r["height"]


def _put_dataset_on_s3(endpoint: str, shard: Path, bucket: str) -> str:
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    fs.mkdir(bucket)
    lines = []
    for line in shard.read_text().splitlines():
        row = json.loads(line)
        key = f"{bucket}/images/{Path(row['image']).name}"
        fs.put(row["image"], key)
        row["image"] = f"s3://{key}"
        lines.append(json.dumps(row))
    # one row names an object that is not in the bucket
    lines.append(json.dumps({"id": "gone", "image": f"s3://{bucket}/images/gone.png",
                             "text": "the red square"}))
    with fs.open(f"{bucket}/input/part-0.jsonl", "w") as f:
        f.write("\n".join(lines) + "\n")
    return f"s3://{bucket}/input/"


def test_job_reads_and_writes_s3(ray_local, s3_endpoint, synth_shard, capfd):
    """A job on S3 through a proxy that loses the answer to its first commit: the store applied
    it, the client re-sent it and got 412; the job recognises its own commit and goes on."""
    from support import fault_proxy

    from pipelines.label import label

    src = _put_dataset_on_s3(s3_endpoint, synth_shard, "gl-s3-job")
    with fault_proxy(s3_endpoint, r"_delta_log/0+[1-9]\.json$") as proxy:
        s = label(_job(input=src, output="s3://gl-s3-job/out", s3_endpoint_url=proxy["url"],
                       commit_rows=4))
    assert "dropped PUT" in proxy["said"]
    assert "(found after a lost response)" in capfd.readouterr().out
    assert s["rows"] == s["unique_rows"] == s["table_rows"] == 13
    assert s["errors"] == {"missing": 1}
    from grounding.storage import StorageOptions

    rows = _rows("s3://gl-s3-job/out", opts=StorageOptions(s3_endpoint_url=s3_endpoint))
    assert len(rows) == 13 and all(r["image"].startswith("s3://gl-s3-job/images/") for r in rows)
    assert sum(r["error_code"] is None and bool(r["boxes"]) for r in rows) >= 10


def _poisoned_shard(d: Path, good: Path) -> Path:
    from PIL import Image
    from support import bomb_png

    d.mkdir()
    imgs = {}
    Image.open(good).convert("CMYK").save(d / "cmyk.jpg")
    im16 = Image.open(good).convert("I;16")
    im16.save(d / "sixteen.png")
    rgba = Image.open(good).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(d / "alpha.png")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (d / "empty.png").write_bytes(b"")
    (d / "bomb.png").write_bytes(bomb_png())
    (d / "zero.png").write_bytes(bomb_png(0, 10))
    buf = io.BytesIO()
    Image.open(good).save(buf, format="PNG")
    import base64

    imgs["b64"] = base64.b64encode(buf.getvalue()).decode()
    from support import exif_jpeg

    exif_jpeg(d / "gps.jpg")  # EXIF with a GPS position and a secret description
    imgs["gps"] = base64.b64encode((d / "gps.jpg").read_bytes()).decode()
    rows = [
        ("good", str(good), "the blue circle", None),
        ("cmyk", "cmyk.jpg", "the blue circle", None),
        ("sixteen", "sixteen.png", "the blue circle", None),
        ("alpha", "alpha.png", "the blue circle", None),
        ("inline", imgs["b64"], "the blue circle", None),
        ("corrupt", "corrupt.png", "the blue circle", None),
        ("missing", "nope.png", "the blue circle", None),
        ("empty_text", str(good), "   ", None),
        ("empty", "empty.png", "the blue circle", None),
        ("zero", "zero.png", "the blue circle", None),
        ("bomb", "bomb.png", "the blue circle", None),
        ("adapter", str(good), "the blue circle", "no-such-adapter"),
        ("gps_inline", imgs["gps"], "the blue square", None),
        ("gps_inline_bad_text", "data:image/jpeg;base64," + imgs["gps"], "", None),
    ]
    lines = [json.dumps({"id": i, "image": img, "text": t, **({"adapter": a} if a else {})})
             for i, img, t, a in rows]
    lines.insert(3, "{this line is not json")
    (d / "poison.jsonl").write_text("\n".join(lines) + "\n")
    return d / "poison.jsonl"


def test_poisoned_inputs_become_coded_error_rows(ray_local, synth_shard, tmp_path, capfd):
    from support import SECRET

    from pipelines.label import label

    good = json.loads(synth_shard.read_text().splitlines()[0])["image"]
    shard = _poisoned_shard(tmp_path / "poison", Path(good))
    s = label(_job(input=str(shard), output=str(tmp_path / "out")))
    assert s["rows"] == s["unique_rows"] == 15
    by_id = {r["source_id"] or r["row_id"]: r for r in _rows(str(tmp_path / "out"))}
    expect = {"corrupt": "corrupt", "missing": "missing", "empty_text": "empty_text",
              "empty": "empty_image", "zero": "zero_size", "bomb": "too_large", "adapter": "unknown_adapter",
              "poison.jsonl:3": "bad_json"}
    for key, code in expect.items():
        assert by_id[key]["error_code"] == code, (key, by_id[key])
        assert by_id[key]["status"] == "error" and by_id[key]["error"]
    for key in ("good", "cmyk", "sixteen", "alpha", "inline", "gps_inline"):
        assert by_id[key]["error_code"] is None and by_id[key]["raw_text"], (key, by_id[key])
    # Privacy: inline images leave the job as their hash; no bytes, no EXIF in outputs or logs
    assert by_id["gps_inline"]["image"].startswith("inline:sha256:")
    assert by_id["gps_inline_bad_text"]["error_code"] == "empty_text"
    assert by_id["gps_inline_bad_text"]["image"].startswith("inline:sha256:")
    gps_b64 = json.loads(shard.read_text().splitlines()[-1])["image"].split(",")[1]
    logs = capfd.readouterr()
    for blob in [p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()] + [
            logs.out.encode(), logs.err.encode()]:
        assert gps_b64[100:200].encode() not in blob and SECRET.encode() not in blob


def test_per_row_adapters_give_different_outputs(ray_local, synth_shard, random_adapter,
                                                 tmp_path):
    from pipelines.label import label

    adapters = tmp_path / "adapters"
    shutil.copytree(random_adapter, adapters / "random-v1")
    lines = []
    for line in synth_shard.read_text().splitlines()[:6]:
        row = json.loads(line)
        lines.append(json.dumps(row))
        lines.append(json.dumps(dict(row, id=row["id"] + "-lora", adapter="random-v1")))
    shard = tmp_path / "mixed.jsonl"
    shard.write_text("\n".join(lines) + "\n")
    s = label(_job(input=str(shard), output=str(tmp_path / "out"), adapters_dir=str(adapters)))
    assert s["errors"] == {}
    by_id = {r["source_id"]: r for r in _rows(str(tmp_path / "out"))}
    changed = sum(by_id[k]["raw_text"] != by_id[k + "-lora"]["raw_text"]
                  for k in by_id if not k.endswith("-lora"))
    assert changed >= 5
    assert {r["adapter"] for r in by_id.values()} == {None, "random-v1"}


def test_killed_job_resumes_without_duplicates(synth_shard, tmp_path):
    """A job killed mid-run (the whole process group: driver, Ray, actors) and run again gives
    rows out == rows in, no duplicates, and does not redo what was committed."""
    from grounding.synth import write_dataset

    n = 160  # enough small commits that the kill lands midway
    data = write_dataset(tmp_path / "data", n, "base", seed=5)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "groundlabel", "label", "--input", str(data), "--output",
           str(out), "--batch-size", "2", "--fetch-batch-size", "2", "--commit-rows", "2",
           "--piece-rows", "2", "--no-progress"]
    log = (tmp_path / "first-run.log").open("w")
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 400
    # two commits after the table's creation (version 0): log entries 1 and 2
    second = out / "_delta_log" / f"{2:020d}.json"
    while time.time() < deadline and proc.poll() is None and not second.exists():
        time.sleep(0.05)
    assert proc.poll() is None, (tmp_path / "first-run.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    from pipelines.output import JobOutput

    before = JobOutput(str(out)).progress().rows
    assert 0 < before < n
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows"] == summary["unique_rows"] == summary["table_rows"] == n
    # Only the driver commits, and it is dead: the rerun labels exactly what was missing.
    assert summary["rows_this_run"] == n - before


def test_job_submitted_to_a_running_cluster(synth_shard, tmp_path):
    """A separate Ray cluster (`ray start --head`), and `ray job submit -- groundlabel label`
    run against it, exactly as the README tells a user."""
    import socket

    from support import free_port

    port = free_port()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    # Token authentication, as a real cluster should have; the submitter and the head share it.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(16).hex())
    # --block keeps the cluster's processes in this process group, so the test can stop exactly
    # this cluster (`ray stop` would stop every Ray on the machine, the session's too).
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--num-cpus=4", "--include-dashboard=true",
         f"--dashboard-port={port}", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
         "--port=0", f"--ray-client-server-port={free_port()}",
         # own agent ports: the default ones may belong to the session's other local Ray
         f"--dashboard-agent-listen-port={free_port()}",
         f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline and head.poll() is None, "head did not start"
                time.sleep(1)
        out = tmp_path / "out"
        cmd = [ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{port}", "--",
               sys.executable, "-m", "groundlabel", "label", "--input", str(synth_shard),
               "--output", str(out), "--no-progress"]
        for _ in range(20):
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            # the dashboard answers before the node's job agent is up: the job was not
            # submitted, so submitting again is safe
            if "No available agent" not in res.stdout + res.stderr:
                break
            time.sleep(2)
        assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
        assert "Started a local Ray instance" not in res.stdout + res.stderr  # it used the cluster
        summary = json.loads((out / "_summary.json").read_text())
        assert summary["rows"] == summary["unique_rows"] == 12
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
