"""Shared fixtures: the bundled tiny model, engines started once per session, a LoRA adapter.

Engines are real (vLLM's CPU build, transformers); nothing is mocked. They are session-scoped
because starting vLLM costs seconds and a few hundred MB.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from grounding.paths import DEFAULT_MODEL

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    assert (DEFAULT_MODEL / "config.json").is_file(), (
        f"bundled tiny model missing at {DEFAULT_MODEL}; rebuild with `make tiny-model`")
    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def vllm_engine(tiny_model):
    from grounding.engines import EngineConfig, load_engine

    eng = load_engine(EngineConfig(model=str(tiny_model), engine="vllm"))
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def hf_engine(tiny_model):
    from grounding.engines import EngineConfig, load_engine

    eng = load_engine(EngineConfig(model=str(tiny_model), engine="transformers"))
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def random_adapter(tiny_model, tmp_path_factory) -> Path:
    """A peft LoRA adapter on the language model's q/v projections with random (non-zero) A
    and B, so it must change the output wherever it is really applied."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter") / "random-lora"
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def synth_samples():
    from grounding.synth import iter_samples

    return list(iter_samples(24, "base", seed=0))
