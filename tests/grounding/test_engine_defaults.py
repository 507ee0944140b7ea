"""Device-aware engine defaults, stated once in `EngineConfig` and pinned here on real-size
checkpoints (Qwen2.5-VL-7B and -3B, Qwen3-VL-8B) written from their published numbers, with
no weights (`grounding.published`), and on the bundled tiny model.

The derivations: ``dtype`` auto is bf16 where the device computes in it, float16 on a GPU
without bf16, float32 on the CPU; ``max_model_len`` comes from the checkpoint's context and
the image budget (``max_pixels``); ``gpu_memory_utilization`` from the GPUs the process holds;
``tensor_parallel_size`` sets the GPUs an actor asks for.
"""

from __future__ import annotations

import pytest

from grounding.engines.base import Device, EngineConfig
from grounding.published import write_config

CPU = Device(kind="cpu")
H100 = Device(kind="cuda", bf16=True, gpus=1.0, name="NVIDIA H100 80GB HBM3")
HALF_L4 = Device(kind="cuda", bf16=True, gpus=0.5, name="NVIDIA L4")
T4 = Device(kind="cuda", bf16=False, gpus=1.0, name="Tesla T4")


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    return {n: str(write_config(n, root / n))
            for n in ("qwen2.5-vl-7b", "qwen2.5-vl-3b", "qwen3-vl-8b")}


def test_dtype_auto_follows_the_device(real):
    cfg = EngineConfig(model=real["qwen2.5-vl-7b"])
    assert cfg.dtype == "auto"
    assert cfg.resolved(CPU).dtype == "float32"
    assert cfg.resolved(H100).dtype == "bfloat16"
    assert cfg.resolved(T4).dtype == "float16"
    assert EngineConfig(model=real["qwen2.5-vl-7b"], dtype="float32").resolved(H100).dtype \
        == "float32"  # an explicit choice stands


@pytest.mark.parametrize("name,max_pixels,expected", [
    # 1,003,520 px = 1,280 tokens of 28x28 px; + 2 vision markers + 512 text + 64 answer
    # = 1,858, rounded up to a multiple of 1,024.
    ("qwen2.5-vl-7b", 1003520, 2048),
    ("qwen2.5-vl-3b", 1003520, 2048),
    # The processor's own budget: 12,845,056 px = 16,384 tokens -> 16,962 -> 17,408.
    ("qwen2.5-vl-7b", None, 17408),
    # Qwen3-VL: 32x32 px a token; 16,777,216 px = 16,384 tokens.
    ("qwen3-vl-8b", None, 17408),
    ("qwen3-vl-8b", 1048576, 2048),
])
def test_context_fits_the_image_budget(real, name, max_pixels, expected):
    cfg = EngineConfig(model=real[name], max_pixels=max_pixels)
    assert cfg.max_model_len is None
    assert cfg.resolved(H100).max_model_len == expected
    assert cfg.model_len() == expected


def test_context_of_the_bundled_model_is_unchanged(tiny_model):
    # 65,536 px = 64 tokens of 32x32 px: 642 -> 1,024, what the tiny model always ran with.
    assert EngineConfig(model=str(tiny_model)).model_len() == 1024


def test_an_image_that_cannot_fit_is_refused_at_start(real, tiny_model):
    cfg = EngineConfig(model=real["qwen2.5-vl-7b"], max_pixels=1003520,  # 1,280-token images
                       max_model_len=1024)
    with pytest.raises(ValueError, match=r"1280 visual tokens.*--max-model-len 1024") as e:
        cfg.resolved(H100)
    assert "--max-pixels" in str(e.value)
    # Past the checkpoint's own context: the tiny model has 2,048 positions.
    big = EngineConfig(model=str(tiny_model), max_pixels=4096 * 1024)
    with pytest.raises(ValueError, match=r"4096 visual tokens.*2048 positions"):
        big.model_len()
    # An explicit context that fits is kept as given.
    assert EngineConfig(model=real["qwen2.5-vl-7b"], max_pixels=1003520,
                        max_model_len=4096).resolved(H100).max_model_len == 4096


