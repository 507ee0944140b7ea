"""The Ray Train worker of ``retrain``: QLoRA (nf4) on the CPU, and several workers in lock step.

Fast: the shard and step-plan rules, and the quantization choice. Slow (real Ray Train, real
training on the bundled tiny Qwen3-VL, real vLLM): an nf4 retrain whose adapter loads in vLLM
and changes its answers; two workers (gloo) that survive one of them being SIGKILLed.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/pytest -q tests/train/test_worker.py
"""

from __future__ import annotations

import pytest

from train.worker import choose_quantization, plan_steps_per_epoch, shard


def test_shards_are_disjoint_and_cover_all_items():
    items = list(range(23))
    for world in (1, 2, 3, 5):
        shards = [shard(items, r, world) for r in range(world)]
        assert sorted(x for s in shards for x in s) == items
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_step_plan_comes_from_the_global_count_not_the_shard():
    # 23 items, batch 4 per worker: 1 worker -> 6 steps an epoch, 2 workers -> 3 (each rank
    # cycles its own 11 or 12 items: 3 steps x 4 = 12 covers either)
    assert plan_steps_per_epoch(23, 4, 1) == 6
    assert plan_steps_per_epoch(23, 4, 2) == 3
    for world in (2, 3):
        spe = plan_steps_per_epoch(23, 4, world)
        assert all(spe * 4 >= len(shard(list(range(23)), r, world)) for r in range(world))
    assert plan_steps_per_epoch(1, 8, 4) == 1


def test_quantization_choice_says_what_and_why():
    assert choose_quantization("none", "cpu") == ("none", "quantize=none")
    q, why = choose_quantization("auto", "cpu")  # bitsandbytes' CPU backend runs nf4
    assert q == "nf4" and "bitsandbytes" in why and "cpu" in why
    # a device bitsandbytes cannot run on: auto falls back and says so; nf4 is an error
    q, why = choose_quantization("auto", "meta")
    assert q == "none" and "cannot run nf4 on meta" in why
    with pytest.raises(RuntimeError, match="quantize=nf4 asked for"):
        choose_quantization("nf4", "meta")


def _items(tmp_path, n: int, seed: int = 11) -> tuple[str, list[dict]]:
    """``n`` reviewed single-object shifted-domain labels, as a store snapshot gives them."""
    from grounding.store import ReviewStore
    from grounding.synth import SynthConfig, write_dataset
    from pipelines.review import ImportConfig, import_labels

    data = write_dataset(tmp_path / "synth", n, "shifted", seed=seed,
                         cfg=SynthConfig(min_objects=1, max_objects=1))
    store = str(tmp_path / "store")
    import_labels(ImportConfig(input=str(data), from_fmt="seed", store=store, reviewer="test"))
    return store, ReviewStore(store).labels(1)


@pytest.mark.slow
def test_nf4_retrain_on_cpu_gives_an_adapter_vllm_applies(tmp_path, ray_local, vllm_engine,
                                                          synth_samples):
    from safetensors.torch import load_file

    from grounding.engines.grounder import Grounder, GroundingRequest
    from train.retrain import RetrainConfig, fit

    store, items = _items(tmp_path, 8)
    cfg = RetrainConfig(store=store, registry=str(tmp_path / "reg"), quantize="nf4",
                        epochs=4, batch_size=4, lr=1e-2, warmup_frac=0.0, cpus_per_worker=1,
                        storage_path=str(tmp_path / "ray-train"), max_minutes=5)
    adapter, m = fit(cfg, items, "nf4-cpu")
    # the base really was 4-bit in the worker, and the driver is told so and why
    assert m["quantization"] == "nf4" and m["linear4bit_layers"] > 0, m
    assert "bitsandbytes" in m["quantization_reason"]
    assert m["step"] == m["total_steps"] == 8
    # LoRA B starts at zero: it moved
    w = load_file(f"{adapter}/adapter_model.safetensors")
    lora_b = [t for k, t in w.items() if ".lora_B." in k]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)
    # a plain LoRA adapter vLLM loads, and it changes vLLM's answers
    vllm_engine.add_adapter("nf4-cpu-trained-1", adapter)
    samples = synth_samples[:8]
    base = Grounder(vllm_engine).ground([GroundingRequest(s.image, s.text) for s in samples])
    lora = Grounder(vllm_engine).ground(
        [GroundingRequest(s.image, s.text, "nf4-cpu-trained-1") for s in samples])
    assert all(r.error_code is None for r in lora), [r.error for r in lora]
    changed = sum(a.raw_text != b.raw_text for a, b in zip(base, lora, strict=True))
    assert changed >= 1, [r.raw_text for r in lora]
    print(f"\nnf4 adapter changed {changed}/{len(samples)} answers; train metrics: {m}")


