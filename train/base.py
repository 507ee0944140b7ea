"""Train the tiny Qwen3-VL base model from scratch on synthetic grounding data (CPU).

This makes the checkpoint the demo and the tests use (``models/tiny-qwen3-vl``). It is the
recipe, not a product feature: real users start from a real Qwen-VL checkpoint.

The recipe, and why:

* Full fine-tuning of every weight from random init with AdamW, a linear warm-up and a cosine
  decay over a *time* budget (``--minutes``), since what a 2-core machine can afford is time.
* Curriculum: the first ``--single-frac`` of the budget shows one object per image, so the model
  learns *where* before it has to learn *which*; then 1-3 objects with distractors.
* Widened domain: a ``--varied-share`` of the samples come from `grounding.synth.VARIED` (any
  background colour, gradients, noise; 96-448 px, aspect up to 3:1; 1-4 objects), the rest
  from the classic layout, so ordinary images do not break the model. The best checkpoint is
  chosen on the mean validation Acc@0.5 of the ``base`` and ``robust`` sets.
* Continuing: ``--model`` may be a trained checkpoint (e.g. ``models/tiny-qwen3-vl``); training
  continues from its weights (fresh optimizer state, hence the warm-up).
* Resuming after a crash or a kill: every ``--checkpoint-every`` steps (and at the end) the whole
  training state (float32 weights, AdamW moments, the loop's position in the sample stream and
  the schedule, the torch RNG) is written to ``OUT/resume/state.pt`` by an atomic rename, so a
  killed process leaves the last complete state. ``--resume`` continues from it, refusing a
  state written under another recipe. With ``--steps`` (the schedule counted in steps, not
  minutes) a resumed run ends with exactly the weights of an uninterrupted one; with
  ``--minutes`` it resumes with the time already spent counted against the budget.
* Targets are the exact Qwen3-VL answer text (``[{"bbox_2d": [...], "label": ...}]``, 0-1000)
  with coordinates rounded to a grid of ``--coord-step`` (10 = 1% of a side, far inside the IoU
  0.5 tolerance) so each coordinate is one of 101 classes instead of 1001.
* Loss only on the answer tokens; the prompt is masked.
* ``--colour-aux W`` adds an image-only loss (`_ColourHead`): a linear head on each object's
  merged vision tokens predicts its colour among every palette's, the shifted domain's included,
  so the vision tower keeps colour, which the base texts alone let it drop (it can tell base
  objects apart by shape; `groundlabel tiny probe`: 0.56 on the base colours). No training text
  names a shifted colour, so the shifted domain stays new words for what the model can see. 80
  steps from the bundled model: probe over all 8 colours 0.64 -> 0.86 (without the loss: 0.64).
* One torch thread per core at most: oversubscribed OpenMP was 5x slower on these machines.

Run::

    groundlabel tiny build --out /tmp/tiny && \\
    groundlabel tiny train --model /tmp/tiny --out /tmp/tiny-trained --minutes 30
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field, model_validator


class BaseTrainConfig(BaseModel):
    """Settings of ``groundlabel tiny train``."""

    model: str = Field(description="Checkpoint folder to start from (from `groundlabel tiny build`).")
    out: str = Field(description="Folder the best checkpoint (by held-out Acc@0.5) is written to.")
    minutes: float = Field(30.0, description="Training time budget in minutes.")
    batch_size: int = Field(16, description="Samples per optimizer step.")
    lr: float = Field(1e-3, description="Peak learning rate.")
    warmup_steps: int = Field(100, description="Linear warm-up steps.")
    single_frac: float = Field(0.15, description="Fraction of the budget with one object per image "
                               "(0 when resuming from a trained checkpoint).")
    varied_share: float = Field(0.6, ge=0.0, le=1.0, description="Share of training samples drawn "
                                "from the varied generator (grounding.synth.VARIED) instead of the "
                                "classic layout.")
    same_shape_share: float = Field(0.0, ge=0.0, le=1.0, description="Share of training samples "
                                    "whose objects all have one shape (SynthConfig.same_shape), "
                                    "so only the (base) colour word tells the target apart: "
                                    "hard negatives for the model's commonest miss, the right "
                                    "shape in the wrong colour. 0: the stream as before.")
    coord_step: int = Field(10, description="Round 0-1000 target coordinates to this grid.")
    eval_every: int = Field(300, description="Evaluate held-out Acc@0.5 every N steps.")
    eval_n: int = Field(96, description="Held-out samples per evaluation.")
    final_eval_n: int = Field(200, description="Held-out samples per domain in the final "
                              "evaluation written to train_metrics.json.")
    threads: int = Field(2, description="torch threads (keep <= cores).")
    seed: int = Field(1, description="Training data seed.")
    val_seed: int = Field(0, description="Seed of the validation set the best checkpoint is "
                          "chosen on (never trained on).")
    test_seed: int = Field(1000, description="Seed of the test set the final figures are "
                           "measured on: neither training nor the checkpoint choice sees it.")
    save_dtype: str = Field("bfloat16", description="dtype of the saved weights (bfloat16 keeps "
                            "the tiny checkpoint under 10 MB; engines upcast on load).")
    steps: int | None = Field(None, gt=0, description="Train exactly this many optimizer steps, "
                              "the schedule (curriculum, cosine decay) counted in steps: "
                              "reproducible, and a resumed run ends with the same weights as an "
                              "uninterrupted one. None: the --minutes budget sets the schedule.")
    checkpoint_every: int = Field(200, gt=0, description="Write the resumable training state "
                                  "(weights, optimizer, loop position, RNG) to OUT/resume every "
                                  "N steps, and at the end.")
    resume: bool = Field(False, description="Continue from OUT/resume/state.pt (written by an "
                         "earlier run of the same recipe) instead of starting afresh.")
    colour_aux: float = Field(0.0, ge=0.0, description="Weight of an auxiliary loss that makes "
                              "the vision tower separate every colour the synthetic world draws, "
                              "the shifted domain's included, from images alone: a linear head "
                              "on each object's merged vision tokens predicts its colour. No "
                              "text names a shifted colour; the head is not saved. 0: off.")
    colour_aux_images: int = Field(4, gt=0, description="Images per step for the colour loss, "
                                   "alternately base and shifted palettes (seed + "
                                   "AUX_SEED_OFFSET: never a validation or test image).")

    @model_validator(mode="after")
    def _three_sets(self):
        if len({self.seed, self.val_seed, self.test_seed}) < 3:
            raise ValueError("--seed, --val-seed and --test-seed must differ: a checkpoint chosen "
                             "or reported on the data it was trained on flatters it")
        return self


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


def _evaluate(engine, model_dir: str, domain: str, n: int, seed: int) -> dict:
    """Acc@0.5 on the ``(domain, seed)`` set through the transformers engine (greedy, parse
    failure = miss)."""
    from train.evaluate import SynthEvalConfig, evaluate_synthetic

    engine.model.eval()
    try:
        return evaluate_synthetic(SynthEvalConfig(model=model_dir, domain=domain, n=n, seed=seed,
                                                  engine="transformers"), engine=engine)
    finally:
        engine.model.train()


@dataclass
class _Loop:
    """Where the training loop stands (all of it goes into the resumable state)."""

    t0: float  # time.time() at the start of the budget, moved back by time spent before a resume
    step: int = 0  # optimizer steps taken
    best: float = -1.0  # best held-out Acc@0.5 so far (its checkpoint is in ``out``)
    idx: int = 0  # synthetic samples drawn so far (the next sample's index)
    ema: float | None = None  # smoothed training loss

    def frac(self, cfg: BaseTrainConfig) -> float | None:
        """How far through the schedule (0-1), or None when it is over."""
        if cfg.steps is not None:
            return self.step / cfg.steps if self.step < cfg.steps else None
        elapsed = time.time() - self.t0
        return elapsed / (cfg.minutes * 60) if elapsed < cfg.minutes * 60 else None


AUX_SEED_OFFSET = 500_000  # the colour loss's images: a seed no training/eval set uses


class _ColourHead:
    """The auxiliary colour loss (``--colour-aux``): a linear head over the merged vision
    features of each object (`train.probe.object_tokens`), cross-entropy against the object's
    colour among every palette's colours. Images only: its shifted-palette images carry no
    text, so the language model never sees a shifted colour word."""

    def __init__(self, model, processor, cfg: BaseTrainConfig):
        import torch

        from grounding.synth import PALETTES

        self.colours = sorted({c for p in PALETTES.values() for c in p})
        self.vis = model.model.visual
        self.processor, self.cfg, self.model = processor, cfg, model
        self.head = torch.nn.Linear(self.vis.config.out_hidden_size, len(self.colours))

    def samples(self, step: int) -> list:
        from grounding.synth import VARIED, make_sample

        n = self.cfg.colour_aux_images
        seed = self.cfg.seed + AUX_SEED_OFFSET
        return [make_sample(step * n + k, "shifted" if k % 2 else "base", seed,
                            VARIED if (step + k // 2) % 2 else None) for k in range(n)]

    def loss(self, step: int):
        import torch

        from train.probe import object_tokens

        samples = self.samples(step)
        inputs = self.processor.image_processor(images=[x.image for x in samples],
                                                return_tensors="pt")
        out = self.model.model.get_image_features(inputs["pixel_values"],
                                                  inputs["image_grid_thw"])
        feats, labels = [], []
        merge = self.vis.config.spatial_merge_size
        for x, f, grid in zip(samples, out.pooler_output, inputs["image_grid_thw"], strict=True):
            for colour, idx in object_tokens(x, grid, self.vis.config.patch_size, merge):
                feats.append(f[idx].mean(0))
                labels.append(self.colours.index(colour))
        logits = self.head(torch.stack(feats))
        return torch.nn.functional.cross_entropy(logits, torch.tensor(labels))


class ResumeError(ValueError):
    """No resumable state, or one written under another recipe."""


# Settings that may differ between a run and its resumption: they do not change what is
# trained (where it is written, how often it is checked and saved, the threads).
_FREE = {"out", "resume", "threads", "eval_every", "eval_n", "final_eval_n", "checkpoint_every"}


def load_resume(cfg: BaseTrainConfig) -> dict:
    """The state in ``OUT/resume/state.pt``, checked against ``cfg``: the same recipe (every
    setting outside `_FREE`), else `ResumeError` naming the settings that differ."""
    import torch

    path = Path(cfg.out) / "resume" / "state.pt"
    if not path.exists():
        raise ResumeError(f"no resumable state at {path}: run without --resume to start "
                          "afresh (a run writes one every --checkpoint-every steps)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    was, now = state.get("cfg", {}), cfg.model_dump()
    diff = sorted(k for k in now if k not in _FREE and was.get(k) != now[k])
    if diff:
        raise ResumeError(f"{path} was written by another recipe: "
                          + ", ".join(f"{k} {was.get(k)!r} -> {now[k]!r}" for k in diff)
                          + "; resume with the settings it was started with, or train into "
                          "another --out")
    return state


def _save_resume(cfg: BaseTrainConfig, st: _Loop, model, opt, out: Path, aux=None) -> None:
    """The whole training state to ``OUT/resume/state.pt``, replaced atomically (a kill
    mid-write leaves the previous state)."""
    import dataclasses
    import os

    import torch

    d = out / "resume"
    d.mkdir(parents=True, exist_ok=True)
    loop = dataclasses.asdict(st) | {"elapsed": time.time() - st.t0}
    tmp = d / f"state.pt.{os.getpid()}.tmp"
    torch.save({"cfg": cfg.model_dump(), "loop": loop, "model": model.state_dict(),
                "head": aux.head.state_dict() if aux is not None else None,
                "opt": opt.state_dict(), "rng": torch.get_rng_state()}, tmp)
    os.replace(tmp, d / "state.pt")


def train(cfg: BaseTrainConfig) -> dict:
    import torch

    from grounding.synth import SynthConfig

    state = load_resume(cfg) if cfg.resume else None   # refuse before any loading
    family, processor, model, engine, opt, aux = _setup(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    st = _Loop(t0=time.time())
    if state is not None:
        model.load_state_dict(state["model"])
        if aux is not None:
            aux.head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        torch.set_rng_state(state["rng"])
        loop = dict(state["loop"])
        st = _Loop(t0=time.time() - loop.pop("elapsed"),
                   **{k: v for k, v in loop.items() if k != "t0"})
    with (out / "train_log.jsonl").open("a" if state is not None else "w") as log:
        if state is not None:
            _log(log, {"resumed_from_step": st.step, "samples": st.idx,
                       "t": round(time.time() - st.t0, 1)})
        single = SynthConfig(min_objects=1, max_objects=1)
        multi = SynthConfig()
        while True:
            frac = st.frac(cfg)
            if frac is None:
                break
            samples = _next_samples(cfg, st, single if frac < cfg.single_frac else multi)
            batch = build_batch(engine, family, samples, cfg.coord_step)
            loss, lr = _step(cfg, model, opt, batch, st.step, frac, aux)
            st.step += 1
            st.ema = loss if st.ema is None else 0.98 * st.ema + 0.02 * loss
            if st.step % 50 == 0:
                _log(log, {"step": st.step, "t": round(time.time() - st.t0, 1),
                           "loss": round(st.ema, 4), "lr": lr, "samples": st.idx})
            _maybe_evaluate(cfg, st, engine, model, processor, out, log)
            if st.step % cfg.checkpoint_every == 0:
                _save_resume(cfg, st, model, opt, out, aux)
    _save_resume(cfg, st, model, opt, out, aux)
    return _final_metrics(cfg, st, engine, model, processor, out)


def _setup(cfg: BaseTrainConfig):
    """Threads and seed, then (family, processor, float32 model in train mode, engine, AdamW,
    the colour head or None)."""
    import torch
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    from grounding.engines import EngineConfig
    from grounding.engines.hf_engine import HFEngine
    from grounding.families import get_family

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    family = get_family("qwen3_vl")
    processor = AutoProcessor.from_pretrained(cfg.model)
    model = Qwen3VLForConditionalGeneration.from_pretrained(cfg.model, dtype=torch.float32)
    model.train()
    engine_cfg = EngineConfig(model=cfg.model, engine="transformers", max_new_tokens=48)
    engine = HFEngine(engine_cfg, model=model, processor=processor)
    aux = _ColourHead(model, processor, cfg) if cfg.colour_aux > 0 else None
    params = list(model.parameters()) + (list(aux.head.parameters()) if aux else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    return family, processor, model, engine, opt, aux


def _next_samples(cfg: BaseTrainConfig, st: _Loop, synth) -> list:
    """The next ``batch_size`` synthetic samples (indices ``st.idx`` on), advancing ``st.idx``.

    Sample ``i`` comes from the varied generator when ``Random(i)`` says so (a ``varied_share``
    of them), else from ``synth`` (the curriculum's classic layout); the next draw of the same
    ``Random(i)`` makes a ``same_shape_share`` of them one-shape images. The first draw is the
    one the stream always had, so share 0 is the old stream bit for bit."""
    import dataclasses
    import random

    from grounding.synth import VARIED, make_sample

    samples = []
    for i in range(st.idx, st.idx + cfg.batch_size):
        r = random.Random(i)
        gen = VARIED if r.random() < cfg.varied_share else synth
        if cfg.same_shape_share and r.random() < cfg.same_shape_share:
            gen = dataclasses.replace(gen, same_shape=True)
        samples.append(make_sample(i, "base", cfg.seed, gen))
    st.idx += cfg.batch_size
    return samples


def _lr(cfg: BaseTrainConfig, step: int, frac: float) -> float:
    """Linear warm-up over steps, cosine decay to 10% over the fraction of the time budget."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps)
    return cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _step(cfg: BaseTrainConfig, model, opt, batch, step: int, frac: float,
          aux: _ColourHead | None = None) -> tuple[float, float]:
    """One optimizer step (gradients clipped to norm 1); returns (language loss, lr used).
    With ``aux``, its colour loss (weight ``colour_aux``) is added to the language loss."""
    import torch

    lr = _lr(cfg, step, frac)
    for g in opt.param_groups:
        g["lr"] = lr
    lm = model(**batch).loss
    loss = lm + cfg.colour_aux * aux.loss(step) if aux is not None else lm
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return lm.item(), lr


def _log(log, rec: dict) -> None:
    """Print a record and append it to train_log.jsonl."""
    print(json.dumps(rec), flush=True)
    log.write(json.dumps(rec) + "\n")
    log.flush()


def _keep_if_best(cfg: BaseTrainConfig, st: _Loop, acc: float, model, processor,
                  out: Path) -> None:
    """Save the live model to ``out`` when ``acc`` ties or beats the best so far."""
    if acc >= st.best:
        st.best = acc
        _save(model, processor, out, cfg)


def _maybe_evaluate(cfg: BaseTrainConfig, st: _Loop, engine, model, processor, out: Path,
                    log) -> None:
    """Every ``eval_every`` steps: held-out Acc@0.5, logged, best checkpoint kept."""
    if st.step % cfg.eval_every != 0:
        return
    m = _validate(cfg, engine)
    _log(log, {"step": st.step, "t": round(time.time() - st.t0, 1), "eval": m})
    _keep_if_best(cfg, st, m["mean"], model, processor, out)


def _validate(cfg: BaseTrainConfig, engine) -> dict:
    """Validation Acc@0.5 on ``base`` and ``robust`` and their mean (what checkpoints are
    chosen on: the classic layout and its ordinary variations weigh the same)."""
    accs = {d: _evaluate(engine, cfg.model, d, cfg.eval_n, cfg.val_seed)["acc@0.5"]
            for d in ("base", "robust")}
    return {**accs, "mean": sum(accs.values()) / len(accs)}


def _final_metrics(cfg: BaseTrainConfig, st: _Loop, engine, model, processor,
                   out: Path) -> dict:
    """Last validation (saved if best), then the best checkpoint on the validation sets and on
    the untouched test sets of both domains; written to train_metrics.json, printed and
    returned. ``base`` and ``shifted`` are the TEST figures: the ones to report."""
    from grounding.engines import EngineConfig
    from grounding.engines.hf_engine import HFEngine

    _keep_if_best(cfg, st, _validate(cfg, engine)["mean"], model, processor, out)
    best_engine = HFEngine(EngineConfig(model=str(out), engine="transformers", max_new_tokens=48))
    metrics = {
        "steps": st.step,
        "samples_seen": st.idx,
        "train_seconds": round(time.time() - st.t0, 1),
        "base": _evaluate(best_engine, str(out), "base", cfg.final_eval_n, cfg.test_seed),
        "shifted": _evaluate(best_engine, str(out), "shifted", cfg.final_eval_n, cfg.test_seed),
        "robust": _evaluate(best_engine, str(out), "robust", cfg.final_eval_n, cfg.test_seed),
        "validation": {d: _evaluate(best_engine, str(out), d, cfg.final_eval_n, cfg.val_seed)
                       for d in ("base", "shifted", "robust")},
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
