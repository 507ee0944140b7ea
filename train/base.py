"""Train the tiny Qwen3-VL base model from scratch on synthetic grounding data (CPU).

This makes the checkpoint the demo and the tests use (``models/tiny-qwen3-vl``). It is the
recipe, not a product feature: real users start from a real Qwen-VL checkpoint.

The recipe, and why:

* Full fine-tuning of every weight from random init with AdamW, a linear warm-up and a cosine
  decay over a *time* budget (``--minutes``), since what a 2-core machine can afford is time.
* Curriculum: the first ``--single-frac`` of the budget shows one object per image, so the model
  learns *where* before it has to learn *which*; then 1-3 objects with distractors.
* Targets are the exact Qwen3-VL answer text (``[{"bbox_2d": [...], "label": ...}]``, 0-1000)
  with coordinates rounded to a grid of ``--coord-step`` (10 = 1% of a side, far inside the IoU
  0.5 tolerance) so each coordinate is one of 101 classes instead of 1001.
* Loss only on the answer tokens; the prompt is masked.
* One torch thread per core at most: oversubscribed OpenMP was 5x slower on these machines.

Run::

    groundlabel tiny build --out /tmp/tiny && \\
    groundlabel tiny train --model /tmp/tiny --out /tmp/tiny-trained --minutes 30
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from pydantic import BaseModel, Field


class BaseTrainConfig(BaseModel):
    """Settings of ``groundlabel tiny train``."""

    model: str = Field(description="Checkpoint folder to start from (from `groundlabel tiny build`).")
    out: str = Field(description="Folder the best checkpoint (by held-out Acc@0.5) is written to.")
    minutes: float = Field(30.0, description="Training time budget in minutes.")
    batch_size: int = Field(16, description="Samples per optimizer step.")
    lr: float = Field(1e-3, description="Peak learning rate.")
    warmup_steps: int = Field(100, description="Linear warm-up steps.")
    single_frac: float = Field(0.15, description="Fraction of the budget with one object per image.")
    coord_step: int = Field(10, description="Round 0-1000 target coordinates to this grid.")
    eval_every: int = Field(300, description="Evaluate held-out Acc@0.5 every N steps.")
    eval_n: int = Field(96, description="Held-out samples per evaluation.")
    final_eval_n: int = Field(200, description="Held-out samples per domain in the final "
                              "evaluation written to train_metrics.json.")
    threads: int = Field(2, description="torch threads (keep <= cores).")
    seed: int = Field(1, description="Training data seed (held-out evaluation uses seed 0).")
    save_dtype: str = Field("bfloat16", description="dtype of the saved weights (bfloat16 keeps "
                            "the tiny checkpoint under 10 MB; engines upcast on load).")


def answer_text(family, sample, coord_step: int) -> str:
    """The Qwen3-VL answer for a synthetic sample, coordinates on a ``coord_step`` grid."""
    from grounding.boxes import Box, from_norm1000, to_norm1000

    size = sample.image.size
    norm = [round(v / coord_step) * coord_step for v in to_norm1000(Box.from_list(sample.bbox), size)]
    box = from_norm1000(norm, size, label=sample.text)
    return family.render([box], size)


def build_batch(engine, family, samples, coord_step: int):
    """Tokenise prompt + answer for a batch of synthetic samples (see `train.data.encode`).

    The prompt is the engine's own chat prompt, so training sees byte-for-byte what the
    engines send at inference.
    """
    from train.data import Example, encode

    return encode(engine.processor, [
        Example(s.image, engine.chat_prompt(family.prompt(s.text)),
                answer_text(family, s, coord_step) + "<|im_end|>") for s in samples])


def _evaluate(engine, model_dir: str, domain: str, n: int) -> dict:
    """Held-out Acc@0.5 through the transformers engine (greedy, parse failure = miss)."""
    from train.evaluate import SynthEvalConfig, evaluate_synthetic

    engine.model.eval()
    try:
        return evaluate_synthetic(SynthEvalConfig(model=model_dir, domain=domain, n=n, seed=0,
                                                  engine="transformers"), engine=engine)
    finally:
        engine.model.train()


def train(cfg: BaseTrainConfig) -> dict:
    import torch
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    from grounding.engines import EngineConfig
    from grounding.engines.hf_engine import HFEngine
    from grounding.families import get_family
    from grounding.synth import SynthConfig, make_sample

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    family = get_family("qwen3_vl")
    processor = AutoProcessor.from_pretrained(cfg.model)
    model = Qwen3VLForConditionalGeneration.from_pretrained(cfg.model, dtype=torch.float32)
    model.train()
    engine_cfg = EngineConfig(model=cfg.model, engine="transformers", max_new_tokens=48)
    engine = HFEngine(engine_cfg, model=model, processor=processor)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "train_log.jsonl").open("w")
    single = SynthConfig(min_objects=1, max_objects=1)
    multi = SynthConfig()
    budget = cfg.minutes * 60
    t0 = time.time()
    step, best, idx = 0, -1.0, 0
    ema = None
    while True:
        elapsed = time.time() - t0
        if elapsed >= budget:
            break
        frac = elapsed / budget
        sc = single if frac < cfg.single_frac else multi
        samples = [make_sample(idx + j, "base", cfg.seed, sc) for j in range(cfg.batch_size)]
        idx += cfg.batch_size
        batch = build_batch(engine, family, samples, cfg.coord_step)
        warm = min(1.0, (step + 1) / cfg.warmup_steps)
        lr = cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0:
            rec = {"step": step, "t": round(time.time() - t0, 1), "loss": round(ema, 4),
                   "lr": lr, "samples": idx}
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if step % cfg.eval_every == 0:
            m = _evaluate(engine, cfg.model, "base", cfg.eval_n)
            rec = {"step": step, "t": round(time.time() - t0, 1), "eval_base": m}
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if m["acc@0.5"] >= best:
                best = m["acc@0.5"]
                _save(model, processor, out, cfg)
    # Final evaluation of the best checkpoint on larger held-out sets of both domains.
    m = _evaluate(engine, cfg.model, "base", cfg.eval_n)
    if m["acc@0.5"] >= best:
        _save(model, processor, out, cfg)
    best_engine = HFEngine(EngineConfig(model=str(out), engine="transformers", max_new_tokens=48))
    metrics = {
        "steps": step,
        "samples_seen": idx,
        "train_seconds": round(time.time() - t0, 1),
        "base": _evaluate(best_engine, str(out), "base", cfg.final_eval_n),
        "shifted": _evaluate(best_engine, str(out), "shifted", cfg.final_eval_n),
        "recipe": cfg.model_dump(),
    }
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics), flush=True)
    return metrics


def _save(model, processor, out: Path, cfg: BaseTrainConfig) -> None:
    import shutil

    import torch

    # A cast copy of the weights: the live model keeps training in float32.
    dtype = getattr(torch, cfg.save_dtype)
    model.save_pretrained(out, state_dict={k: v.to(dtype) for k, v in model.state_dict().items()})
    processor.save_pretrained(out)
    src = Path(cfg.model) / "groundlabel.json"
    if src.exists():
        shutil.copy(src, out / "groundlabel.json")
        # Retraining rounds its targets to the same grid (train/data.py).
        meta = json.loads((out / "groundlabel.json").read_text())
        meta["coord_step"] = cfg.coord_step
        (out / "groundlabel.json").write_text(json.dumps(meta, indent=2))
