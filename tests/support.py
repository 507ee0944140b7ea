"""Helpers shared by test modules (importable as `support`: tests/ is on sys.path)."""

from __future__ import annotations

import json
import socket
import struct
import zlib
from contextlib import contextmanager
from pathlib import Path


def bomb_png(w: int = 60000, h: int = 60000) -> bytes:
    """A tiny PNG whose header claims w x h pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b""))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SECRET = "GL-SECRET-EXIF-7f3a"


def exif_jpeg(path: Path) -> bytes:
    """A JPEG carrying EXIF with a GPS position and a description; returns the EXIF block."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (160, 120), (230, 230, 230))
    ImageDraw.Draw(img).rectangle([40, 30, 100, 90], fill=(40, 80, 220))
    exif = Image.Exif()
    exif[0x010E] = SECRET                     # ImageDescription
    exif[0x8825] = {1: "N", 2: (52.0, 22.0, 1.5), 3: "E", 4: (4.0, 53.0, 30.0)}  # GPS IFD
    img.save(path, "JPEG", exif=exif, comment=SECRET.encode())
    with Image.open(path) as back:            # the source really carries it
        assert back.getexif().get_ifd(0x8825)[2] == (52.0, 22.0, 1.5)
    return exif.tobytes()


def out_box(b: list[float], score: float) -> dict:
    return {"x1": b[0], "y1": b[1], "x2": b[2], "y2": b[3], "score": score, "label": None}


