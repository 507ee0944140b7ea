"""``groundlabel retrain``: a LoRA adapter from reviewed labels, gated, registered, promoted.

1. **Snapshot.** The accepted and corrected items of one version of the reviewed-label store
   (`grounding.store`), split by a hash of ``item_id`` into train and held-out sets (an item
   stays on its side in every later snapshot, so held-out items are never trained on).
2. **Train.** Ray Train's ``TorchTrainer`` runs `train_loop` on each worker: the base model
   frozen, a peft LoRA on the language model's linear layers. QLoRA (4-bit nf4 base through
   bitsandbytes) where a CUDA GPU is there (``quantize=auto``), plain LoRA elsewhere (the CPU:
   bitsandbytes' 4-bit kernels need CUDA). Checkpoints (adapter + optimizer state) go to Ray
   Train's storage (local or ``s3://``); the same run name resumes from the latest one.
3. **Gate.** Acc@0.5 on the held-out items for the new adapter and for the production adapter
   (or the base model), through the same vLLM engine that serves. Promoted only when better by
   ``margin``; every decision is recorded in the registry with its metrics.

Run::

    groundlabel retrain --store reviewed/ --registry adapters/
    groundlabel retrain --store s3://b/reviewed --registry s3://b/adapters --num-workers 4 \\
        --use-gpu --s3-endpoint-url http://minio:9000
    groundlabel retrain --store reviewed/ --registry adapters/ --candidate runs/my-adapter
        # gate (and register) an adapter trained elsewhere, no training
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from grounding.engines.base import EngineConfig
from grounding.settings import RaySettings, RegistryURI, Settings, StoreURI
from grounding.storage import StorageOptions

# The language model's linear layers (Qwen2/2.5/3-VL naming). vLLM applies LoRA to these; the
# vision tower stays frozen unless ``freeze_vision`` is off.
LM_LINEAR = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_LINEAR = r".*visual.*\.(qkv|proj|linear_fc1|linear_fc2)"


class RetrainConfig(Settings):
    """Settings of ``groundlabel retrain`` (ms-swift-like LoRA settings included)."""

    store: StoreURI
    registry: RegistryURI
    version: int | None = Field(None, ge=1, description="Store version to train on (default: "
                                "newest).")
    inference: EngineConfig = Field(default_factory=EngineConfig, description="The base "
                                    "checkpoint (kept frozen; its pixels settings are used for "
                                    "training too) and the engine of the gate.")
    candidate: str | None = Field(None, description="Gate this adapter folder instead of "
                                  "training one.")
    target_modules: str = Field(LM_LINEAR, description="Regex of the modules LoRA adapts.")
    rank: int = Field(16, ge=1, description="LoRA rank r.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    lr: float = Field(2e-3, gt=0, description="Peak learning rate (AdamW; warm-up, cosine decay).")
    warmup_frac: float = Field(0.05, ge=0, lt=1, description="Warm-up share of the steps.")
    epochs: float = Field(6.0, gt=0, description="Passes over the training items.")
    batch_size: int = Field(8, ge=1, description="Items per optimizer step (per worker).")
    max_minutes: float = Field(10.0, gt=0, description="Training time cap; the schedule "
                               "(cosine) is fitted to the steps that fit.")
    coord_step: int | None = Field(None, ge=1, description="Round 0-1000 target coordinates "
                                   "to this grid (default: the checkpoint's groundlabel.json "
                                   "coord_step, else 1 = exact).")
    augment: bool = Field(True, description="Horizontal flip (left/right swapped in the text) "
                          "and zoom-out, each with p=0.5, freshly every epoch.")
    mask_label_text: bool = Field(True, description="No loss on the expression Qwen echoes "
                                  "in `\"label\": ...` (new words would swamp the gradient).")
    freeze_vision: bool = Field(True, description="Keep the vision tower frozen (no LoRA on it).")
    quantize: Literal["auto", "nf4", "none"] = Field(
        "auto", description="auto: QLoRA (nf4 via bitsandbytes) on CUDA, LoRA elsewhere.")
    holdout_frac: float = Field(0.2, gt=0, lt=1, description="Share of items held out for the "
                                "gate (by item_id hash, stable across versions).")
    max_items: int | None = Field(None, ge=1, description="Train on at most this many items.")
    margin: float = Field(0.02, description="Promote only if Acc@0.5 beats production by this.")
    promote: bool = Field(True, description="Promote when the gate passes (else only record).")
    seed: int = Field(0, description="Shuffling / init seed.")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data parallel).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: int = Field(2, ge=1, description="CPUs per worker (torch threads).")
    storage_path: str = Field("runs/retrain", description="Ray Train storage for checkpoints "
                              "(folder or s3://).")
    checkpoint_every_s: float = Field(60.0, gt=0, description="Seconds between checkpoints "
                                      "(adapter + optimizer) in the Ray Train storage.")
    run_name: str | None = Field(None, description="Ray Train run name; the same name resumes "
                                 "(default: from store, version and recipe).")
    storage: StorageOptions = Field(default_factory=StorageOptions, description="Object "
                                    "storage for the store, registry, images and checkpoints.")
    ray: RaySettings = Field(default_factory=RaySettings, description="The Ray cluster.")
    eval_batch_size: int = Field(32, ge=1, description="Requests per vLLM call in the gate.")


def split(items: list[dict], holdout_frac: float) -> tuple[list[dict], list[dict]]:
    """(train, held-out) by a hash of item_id: stable across snapshots and processes."""
    train, held = [], []
    for it in items:
        h = int(hashlib.sha256(it["item_id"].encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (held if h < holdout_frac else train).append(it)
    return train, held


def _recipe(cfg: RetrainConfig) -> dict:
    recipe = cfg.model_dump(include={"target_modules", "rank", "alpha", "dropout", "lr",
                                     "warmup_frac", "epochs", "batch_size", "max_minutes",
                                     "freeze_vision", "quantize", "coord_step",
                                     "mask_label_text", "augment", "seed", "max_items"})
    recipe.update(min_pixels=cfg.inference.min_pixels, max_pixels=cfg.inference.max_pixels)
    return recipe


# ---------------------------------------------------------------------------------------------
# Ray Train worker
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def fit(cfg: RetrainConfig, items: list[dict], run_name: str) -> tuple[str, dict]:
    """Run the TorchTrainer; returns (local adapter folder, last metrics)."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from grounding.storage import arrow_filesystem

    # RAY_ADDRESS (a cluster, or the Ray job this runs in) else a private local Ray: a retrain
    # sent with `ray job submit` must reach the cluster's GPU workers.
    cluster = cfg.ray.connect(log_to_driver=False)
    storage_fs, storage_path = None, str(Path(cfg.storage_path).resolve())
    if "://" in cfg.storage_path:
        storage_fs, storage_path = arrow_filesystem(cfg.storage_path, cfg.storage)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.model_dump(), "items": items},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=storage_path,
                             storage_filesystem=storage_fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} ended without a checkpoint: {result.error}")
    out = tempfile.mkdtemp(prefix="gl-adapter-")
    with result.checkpoint.as_directory() as d:
        import shutil

        shutil.copytree(f"{d}/adapter", out, dirs_exist_ok=True)
    return out, dict(result.metrics or {}, ray_cluster=cluster)