def _registered_step(run_dir) -> int | None:
    """Step of the latest checkpoint Ray Train has REGISTERED (a checkpoint folder appears in
    storage a moment before the controller records it; only a recorded one is resumed from)."""
    import json

    try:
        snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return snap["latest_checkpoint_result"]["metrics"]["step"]
    except (OSError, ValueError, KeyError, TypeError):  # not yet written, or mid-write
        return None


@pytest.mark.slow
def test_two_workers_in_step_survive_a_killed_worker(tmp_path, ray_local):
    """Two CPU workers (gloo) on disjoint shards; one is SIGKILLed after the first checkpoint.
    Ray Train restarts the group from that checkpoint; the run ends at the planned step."""
    import os
    import signal
    import threading
    import time

    import ray._private.state

    from train.retrain import RetrainConfig, fit

    store, items = _items(tmp_path, 16)
    root = tmp_path / "ray-train"
    cfg = RetrainConfig(store=store, registry=str(tmp_path / "reg"), quantize="none",
                        num_workers=2, cpus_per_worker=1, max_failures=1, epochs=12,
                        batch_size=2, checkpoint_every_s=1, max_minutes=5,
                        storage_path=str(root))
    out: dict = {}

    def run():
        try:
            out["adapter"], out["metrics"] = fit(cfg, items, "two-workers")
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    deadline = time.time() + 300
    while _registered_step(root / "two-workers") is None:
        assert t.is_alive(), f"training ended before its first checkpoint: {out}"
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    workers = [a for a in ray._private.state.actors().values()
               if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE"]
    assert len(workers) == 2, workers
    os.kill(workers[-1]["Pid"], signal.SIGKILL)
    # the group can register no checkpoint after this (rank 0 waits on the dead rank), and a
    # restarted one needs far more than 2 s before its first
    time.sleep(2)
    last = _registered_step(root / "two-workers")
    t.join(timeout=400)
    assert not t.is_alive(), "training did not finish after the restart"
    assert "error" not in out, out.get("error")
    m = out["metrics"]
    # 16 items / (2 per step x 2 workers) = 4 steps an epoch, x 12 epochs; none repeated
    assert m["world_size"] == 2 and m["examples"] == 16
    assert m["resumed_from_step"] == last, (m, last)
    assert m["step"] == m["total_steps"] == 48, m
    assert m["loss"] < 0.8 * m["first_loss"], m
    print(f"\ntwo workers, killed at step {last}: {m}")


def test_nf4_computes_in_float32_on_the_cpu():
    """QLoRA's 4-bit weights are dequantized to the compute dtype for each matmul. bf16 compute
    (what CUDA wants) is emulated on CPUs without native bf16: on this 2-core EPYC a 2400x256 @
    256x512 matmul took 474 ms in bf16 and 8.7 ms in float32, and the default retrain trained at
    2 samples/s (2.1 epochs in its 10 minutes; bench/RESULTS.md, issue 32). On the CPU the
    compute dtype is float32; the weights stay 4-bit."""
    import torch

    from train.worker import nf4_compute_dtype

    assert nf4_compute_dtype("cpu") == torch.float32
    assert nf4_compute_dtype("cuda:0") == torch.bfloat16
