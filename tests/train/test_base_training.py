"""The tiny model's training recipe runs end to end through `groundlabel tiny` and learns."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_tiny_build_then_train_smoke(tmp_path):
    init, out = tmp_path / "init", tmp_path / "trained"
    cli = [sys.executable, "-m", "groundlabel", "tiny"]
    subprocess.run([*cli, "build", "--out", str(init), "--num-layers", "1"], check=True,
                   capture_output=True)
    res = subprocess.run([*cli, "train", "--model", str(init), "--out", str(out),
                          "--minutes", "0.3", "--batch-size", "4", "--warmup-steps", "5",
                          "--eval-every", "10", "--eval-n", "4", "--final-eval-n", "4",
                          "--threads", "1"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["steps"] > 0
    assert metrics["base"]["n"] == metrics["shifted"]["n"] == metrics["robust"]["n"] == 4
    # reported on the untouched test seed; the checkpoint was chosen on the validation seed
    assert metrics["base"]["seed"] == metrics["shifted"]["seed"] == metrics["robust"]["seed"] == 1000
    assert metrics["validation"]["base"]["seed"] == metrics["validation"]["robust"]["seed"] == 0
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    # checkpoints are chosen on the mean of the base and robust validation sets
    evals = [r["eval"] for r in log if "eval" in r]
    assert evals and all(e["mean"] == (e["base"] + e["robust"]) / 2 for e in evals)

    from safetensors.torch import load_file

    before = load_file(init / "model.safetensors")
    after = load_file(out / "model.safetensors")
    moved = [k for k in before if not (before[k].float() - after[k].float()).abs().max() < 1e-3]
    assert len(moved) > len(before) // 2  # training changed most weights


@pytest.mark.parametrize("seeds", [
    {"seed": 0},                       # training on the validation set
    {"test_seed": 1},                  # reporting on the training stream
    {"val_seed": 1000},                # choosing the checkpoint on the test set
])
def test_training_validation_and_test_sets_must_differ(seeds):
    from pydantic import ValidationError

    from train.base import BaseTrainConfig

    with pytest.raises(ValidationError, match="must differ"):
        BaseTrainConfig(model="m", out="o", **seeds)


def test_validation_and_test_sets_share_no_sample_with_training():
    import hashlib

    from grounding.synth import iter_samples
    from train.base import BaseTrainConfig

    cfg = BaseTrainConfig(model="m", out="o")

    def keys(n, seed):
        return {hashlib.sha256(s.image.tobytes() + s.text.encode()).hexdigest()
                for s in iter_samples(n, "base", seed)}

    train = keys(2000, cfg.seed)
    val, test = keys(200, cfg.val_seed), keys(200, cfg.test_seed)
    assert not (train & val) and not (train & test) and not (val & test)
