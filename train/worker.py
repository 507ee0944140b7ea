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
    """One Ray Train worker: LoRA (QLoRA over an nf4 base where bitsandbytes runs) on a frozen
    base, checkpoints through ``ray.train.report``.

    With several workers every rank trains on its own disjoint shard (``items[rank::world]``)
    but follows ONE step plan: steps per epoch come from the global item count and world size,
    and the time cap, the stop and the checkpoint instants are decided by rank 0 and shared
    every step (`_Sync`), so no rank can run a step the others do not (a DDP all-reduce would
    hang) and every rank calls ``ray.train.report`` the same number of times.
    """
    import ray.train
    import torch

    cfg = RetrainConfig(**config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.cpus_per_worker)
    torch.manual_seed(cfg.seed)
    sync = _Sync(world)
    model, processor, quant = _load_for_training(cfg)
    items, images, skipped = _load_shard(shard(config["items"], rank, world), cfg)
    n_items, n_skipped = sync.totals(len(items), skipped)
    if not items:
        raise ValueError(f"worker {rank}/{world} has no readable training item "
                         f"({len(config['items'])} items for {world} workers): use fewer workers")
    example = _example_maker(cfg, model, processor, items, images, rank)
    steps_per_epoch = plan_steps_per_epoch(n_items, cfg.batch_size, world)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=0.0)
    state = _resume(model, opt, {"step": 0, "train_s": 0.0, "resumed_from_step": None,
                                 "total": max(1, int(cfg.epochs * steps_per_epoch)),
                                 "first_loss": None, "history": []})
    if world > 1:
        import ray.train.torch

        model = ray.train.torch.prepare_model(model, move_to_device=False)
    model.train()
    _fit_loop(cfg, model, processor, opt, state, example, len(items), steps_per_epoch,
              rank, sync, {"examples": n_items, "skipped": n_skipped, "world_size": world,
                           "samples_per_step": cfg.batch_size * world, **quant})


def shard(items: list, rank: int, world: int) -> list:
    """Rank ``rank``'s items: every ``world``-th one. The shards are disjoint, cover all items
    and differ in size by at most one."""
    return items[rank::world]


def plan_steps_per_epoch(n_items: int, batch_size: int, world: int) -> int:
    """Optimizer steps per epoch, the same on every rank: one step takes ``batch_size`` items
    on each of ``world`` workers, so an epoch is ``ceil(n / (batch_size * world))`` steps (a
    rank whose shard runs out first wraps around its own shard)."""
    return max(1, math.ceil(n_items / (batch_size * world)))