def test_memory_share_follows_the_gpus_held(real):
    cfg = EngineConfig(model=real["qwen2.5-vl-7b"])
    assert cfg.gpu_memory_utilization is None
    assert cfg.resolved(H100).gpu_memory_utilization == pytest.approx(0.9)
    # Two engines on one GPU (--gpus-per-actor 0.5): each takes under half, so both start.
    assert cfg.resolved(HALF_L4).gpu_memory_utilization == pytest.approx(0.45)
    tp = EngineConfig(model=real["qwen2.5-vl-7b"], tensor_parallel_size=2)
    assert tp.resolved(Device(kind="cuda", bf16=True, gpus=2.0)).gpu_memory_utilization \
        == pytest.approx(0.9)
    assert cfg.resolved(CPU).gpu_memory_utilization is None
    explicit = EngineConfig(model=real["qwen2.5-vl-7b"], gpu_memory_utilization=0.3)
    assert explicit.resolved(HALF_L4).gpu_memory_utilization == 0.3


def test_tensor_parallel_needs_as_many_gpus(real):
    tp = EngineConfig(model=real["qwen2.5-vl-7b"], tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size 2 needs 2 GPUs"):
        tp.resolved(H100)
    with pytest.raises(ValueError, match="needs 2 GPUs"):
        tp.resolved(CPU)


def test_actors_ask_for_the_gpus_tensor_parallel_needs(real):
    from pipelines.config import LabelJobConfig
    from serve.config import ServeConfig

    inf = {"model": real["qwen2.5-vl-7b"], "tensor_parallel_size": 4}
    assert LabelJobConfig(input="x", output="y", inference=inf).gpus_per_actor == 4
    assert ServeConfig(inference=inf).num_gpus == 4
    with pytest.raises(ValueError, match="tensor_parallel_size 4 needs 4 GPUs per actor"):
        LabelJobConfig(input="x", output="y", inference=inf, gpus_per_actor=1)
    assert LabelJobConfig(input="x", output="y").gpus_per_actor == 0  # CPU jobs ask for none


def test_answer_length_bounds(real):
    with pytest.raises(ValueError, match="min-new-tokens"):
        EngineConfig(model=real["qwen2.5-vl-7b"], min_new_tokens=40, max_new_tokens=30)
    assert EngineConfig(min_new_tokens=30, max_new_tokens=30).min_new_tokens == 30


def test_vllm_gets_the_resolved_settings(real, monkeypatch):
    """What the vLLM engine hands to `vllm.LLM` on a CUDA device, read without starting it."""
    from grounding.engines.vllm_engine import llm_kwargs

    cfg = EngineConfig(model=real["qwen2.5-vl-7b"], max_pixels=1003520,
                       tensor_parallel_size=2).resolved(Device(kind="cuda", bf16=True, gpus=2))
    kw = llm_kwargs(cfg, on_cpu=False)
    assert kw["dtype"] == "bfloat16" and kw["max_model_len"] == 2048
    assert kw["gpu_memory_utilization"] == pytest.approx(0.9)
    assert kw["tensor_parallel_size"] == 2
    assert kw["mm_processor_kwargs"] == {"max_pixels": 1003520}
    cpu = llm_kwargs(EngineConfig(model=real["qwen2.5-vl-7b"]).resolved(CPU), on_cpu=True)
    assert cpu["dtype"] == "float32" and "gpu_memory_utilization" not in cpu
    assert cpu["distributed_executor_backend"] == "uni"


def test_the_transformers_engine_runs_on_the_device(tiny_model):
    """The reference engine loads on the device it detects (CPU here; CUDA on a GPU node:
    tests/pipelines/test_gpu_check.py covers that there)."""
    from grounding.engines.hf_engine import HFEngine

    eng = HFEngine(EngineConfig(model=str(tiny_model), engine="transformers"))
    assert eng.device == "cpu" and eng.model.device.type == "cpu"
    assert eng.cfg.dtype == "float32" and eng.cfg.max_model_len == 1024


def test_device_detection_reads_the_gpus_ray_assigned():
    d = Device.detect()
    assert d.kind == "cpu" and d.gpus == 0 and not d.bf16


def test_a_relative_model_folder_is_made_absolute(tmp_path, monkeypatch):
    """`--model runs/my-ckpt` named a folder of the caller's working directory; Ray Train's
    workers run elsewhere (their own directory), where transformers then took it for a hub id
    and failed offline (found running `bench_retrain.py --model runs/tiny-hard`). A folder that
    exists is pinned to its absolute path when the settings are made; anything else (a hub id,
    an absolute path) is kept as given."""
    from grounding.engines.base import EngineConfig

    (tmp_path / "runs" / "ckpt").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert EngineConfig(model="runs/ckpt").model == str(tmp_path / "runs" / "ckpt")
    assert EngineConfig(model="Qwen/Qwen2.5-VL-3B-Instruct").model == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert EngineConfig(model=str(tmp_path / "runs" / "ckpt")).model == str(tmp_path / "runs" / "ckpt")
