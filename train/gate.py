"""The gate of ``groundlabel retrain``: the held-out split, the hit rule, and held-out
Acc@0.5 of a candidate adapter and of production through the engine that serves (vLLM)."""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

from grounding.storage import StorageOptions
from train.config import RetrainConfig


def split(items: list[dict], holdout_frac: float) -> tuple[list[dict], list[dict]]:
    """(train, held-out) by a hash of item_id: stable across snapshots and processes."""
    train, held = [], []
    for it in items:
        h = int(hashlib.sha256(it["item_id"].encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (held if h < holdout_frac else train).append(it)
    return train, held


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