class _Sync:
    """The one collective per step that keeps ranks in lock step: the mean loss, and rank 0's
    decisions (planned total, stop, checkpoint now). A no-op with one worker."""

    def __init__(self, world: int):
        self.world = world
        self.device = None
        if world > 1:
            import ray.train.torch

            # gloo takes CPU tensors, nccl only CUDA ones
            self.device = ray.train.torch.get_device()

    def _sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def totals(self, *counts: int) -> list[int]:
        return [int(round(v)) for v in self._sum([float(c) for c in counts])]

    def step(self, rank: int, loss: float, total: int, stop: bool, ckpt: bool):
        """(mean loss over ranks, total, stop, checkpoint) with rank 0's decisions."""
        mine = [float(total), float(stop), float(ckpt)] if rank == 0 else [0.0, 0.0, 0.0]
        s_loss, s_total, s_stop, s_ckpt = self._sum([loss, *mine])
        return s_loss / self.world, int(round(s_total)), s_stop > 0, s_ckpt > 0


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

    from grounding.checkpoint import resize_spec
    from grounding.engines.hf_engine import HFEngine
    from train.data import make_example

    inf = cfg.inference
    engine = HFEngine(inf.model_copy(update={"engine": "transformers"}), model=model,
                      processor=processor)
    family = inf.resolve_family()
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
              steps_per_epoch: int, rank: int, sync: _Sync, counts: dict) -> None:
    """Steps until the planned total or the time cap; checkpoints every checkpoint_every_s.

    ``n_items`` is this rank's shard; every step takes ``batch_size`` of them, wrapping around
    the shard, so all ranks take the same number of steps whatever their shard sizes.
    """
    import random

    from train.data import encode

    budget = cfg.max_minutes * 60
    t0 = time.time() - state["train_s"]
    t_start, step_start = time.time(), state["step"]
    last_ckpt = time.time()
    loss_ema, order, order_epoch = None, [], -1
    while state["step"] < state["total"]:
        epoch, k = divmod(state["step"], steps_per_epoch)
        if epoch != order_epoch:  # also right after a resume in mid-epoch
            order, order_epoch = list(range(n_items)), epoch
            random.Random(cfg.seed * 1000 + epoch).shuffle(order)
        idx = [order[(k * cfg.batch_size + j) % n_items] for j in range(cfg.batch_size)]
        batch = encode(processor, [example(i) for i in idx], cfg.mask_label_text)
        _set_lr(cfg, opt, state)
        lr = opt.param_groups[0]["lr"]
        loss = _optimizer_step(model, opt, batch)
        state["step"] += 1
        state["train_s"] = time.time() - t0
        total = state["total"]
        # The time cap shortens the run: the cosine schedule is refitted to the steps that fit.
        # Rank 0's clock decides for all (see _Sync).
        if state["step"] == 20:
            total = min(total, max(21, int(budget / (state["train_s"] / 20))))
        stop = state["step"] >= total or state["train_s"] >= budget
        ckpt = stop or time.time() - last_ckpt > cfg.checkpoint_every_s
        loss, state["total"], stop, ckpt = sync.step(rank, loss, total, stop, ckpt)
        if state["first_loss"] is None:
            state["first_loss"] = loss
        # Every step's (mean) loss and learning rate: small (4 numbers a step), kept in the
        # checkpointed state so a resumed run still has its whole curve; the driver takes it
        # out of the metrics (train.retrain.fit) for MLflow.
        state.setdefault("history", []).append(
            [state["step"], round(loss, 6), lr, round(state["train_s"], 2)])
        loss_ema = loss if loss_ema is None else 0.9 * loss_ema + 0.1 * loss
        if ckpt:
            import resource

            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            run_s = time.time() - t_start
            _report(model, opt, state, rank, {
                "loss": loss_ema, "first_loss": state["first_loss"], "step": state["step"],
                "total_steps": state["total"], "epoch": state["step"] / steps_per_epoch,
                "train_s": round(state["train_s"], 1),
                "samples_per_s": round((state["step"] - step_start)
                                       * counts["samples_per_step"] / max(run_s, 1e-9), 2),
                **counts, "worker_peak_rss_mb": round(peak_mb),
                "resumed_from_step": state["resumed_from_step"],
                "history": state["history"]})
            last_ckpt = time.time()
        if stop:
            break


def _checkpoint_meta(model: str) -> dict:
    p = Path(model) / "groundlabel.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def nf4_support(device: str) -> tuple[bool, str]:
    """Whether bitsandbytes can run nf4 on ``device`` ("cpu" or "cuda[:i]"), and why (not).

    Decided by a real round trip (quantize a small tensor to nf4 and back on the device), not by
    the device type: bitsandbytes >= 0.46 runs 4-bit on the CPU through its CPU backend, and an
    installed wheel can still lack the library for the CUDA at hand.
    """
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
    except ImportError as e:
        return False, f"bitsandbytes is not importable ({e})"
    import torch

    try:
        x = torch.linspace(-1, 1, 256, device=device, dtype=torch.bfloat16).reshape(4, 64)
        q, qs = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
        err = (F.dequantize_4bit(q, qs, quant_type="nf4") - x).abs().max().item()
    except Exception as e:  # noqa: BLE001 - any failure means "cannot run here"; say which
        return False, f"bitsandbytes {bnb.__version__} cannot run nf4 on {device} ({e!r:.200})"
    if not err < 0.2:
        return False, f"bitsandbytes {bnb.__version__} nf4 round trip on {device} is off by {err}"
    from bitsandbytes.cextension import BNB_BACKEND

    return True, f"bitsandbytes {bnb.__version__} runs nf4 on {device} ({BNB_BACKEND} backend)"


