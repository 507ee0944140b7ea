"""``groundlabel retrain``: a LoRA adapter from reviewed labels, gated, registered, promoted.

1. **Snapshot.** The accepted and corrected items of one version of the reviewed-label store
   (`grounding.store`), split by a hash of ``item_id`` into train and held-out sets (an item
   stays on its side in every later snapshot, so held-out items are never trained on).
2. **Train.** Ray Train's ``TorchTrainer`` runs `train_loop` on each worker: the base model
   frozen, a peft LoRA on the language model's linear layers. QLoRA (4-bit nf4 base through
   bitsandbytes) wherever bitsandbytes runs it (``quantize=auto``: CUDA, or its CPU backend),
   plain LoRA elsewhere; the choice is in the train metrics. ``--num-workers N`` trains data
   parallel, each worker on its own shard, all in lock step. Checkpoints (adapter + optimizer
   state) go to Ray Train's storage (local or ``s3://``); the same run name resumes from the
   latest one; a killed worker restarts from it (``max_failures``).
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
import tempfile
import time
from pathlib import Path

from train.config import RetrainConfig, recipe_of
from train.gate import gate, split
from train.worker import train_loop

__all__ = ["RetrainConfig", "fit", "retrain"]


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def fit(cfg: RetrainConfig, items: list[dict], run_name: str) -> tuple[str, dict]:
    """Run the TorchTrainer; returns (local adapter folder, last metrics)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
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
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             # A killed worker (OOM, preempted node) restarts the worker group
                             # from the last checkpoint instead of failing the retrain.
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} ended without a checkpoint: {result.error}")
    import logging

    m = result.metrics or {}
    # which base the adapter was trained over (auto decides per machine): said here, and kept
    # in the train metrics the registry records
    logging.getLogger("groundlabel.retrain").info(
        "run %s: %s workers, quantization %s (%s)", run_name, m.get("world_size"),
        m.get("quantization"), m.get("quantization_reason"))
    out = tempfile.mkdtemp(prefix="gl-adapter-")
    with result.checkpoint.as_directory() as d:
        import shutil

        shutil.copytree(f"{d}/adapter", out, dirs_exist_ok=True)
    return out, dict(m, ray_cluster=cluster)


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
        recipe = recipe_of(cfg)
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