def hit(pred: list, gold: list[list[float]]) -> bool:
    """Acc@0.5 for one item: the first predicted box overlaps a true box with IoU >= 0.5; an
    item whose answer is "no such object" is a hit when nothing is predicted."""
    from grounding.boxes import Box

    if not gold:
        return not pred
    if not pred:
        return False
    return any(pred[0].iou(Box.from_list(g)) >= 0.5 for g in gold)


def evaluate_items(engine, items: list[dict], adapter: str | None, batch_size: int = 32,
                   storage: StorageOptions | None = None) -> dict:
    """Acc@0.5 of ``adapter`` (None = base model) on labeled items, through ``engine``."""
    from grounding.engines.grounder import Grounder, GroundingRequest
    from grounding.images import decode, read_bytes

    grounder = Grounder(engine)
    hits, n, unreadable = 0, 0, 0
    for i in range(0, len(items), batch_size):
        chunk, reqs = [], []
        for it in items[i:i + batch_size]:
            try:
                img = decode(read_bytes(it["image"], storage))
            except ValueError:
                unreadable += 1
                continue
            chunk.append(it)
            reqs.append(GroundingRequest(img, it["text"], adapter))
        for it, res in zip(chunk, grounder.ground(reqs), strict=True):
            n += 1
            hits += hit(res.boxes, it["boxes"])
    return {"acc@0.5": round(hits / n, 4) if n else None, "n": n, "unreadable": unreadable}