def choose_quantization(quantize: str, device: str) -> tuple[str, str]:
    """``("nf4" | "none", reason)`` for the ``quantize`` setting on ``device``: ``auto`` takes
    nf4 wherever bitsandbytes runs it; an explicit ``nf4`` that cannot run is an error."""
    if quantize == "none":
        return "none", "quantize=none"
    ok, why = nf4_support(device)
    if quantize == "nf4":
        if not ok:
            raise RuntimeError(f"quantize=nf4 asked for, but {why}")
        return "nf4", f"quantize=nf4: {why}"
    return ("nf4" if ok else "none"), f"quantize=auto: {why}"


def nf4_compute_dtype(device: str):
    """The dtype QLoRA's 4-bit weights are dequantized to for each matmul on ``device``: bf16 on
    CUDA; float32 on the CPU, where bf16 matmuls are emulated on CPUs without native bf16 (54x
    slower than float32 on the 2-core EPYC CI machine: bench/RESULTS.md, issue 32)."""
    import torch

    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def _load_for_training(cfg: RetrainConfig):
    """(peft model, processor, {"quantization", "quantization_reason", "linear4bit_layers"})
    on this worker's device."""
    import logging

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    inf = cfg.inference
    kw = {k: v for k, v in (("min_pixels", inf.min_pixels), ("max_pixels", inf.max_pixels)) if v}
    processor = AutoProcessor.from_pretrained(inf.model, **kw)
    cuda = torch.cuda.is_available()
    if cuda:
        import ray.train.torch

        device = ray.train.torch.get_device()  # this worker's GPU (local rank)
    else:
        device = torch.device("cpu")
    quant, reason = choose_quantization(cfg.quantize, str(device))
    logging.getLogger("groundlabel.retrain").warning("quantization: %s (%s)", quant, reason)
    load_kw: dict = {"dtype": torch.bfloat16 if cuda else torch.float32}
    compute = nf4_compute_dtype(str(device)) if quant == "nf4" else None
    if quant == "nf4":
        from transformers import BitsAndBytesConfig

        # The weights are 4-bit everywhere; the matmuls run in bf16 on CUDA, in float32 on
        # the CPU (bf16 is emulated there: nf4_compute_dtype).
        load_kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute)
        # accelerate places the quantized weights; "cpu" where there is no GPU (an index
        # would mean a CUDA device).
        load_kw["device_map"] = {"": device.index if cuda else "cpu"}
    model = AutoModelForImageTextToText.from_pretrained(inf.model, **load_kw)
    if quant == "nf4":
        from peft import prepare_model_for_kbit_training

        # peft's k-bit recipe: freezes the base, casts the remaining fp16/bf16 weights (norms,
        # embeddings) to fp32 for stable training, and makes the inputs require grad. No
        # gradient checkpointing: the tiny-to-small models trained here fit without it, and it
        # re-runs the forward (slower).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    elif cuda:
        model = model.to(device)
    target = cfg.target_modules if cfg.freeze_vision else f"({cfg.target_modules})|({VISION_LINEAR})"
    model = get_peft_model(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha,
                                             lora_dropout=cfg.dropout, target_modules=target,
                                             task_type="CAUSAL_LM"))
    # Evidence, not intent: how many linear layers really hold 4-bit weights (bitsandbytes'
    # own class; peft's LoRA wrapper around one is also named Linear4bit and is not counted).
    n4 = 0
    if quant == "nf4":
        import bitsandbytes as bnb

        n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    return model, processor, {"quantization": quant, "quantization_reason": reason,
                              "linear4bit_layers": n4,
                              "compute_dtype": compute and str(compute)}


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
