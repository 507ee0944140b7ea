"""The tiny model's training resumes from its last saved state after the process is killed,
and ends with exactly the weights an uninterrupted run reaches (issue 32: training for hours on
2 cores must survive a restart)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

MODEL = "models/tiny-qwen3-vl"


def _args(out, *extra):
    return [sys.executable, "-m", "groundlabel", "tiny", "train", "--model", MODEL,
            "--out", str(out), "--steps", "6", "--checkpoint-every", "2", "--batch-size", "2",
            "--warmup-steps", "2", "--eval-every", "1000", "--eval-n", "2",
            "--final-eval-n", "2", "--threads", "1", "--single-frac", "0", *extra]


def _state(out):
    import torch

    return torch.load(out / "resume" / "state.pt", weights_only=False)


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_weights(tmp_path):
    import torch

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    res = subprocess.run(_args(straight), capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stderr[-3000:]

    # the same run, SIGKILLed once its first resumable state (step 2 or later) is on disk
    p = subprocess.Popen(_args(killed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env=env)
    deadline = time.time() + 600
    while not (killed / "resume" / "state.pt").exists():
        assert p.poll() is None, p.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    at = _state(killed)["loop"]["step"]
    assert 2 <= at < 6, f"killed at step {at}: too late to test resuming"

    res = subprocess.run(_args(killed, "--resume"), capture_output=True, text=True,
                         timeout=900, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _state(straight), _state(killed)
    assert a["loop"]["step"] == b["loop"]["step"] == 6
    assert a["loop"]["idx"] == b["loop"]["idx"] == 12       # every sample drawn once
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), f"{k} differs after resuming"
    log = [json.loads(x) for x in (killed / "train_log.jsonl").read_text().splitlines()]
    assert any(r.get("resumed_from_step") == at for r in log)
    metrics = json.loads((killed / "train_metrics.json").read_text())
    assert metrics["steps"] == 6


def test_resume_refuses_a_state_of_another_recipe(tmp_path):
    """A resumable state written under one recipe is not continued under another: the
    message names the settings that differ, and nothing is overwritten."""
    import torch

    from train.base import BaseTrainConfig, ResumeError, load_resume

    out = tmp_path / "run"
    (out / "resume").mkdir(parents=True)
    cfg = BaseTrainConfig(model=MODEL, out=str(out), steps=6)
    torch.save({"cfg": cfg.model_dump(), "loop": {"step": 2}}, out / "resume" / "state.pt")
    other = cfg.model_copy(update={"lr": 1e-4, "batch_size": 4, "resume": True})
    with pytest.raises(ResumeError, match="batch_size.*lr|lr.*batch_size"):
        load_resume(other)
    assert (out / "resume" / "state.pt").exists()
    # nothing to resume from: a clear error, not a silent fresh start
    with pytest.raises(ResumeError, match="no resumable state"):
        load_resume(BaseTrainConfig(model=MODEL, out=str(tmp_path / "none"), resume=True))
