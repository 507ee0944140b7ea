"""Shared fixtures: the bundled tiny model, engines started once per session, a LoRA adapter.

Engines are real (vLLM's CPU build, transformers); nothing is mocked. They are session-scoped
because starting vLLM costs seconds and a few hundred MB.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import free_port, random_lora

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
    return random_lora(tiny_model, tmp_path_factory.mktemp("adapter") / "random-lora", 0)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_model, tmp_path_factory) -> Path:
    """The bundled tiny model exported to an ONNX folder (`groundlabel export-model`, ~30 s),
    once per session: the export tests and the `.[edge]` install test share it."""
    from train.onnx_export import ExportConfig, export_model

    out = tmp_path_factory.mktemp("onnx") / "tiny"
    export_model(ExportConfig(out=str(out), model=str(tiny_model)))
    return out


@pytest.fixture(scope="session")
def synth_samples():
    from grounding.synth import iter_samples

    return list(iter_samples(24, "base", seed=0))


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto in server mode, a real HTTP S3 endpoint on 127.0.0.1, reached through s3fs.

    The AWS_* variables are set before Ray starts so that every Ray worker inherits them.
    """
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield url
    proc.kill()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_local(s3_endpoint, tmp_path_factory):
    """A local Ray for the whole session (never attaches to another cluster)."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_shard(tmp_path_factory) -> Path:
    from grounding.synth import write_dataset

    return write_dataset(tmp_path_factory.mktemp("synth"), 12, "base", seed=0)