def gate(cfg: RetrainConfig, adapter_dir: str, held: list[dict], production: str | None,
         registry) -> dict:
    """Held-out Acc@0.5 of the new adapter and of production (or the base), through vLLM."""
    from grounding.engines import load_engine

    storage = cfg.storage
    rank = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("r", 16)
    engine = load_engine(cfg.inference.model_copy(update={
        "max_lora_rank": max(cfg.inference.max_lora_rank, int(rank)),
        "vision_lora": not cfg.freeze_vision}))
    try:
        # Names never reused: vLLM caches adapters by name.
        new = f"candidate-{Path(adapter_dir).name}-{time.time_ns()}"
        engine.add_adapter(new, adapter_dir)
        prod_name = None
        if production:
            cache = tempfile.mkdtemp(prefix="gl-prod-")
            prod_name = f"prod-{production}"
            engine.add_adapter(prod_name, registry.download(production, cache))
        new_m = evaluate_items(engine, held, new, cfg.eval_batch_size, storage)
        prod_m = evaluate_items(engine, held, prod_name, cfg.eval_batch_size, storage)
    finally:
        engine.close()
    better = (new_m["acc@0.5"] or 0) >= (prod_m["acc@0.5"] or 0) + cfg.margin
    return {"candidate": new_m, "production": dict(prod_m, name=production),
            "margin": cfg.margin, "passed": bool(better)}


def retrain(cfg: RetrainConfig) -> dict:
    """Snapshot -> train (Ray Train) -> gate (vLLM) -> register -> promote or refuse."""
    from grounding.registry import AdapterRegistry
    from grounding.store import ReviewStore, StoreError

    opts = cfg.storage
    store = ReviewStore(cfg.store, opts)
    version = cfg.version or store.latest()
    if not version:
        raise StoreError(f"{cfg.store} has no reviewed labels yet")
    items = store.labels(version)
    train_items, held = split(items, cfg.holdout_frac)
    if cfg.max_items:
        train_items = train_items[:cfg.max_items]
    if not held or (not train_items and not cfg.candidate):
        raise StoreError(f"version {version} has {len(items)} usable labels: too few to train "
                         f"and hold out {cfg.holdout_frac:.0%}")
    registry = AdapterRegistry(cfg.registry, opts)
    t0 = time.time()
    # The lock is held for the whole run: two retrains never overlap, and production cannot
    # change between the gate's measurement and the promotion.
    with registry.lock() as lease:
        recipe = _recipe(cfg)
        run_name = cfg.run_name or "retrain-" + hashlib.sha256(json.dumps(
            [cfg.store, version, cfg.inference.model, recipe], sort_keys=True).encode()).hexdigest()[:12]
        if cfg.candidate:
            adapter_dir, train_metrics = cfg.candidate, {"trained": False}
        else:
            adapter_dir, train_metrics = fit(cfg, train_items, run_name)
        train_s = time.time() - t0
        production = registry.production()
        verdict = gate(cfg, adapter_dir, held, production, registry)
        meta = {"base_model": cfg.inference.model, "store": cfg.store, "snapshot_version": version,
                "train_items": len(train_items), "heldout_items": len(held),
                "recipe": recipe, "run_name": run_name, "train_metrics": train_metrics,
                "gate": verdict, "seconds": round(train_s, 1)}
        name = registry.register(adapter_dir, meta)
        if verdict["passed"] and cfg.promote:
            event = registry.promote_locked(name, "gate", lease, verdict)
            decision = "promoted"
        else:
            decision = "refused" if not verdict["passed"] else "passed (not promoted)"
            event = registry.record("refuse" if not verdict["passed"] else "pass",
                                    name=name, production=production, metrics=verdict)
    return {"adapter": name, "decision": decision, "event": event, "production": production
            if decision != "promoted" else name, "snapshot_version": version,
            "gate": verdict, "train_items": len(train_items), "heldout_items": len(held),
            "train_metrics": train_metrics, "seconds": round(time.time() - t0, 1)}