def draw_face(size: int = 120, canvas: tuple[int, int] = (640, 480),
              centre: tuple[int, int] | None = None, seed: int = 0):
    """A generated frontal face (no photo, no download): a skin oval with hair, eyes (whites,
    irises, pupils), brows, a shaded nose and lips, drawn at 4x and shrunk, side-lit, softened
    and lightly noised so a face detector sees a face. Returns ``(PIL RGB image, face box)``,
    the box xyxy in pixels of that image (``size`` wide, 1.3 x ``size`` tall)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    W, H = canvas
    cx, cy = centre or (W // 2, H // 2)
    S = 4
    img = Image.new("RGB", (W * S, H * S), (150, 170, 190))
    d = ImageDraw.Draw(img)
    w, h = size * S, int(size * 1.3) * S
    x0, y0 = cx * S - w // 2, cy * S - h // 2

    def oval(a, b, c, e, fill):  # face-relative corners, 0..1
        d.ellipse([x0 + a * w, y0 + b * h, x0 + c * w, y0 + e * h], fill=fill)

    skin, shade = (224, 172, 140), (196, 140, 110)
    oval(-0.06, 0.38, 0.06, 0.58, shade)
    oval(0.94, 0.38, 1.06, 0.58, shade)
    oval(0.0, 0.0, 1.0, 1.0, skin)
    oval(0.02, -0.06, 0.98, 0.36, (60, 40, 30))
    oval(0.06, 0.10, 0.94, 0.40, skin)
    for ex in (0.30, 0.70):
        oval(ex - 0.15, 0.33, ex + 0.15, 0.36, (70, 50, 40))
        oval(ex - 0.13, 0.41, ex + 0.13, 0.49, shade)
        oval(ex - 0.11, 0.425, ex + 0.11, 0.475, (245, 245, 240))
        oval(ex - 0.05, 0.42, ex + 0.05, 0.48, (90, 60, 40))
        oval(ex - 0.025, 0.435, ex + 0.025, 0.465, (10, 10, 10))
    d.polygon([(x0 + 0.5 * w, y0 + 0.48 * h), (x0 + 0.42 * w, y0 + 0.66 * h),
               (x0 + 0.58 * w, y0 + 0.66 * h)], fill=shade)
    oval(0.42, 0.64, 0.48, 0.68, (120, 80, 60))
    oval(0.52, 0.64, 0.58, 0.68, (120, 80, 60))
    oval(0.32, 0.74, 0.68, 0.84, (170, 80, 80))
    d.line([x0 + 0.33 * w, y0 + 0.79 * h, x0 + 0.67 * w, y0 + 0.79 * h], fill=(90, 30, 30),
           width=max(1, S * size // 100))
    img = img.resize((W, H), Image.LANCZOS)
    arr = np.asarray(img).astype(np.float32) * np.linspace(1.08, 0.88, W)[None, :, None]
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    img = img.filter(ImageFilter.GaussianBlur(max(0.5, size / 100)))
    arr = np.asarray(img).astype(np.float32)
    arr += np.random.default_rng(seed).normal(0, 4.0, arr.shape)
    box = (cx - size // 2, cy - int(size * 1.3) // 2, cx + size // 2, cy + int(size * 1.3) // 2)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), box


def fake_calibration(reg: Path, model: str = "/models/tiny-qwen3-vl",
                     prompt_version: str = "qwen3_vl:1a2b3c4d"):
    """A calibration of ``fake_job``'s model + prompt in a registry at ``reg``, fitted on 1500
    simulated reviews whose raw scores are overconfident (P(right) = score**3)."""
    import random

    from grounding import calibration as C
    from grounding.registry import AdapterRegistry

    key = C.Key(model=model, adapter=None, prompt_version=prompt_version)
    rng = random.Random(0)
    data = []
    for i in range(1500):
        s = rng.random() ** 0.3
        data.append(C.Outcome(item_id=f"r{i}", key=key, score=s, hit=rng.random() < s ** 3))
    cal = C.fit(data)
    AdapterRegistry(str(reg)).save_calibration(cal)
    return cal


def fake_job(tmp: Path) -> dict:
    """``tmp/out``: a job output of 12 rows (9 labeled, 3 errors) over real image files."""
    from grounding.synth import write_dataset

    shard = write_dataset(tmp / "synth", 6, "base", seed=0)
    samples = [json.loads(x) for x in shard.read_text().splitlines()]
    lineage = {"model": "/models/tiny-qwen3-vl", "family": "qwen3_vl",
               "prompt_version": "qwen3_vl:1a2b3c4d", "job_id": "job-abc123", "adapter": None,
               "shard": "data.jsonl"}
    rows = []
    scores = [0.91, 0.83, 0.72, 0.64, 0.55, 0.97]
    for i, (s, sc) in enumerate(zip(samples, scores, strict=True)):
        gold = s["bbox"]
        # even rows hit the true box, odd rows miss it
        pred = gold if i % 2 == 0 else [0.0, 0.0, 20.0, 20.0]
        rows.append(dict(lineage, row_id=f"data.jsonl:{i}", source_id=s["id"], image=s["image"],
                         text=s["text"], boxes=[out_box(pred, sc)], score=sc, status="ok",
                         width=200, height=200, gold=gold, raw_text="[...]"))
    s0 = samples[0]
    rows.append(dict(lineage, row_id="data.jsonl:6", image=s0["image"],
                     text="<b>bold</b> & \"quoted\"", boxes=[], score=None, status="unparseable", width=200, height=200,
                     gold=s0["bbox"], raw_text="no box here"))
    rows.append(dict(lineage, row_id="data.jsonl:7", image=str(tmp / "deleted-after-job.png"),
                     text="the gone square", boxes=[out_box([1, 1, 9, 9], 0.1)], score=0.1,
                     status="ok", width=160, height=120))
    jpg = tmp / "gps.jpg"
    exif_block = exif_jpeg(jpg)
    rows.append(dict(lineage, row_id="data.jsonl:8", image=str(jpg), text="the blue square",
                     boxes=[out_box([40, 30, 100, 90], 0.2)], score=0.2, status="ok",
                     width=160, height=120))
    rows.append(dict(lineage, row_id="data.jsonl:9", image=str(tmp / "nope.png"),
                     text="x", status="error", error_code="missing",
                     error="image not found: /data/<script>alert(1)</script>.png"))
    rows.append(dict(lineage, row_id="data.jsonl:10", status="error", error_code="bad_json",
                     error="line 11 is not JSON"))
    rows.append(dict(lineage, row_id="data.jsonl:11", image=s0["image"], text="y",
                     status="error", error_code="corrupt", error="no decoder accepts the bytes"))

    out = tmp / "out"
    job_table(out, rows, job_id="job-abc123", model=lineage["model"], family="qwen3_vl")
    (out / "_summary.json").write_text(json.dumps({"rows": 12, "rows_per_s": 3.21,
                                                   "seconds": 3.7}))
    sources = [Path(s["image"]) for s in samples] + [jpg]
    return {"out": out, "exif": exif_block, "sources": sources}


def job_table(out: Path, rows: list[dict], job_id: str = "job-test", piece_rows: int = 1,
              **identity) -> Path:
    """A label job's output table at ``out`` holding ``rows`` (output columns; missing ones
    null), created and committed through the job's own code path (identity, write, commit)."""
    from pipelines import schema
    from pipelines.commit import commit_rows
    from pipelines.output import JobOutput

    for r in rows:
        r.setdefault("shard", r["row_id"].rsplit(":", 1)[0])
    output = JobOutput(str(out))
    job = output.start_job(dict(identity, piece_rows=piece_rows, default_adapter=None),
                           job_id, {})
    commit_rows(output, job, schema.table(rows, schema.OUTPUT))
    return out


@contextmanager
def web_server(port: int, directory: Path):
    """A static web server (``python -m http.server``, a process) on 127.0.0.1:``port`` serving
    ``directory``, up once it accepts connections; stopped on exit."""
    import subprocess
    import sys
    import time

    web = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                            "127.0.0.1", "--directory", str(directory)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while not port_open(port):
            assert time.time() < deadline and web.poll() is None, "web server did not start"
            time.sleep(0.1)
        yield
    finally:
        web.kill()
        web.wait()


