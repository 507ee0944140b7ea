"""One Ray Train worker of ``groundlabel retrain``: LoRA on a frozen base, checkpoints through
``ray.train.report``. Runs in the worker processes `train.retrain.fit` starts."""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

from train.config import VISION_LINEAR, RetrainConfig


def train_loop(config: dict) -> None:
    """One Ray Train worker: LoRA on a frozen base, checkpoints through ``ray.train.report``."""
    import ray.train
    import torch

    cfg = RetrainConfig(**config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.cpus_per_worker)
    torch.manual_seed(cfg.seed)
    model, processor = _load_for_training(cfg)
    items, images, skipped = _load_shard(config["items"][rank::world], cfg)
    example = _example_maker(cfg, model, processor, items, images, rank)
    steps_per_epoch = max(1, math.ceil(len(items) / cfg.batch_size))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=0.0)
    state = _resume(model, opt, {"step": 0, "train_s": 0.0, "resumed_from_step": None,
                                 "total": max(1, int(cfg.epochs * steps_per_epoch))})
    if world > 1:
        import ray.train.torch

        model = ray.train.torch.prepare_model(model, move_to_device=False)
    model.train()
    _fit_loop(cfg, model, processor, opt, state, example, len(items), steps_per_epoch,
              rank, {"examples": len(items), "skipped": skipped})


def _load_shard(items: list[dict], cfg: RetrainConfig) -> tuple[list[dict], list, int]:
    """This worker's items with their ORIGINAL images (decoded once; examples are made per
    step so that each epoch sees a fresh augmentation); unreadable ones are counted."""
    from train.data import load_item_image

    kept, images, skipped = [], [], 0
    for it in items:
        try:
            images.append(load_item_image(it, cfg.storage))
            kept.append(it)
        except ValueError:  # unreadable image since review: skipped, counted
            skipped += 1
    return kept, images, skipped


def _example_maker(cfg: RetrainConfig, model, processor, items, images, rank: int):
    """``example(i)``: item ``i`` as a training example, rendered as the engine would."""
    import random

    from grounding.checkpoint import detect_family, resize_spec
    from grounding.engines.hf_engine import HFEngine
    from grounding.families import get_family
    from train.data import make_example

    inf = cfg.inference
    engine = HFEngine(inf.model_copy(update={"engine": "transformers"}), model=model,
                      processor=processor)
    family = get_family(inf.family or detect_family(inf.model))
    resize = resize_spec(inf.model, inf.min_pixels, inf.max_pixels)
    step = cfg.coord_step or _checkpoint_meta(inf.model).get("coord_step", 1)
    aug_rng = random.Random(cfg.seed + 7919 * rank)

    def example(i: int):
        return make_example(items[i], engine, family, resize, coord_step=step, image=images[i],
                            rng=aug_rng if cfg.augment else None)

    return example


def _resume(model, opt, state: dict) -> dict:
    """Adapter weights, optimizer and step counter from Ray Train's latest checkpoint."""
    import ray.train
    import torch

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return state
    with ckpt.as_directory() as d:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(f"{d}/adapter/adapter_model.safetensors"))
        extra = torch.load(f"{d}/trainer_state.pt", weights_only=False)
        opt.load_state_dict(extra["optimizer"])
        return dict(extra["state"], resumed_from_step=extra["state"]["step"])


def _set_lr(cfg: RetrainConfig, opt, state: dict) -> None:
    """Linear warm-up, then cosine decay over ``state["total"]`` steps."""
    frac = state["step"] / state["total"]
    warm = min(1.0, (state["step"] + 1) / max(1, cfg.warmup_frac * state["total"]))
    for g in opt.param_groups:
        g["lr"] = cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * frac))


def _optimizer_step(model, opt, batch) -> float:
    import torch

    loss = model(**batch).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    return loss.item()


def _fit_loop(cfg: RetrainConfig, model, processor, opt, state: dict, example, n_items: int,
              steps_per_epoch: int, rank: int, counts: dict) -> None:
    """Steps until the planned total or the time cap; checkpoints every checkpoint_every_s."""
    import random

    from train.data import encode

    order = list(range(n_items))
    budget = cfg.max_minutes * 60
    t0 = time.time() - state["train_s"]
    last_ckpt = time.time()
    loss_ema = None
    while state["step"] < state["total"]:
        epoch, k = divmod(state["step"], steps_per_epoch)
        if k == 0 or not order:
            random.Random(cfg.seed * 1000 + epoch).shuffle(order)
        idx = order[k * cfg.batch_size:(k + 1) * cfg.batch_size] or order[:cfg.batch_size]
        batch = encode(processor, [example(i) for i in idx], cfg.mask_label_text)
        _set_lr(cfg, opt, state)
        loss = _optimizer_step(model, opt, batch)
        state["step"] += 1
        state["train_s"] = time.time() - t0
        loss_ema = loss if loss_ema is None else 0.9 * loss_ema + 0.1 * loss
        # The time cap shortens the run: the cosine schedule is refitted to the steps that fit.
        if state["step"] == 20:
            per_step = state["train_s"] / 20
            state["total"] = min(state["total"], max(21, int(budget / per_step)))
        done = state["step"] >= state["total"] or state["train_s"] >= budget
        if done or time.time() - last_ckpt > cfg.checkpoint_every_s:
            import resource

            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            _report(model, opt, state, rank, {"loss": loss_ema, "step": state["step"],
                                              "epoch": state["step"] / steps_per_epoch,
                                              "train_s": round(state["train_s"], 1), **counts,
                                              "worker_peak_rss_mb": round(peak_mb),
                                              "resumed_from_step": state["resumed_from_step"]})
            last_ckpt = time.time()
        if done:
            break


def _checkpoint_meta(model: str) -> dict:
    p = Path(model) / "groundlabel.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def _load_for_training(cfg: RetrainConfig):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    inf = cfg.inference
    kw = {k: v for k, v in (("min_pixels", inf.min_pixels), ("max_pixels", inf.max_pixels)) if v}
    processor = AutoProcessor.from_pretrained(inf.model, **kw)
    quant = cfg.quantize == "nf4" or (cfg.quantize == "auto" and torch.cuda.is_available())
    load_kw: dict = {"dtype": torch.bfloat16 if torch.cuda.is_available() else torch.float32}
    if quant:
        from transformers import BitsAndBytesConfig

        load_kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        load_kw["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForImageTextToText.from_pretrained(inf.model, **load_kw)
    if quant:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    elif torch.cuda.is_available():
        model = model.to("cuda")
    target = cfg.target_modules if cfg.freeze_vision else f"({cfg.target_modules})|({VISION_LINEAR})"
    model = get_peft_model(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha,
                                             lora_dropout=cfg.dropout, target_modules=target,
                                             task_type="CAUSAL_LM"))
    return model, processor


def _report(model, opt, state: dict, rank: int, metrics: dict) -> None:
    import ray.train
    import torch
    from ray.train import Checkpoint

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        inner = getattr(model, "module", model)  # DDP wraps the peft model
        inner.save_pretrained(f"{d}/adapter")
        torch.save({"optimizer": opt.state_dict(), "state": dict(state)}, f"{d}/trainer_state.pt")
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