# ---- a real Ray cluster as separate `ray start` processes (tests/cluster) --------------------
def ray_node(args: list[str], env: dict, log: Path):
    """Start one Ray node (`ray start --block`) in its own process group, with its own ports."""
    import subprocess
    import sys

    ray = str(Path(sys.executable).with_name("ray"))
    # --block keeps each node's processes in its own process group, so a test stops exactly
    # this cluster (`ray stop` would stop every Ray on the machine).
    own_ports = [f"--dashboard-agent-listen-port={free_port()}",
                 f"--dashboard-agent-grpc-port={free_port()}",
                 f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    return subprocess.Popen([ray, "start", "--block", "--disable-usage-stats", *own_ports, *args],
                            env=env, start_new_session=True, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def wait_for(pred, what: str, procs, timeout: float = 180) -> None:
    import time

    deadline = time.time() + timeout
    while not pred():
        assert all(p.poll() is None for p in procs), f"a process exited while waiting for {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def ray_state(kind: str, dashboard: str, env: dict) -> list[dict]:
    """``ray.util.state.list_<kind>`` of the cluster at ``dashboard``, in a subprocess: the
    address (and token) are that cluster's, never the test session's own Ray."""
    import subprocess
    import sys

    code = ("import json, sys; from ray.util import state; "
            f"print(json.dumps([dict(x.__dict__) for x in state.list_{kind}("
            f"address={dashboard!r}, limit=10000, detail=True)], default=str))")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else []


def stop_nodes(procs) -> None:
    import os
    import signal

    for p in reversed(procs):
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def tcp_proxy(listen: int, target: int):
    """Start tests/tcp_proxy.py (a process) forwarding 127.0.0.1:listen to :target; returns the
    Popen once it accepts connections. Kill it to cut the target off; call again to restore."""
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("tcp_proxy.py")),
                             str(listen), str(target)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"tcp proxy on {listen} did not start")
    time.sleep(0.05)
    return proc


@contextmanager
def fault_proxy(endpoint: str, pattern: str = "^$", drops: int = 1, log: Path | None = None):
    """tests/http_fault_proxy.py (a process) in front of the S3 ``endpoint``: it loses the
    answers of the first ``drops`` PUTs whose path matches ``pattern`` (the store applied
    them). With ``log`` (a file), every request is written there as ``req METHOD PATH``.
    Yields a dict: ``url`` (point the client here), and ``said`` (the proxy's output, filled in
    once the block ends)."""
    import subprocess
    import sys
    import time

    args = [sys.executable, str(Path(__file__).with_name("http_fault_proxy.py")), str(free_port()),
            endpoint.rsplit(":", 1)[1], pattern, str(drops), *(["log"] if log else [])]
    port = args[2]
    out = log.open("w") if log else subprocess.PIPE
    proc = subprocess.Popen(args, stdout=out, text=True)
    box = {"url": f"http://127.0.0.1:{port}", "said": ""}
    try:
        deadline = time.time() + 30
        if log:
            while "ready" not in log.read_text():
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("the fault proxy did not start")
                time.sleep(0.05)
        elif proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the fault proxy did not start")
        yield box
    finally:
        proc.kill()
        proc.wait()
        box["said"] = log.read_text() if log else proc.stdout.read()


def random_lora(model, out, seed: int):
    """A peft LoRA (q/v projections, r=8) with random non-zero A and B saved to ``out``: it
    changes the answers wherever it is really applied."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    m = AutoModelForImageTextToText.from_pretrained(model, dtype=torch.float32)
    get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                 init_lora_weights=False)).save_pretrained(out)
    return out


def raw_post_head(port: int, path: str, headers: dict, length: int,
                  timeout: float = 60) -> socket.socket:
    """A socket on which a POST to ``path`` on 127.0.0.1:``port`` has sent its headers
    (``Content-Length: length``) and nothing of its body: a client that may stall."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    lines = [f"POST {path} HTTP/1.1", "Host: x", f"Content-Length: {length}",
             *[f"{k}: {v}" for k, v in headers.items()]]
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return s


def read_status(s: socket.socket) -> int:
    """The HTTP status the server answered on ``s`` (0: closed or failed with no answer)."""
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        return 0
    return int(data.split(b" ", 2)[1]) if data else 0


def send_body(s: socket.socket, total: int, timeout: float = 20) -> tuple[int, int]:
    """Send ``total`` bytes of body on ``s`` until done or the server closes; then its answer.
    Returns ``(bytes the server took, HTTP status)`` and closes ``s``."""
    s.settimeout(timeout)
    sent, block = 0, b"0" * 65536
    try:
        while sent < total:
            sent += s.send(block[:total - sent])
    except OSError:
        pass  # the server answered and closed before the body was all sent
    status = read_status(s)
    s.close()
    return sent, status
