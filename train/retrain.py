"""``groundlabel retrain``: a LoRA adapter from reviewed labels, gated, registered, promoted.

1. **Snapshot.** The accepted and corrected items of one version of the reviewed-label store
   (`grounding.store`: a Delta table whose table version is the store version; the adapter's
   meta records it as ``snapshot_version``, so ``DeltaTable(store, version=snapshot_version)``
   holds exactly the records it was drawn from), split *by image* into train and held-out sets
   (`train.gate.split`: every expression of an image on one side, and the same side in every
   later snapshot, so held-out images are never trained on).
2. **Mix.** The train-side items new since production's snapshot, plus the earlier ones it was
   trained with, replayed to at least ``replay_share`` of the list (`train.gate.mix`): each
   retraining starts from the base model, so earlier labels are what keeps it from forgetting.
3. **Train.** Ray Train's ``TorchTrainer`` runs `train_loop` on each worker: the base model
   frozen, a peft LoRA on the language model's linear layers. QLoRA (4-bit nf4 base through
   bitsandbytes) wherever bitsandbytes runs it (``quantize=auto``: CUDA, or its CPU backend),
   plain LoRA elsewhere; the choice is in the train metrics. ``--num-workers N`` trains data
   parallel, each worker on its own shard, all in lock step. Checkpoints (adapter + optimizer
   state) go to Ray Train's storage (local or ``s3://``); the same run name resumes from the
   latest one; a killed worker restarts from it (``max_failures``). On a cluster
   (``--ray-address``, or ``RAY_ADDRESS`` under ``ray job submit``) the workers go where
   ``worker_resources`` point, and the gate's engine runs as a Ray task where
   ``gate_resources`` point (`on_gate_node`), never in the driver on the head node.
4. **Gate.** The new adapter and the production adapter (or the base model) answer the same
   held-out items through the same vLLM engine that serves (`train.gate`). Promoted only when
   at least ``min_heldout`` items were scored, the candidate is better by an exact one-sided
   sign test on per-image differences at this gate's alpha (``1 - confidence`` spent over the
   gates against one production: `train.gate.spend`, train/schedule.py) and by at least
   ``margin``, and the upper ``confidence`` bound of its drop on the held-out labels production
   was trained with and on the ``regression_set`` is at most ``max_forgetting`` (on at least
   ``min_forgetting`` items). Every decision, with the test, n and images, both scores, the
   discordant counts, the p-value and alpha, the bounds and the reasons, is recorded in the
   registry (event and adapter meta), and the one-line ``summary`` says it.

Run::

    groundlabel retrain --store reviewed/ --registry adapters/
    groundlabel retrain --store s3://b/reviewed --registry s3://b/adapters --num-workers 4 \\
        --use-gpu --s3-endpoint-url http://minio:9000
    groundlabel retrain --store reviewed/ --registry adapters/ --candidate runs/my-adapter
        # gate (and register) an adapter trained elsewhere, no training
    groundlabel retrain --store reviewed/ --registry adapters/ \\
        --regression-set data/base/data.jsonl --max-forgetting 0.05 --confidence 0.95
        # also refuse an adapter that loses base-domain accuracy
    groundlabel retrain --store reviewed/ --registry adapters/ \\
        --mlflow-tracking-uri http://127.0.0.1:5000
        # ... recorded as an MLflow run (train/tracking.py; or set MLFLOW_TRACKING_URI)
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

from train.config import RetrainConfig, recipe_of
from train.gate import SPLIT_RULE, gate, load_regression_set, mix, spend, split
from train.gate import summary as gate_summary
from train.worker import train_loop

__all__ = ["RetrainConfig", "fit", "retrain"]


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def fit(cfg: RetrainConfig, items: list[dict], run_name: str,
        tracking=None) -> tuple[str, dict]:
    """Run the TorchTrainer; returns (local adapter folder, last metrics). The loss and learning
    rate of every step go to ``tracking`` (`train.tracking.Tracking`), not into the metrics."""
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
                                     resources_per_worker={"CPU": cfg.cpus_per_worker,
                                                           **cfg.worker_resources}),
        run_config=RunConfig(name=run_name, storage_path=storage_path,
                             storage_filesystem=storage_fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             # A killed worker (OOM, preempted node) restarts the worker group
                             # from the last checkpoint instead of failing the retrain.
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    start_ms = int(time.time() * 1000)
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} ended without a checkpoint: {result.error}")
    import logging

    m = dict(result.metrics or {})
    history = m.pop("history", None)  # [step, loss, lr, train_s] per step (train/worker.py)
    if tracking is not None:
        tracking.steps(history, start_ms)
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


def on_gate_node(cfg: RetrainConfig, adapter_dir: str, work):
    """``work(local adapter folder)`` as a Ray task with the gate's resources (one GPU with
    ``use_gpu``, ``gate_resources``), on the cluster `RaySettings.connect` reaches; returns its
    result. The adapter's files travel through Ray's object store: the driver's folder (a
    temporary copy of the checkpoint, or ``--candidate``) does not exist on other nodes.

    Why a task and not the driver: under ``ray job submit`` the driver runs on the head node,
    which has no GPU (and, in cluster/raycluster.yaml, no CPU for work).
    """
    import ray

    from grounding.storage import folder_files, write_folder

    cfg.ray.connect(log_to_driver=False)
    files = folder_files(adapter_dir)

    def task(files: dict[str, bytes], name: str):
        with tempfile.TemporaryDirectory(prefix="gl-gate-") as d:
            # the folder name is the adapter's name in the gate
            return work(write_folder(files, Path(d) / name))

    # max_calls=1: the worker process exits after the gate, and vLLM's memory with it.
    remote = ray.remote(num_cpus=1, num_gpus=1 if cfg.use_gpu else 0,
                        resources=cfg.gate_resources, max_calls=1)(task).options(
                            name="groundlabel-gate")
    return ray.get(remote.remote(files, Path(adapter_dir).name))


def labels_for_training(store, version: int, holdout_frac: float,
                        train_on_auto: bool = False,
                        exclude: frozenset | set = frozenset()) -> tuple[list, list, list]:
    """``(people's labels, training side, held-out side)`` of a store version.

    Held-out labels are always people's (the gate judges against them). With ``train_on_auto``
    the auto-accepted predictions join the training side only, minus any whose image is held
    out (no image straddles the split). Items people disagree on without an adjudication are
    in neither side (`grounding.store.ReviewStore.snapshot`); ``exclude``: reviewers whose
    decisions are left out (`grounding.gold.ReviewerFilter`)."""
    items = store.labels(version, exclude=exclude)
    train_side, held = split(items, holdout_frac)
    if train_on_auto:
        human = {it["item_id"] for it in items}
        held_images = {it["image"] for it in held}
        train_side = train_side + [it for it in store.labels(version, include_auto=True, exclude=exclude)
                                   if it["item_id"] not in human
                                   and it["image"] not in held_images]
    return items, train_side, held


def retrain(cfg: RetrainConfig, trigger: dict | None = None) -> dict:
    """Snapshot -> split by image -> train (Ray Train) -> gate (vLLM) -> register -> promote or
    refuse; an MLflow run with a tracking URI (`train.tracking`; ``trigger``: tags saying what
    started it)."""
    from train.tracking import Tracking

    # MLflow: the server is checked and the run created before anything is read or trained
    # (nothing at all without a tracking URI); the run ends FAILED if the retrain raises.
    with Tracking.start(cfg, trigger) as tracking:
        result = _retrain(cfg, tracking)
        tracking.finish(result, cfg.registry)
    return result | tracking.summary()


def _retrain(cfg: RetrainConfig, tracking) -> dict:
    """`retrain` itself; ``tracking``: its MLflow run (`train.tracking.Tracking`, maybe off)."""
    from grounding.registry import AdapterRegistry, RegistryError
    from grounding.store import ReviewStore, StoreError

    opts = cfg.storage
    store = ReviewStore(cfg.store, opts)
    version = cfg.version or store.latest()  # the Delta table version: the lineage recorded
    if not version:
        raise StoreError(f"{cfg.store} has no reviewed labels yet")
    exclude, excluded = cfg.reviewers.excluded(store, version, opts)
    items, train_side, held = labels_for_training(store, version, cfg.holdout_frac,
                                                  cfg.train_on_auto, exclude)
    if not held or (not train_side and not cfg.candidate):
        raise StoreError(f"version {version} has {len(items)} usable labels: too few to train "
                         f"and hold out {cfg.holdout_frac:.0%}")
    regression = (load_regression_set(cfg.regression_set, cfg.regression_format, opts)
                  if cfg.regression_set else None)
    registry = AdapterRegistry(cfg.registry, opts)
    t0 = time.time()
    # The training lease only keeps two retrains from training at once (compute); what keeps
    # production right is the promotion itself: one commit, conditional on the production the
    # gate compared against (refused if anything moved it meanwhile).
    with registry.training_lease():
        production = registry.production()
        earlier_ids, since, since_note = earlier_labels(store, registry, production, cfg.store)
        earlier = earlier_ids or set()
        new_side = [it for it in train_side if it["item_id"] not in earlier]
        old_side = [it for it in train_side if it["item_id"] in earlier]
        train_items, replay = mix(new_side, old_side, cfg.replay_share, cfg.seed, cfg.max_items)
        replay["since_version"] = since
        recipe = recipe_of(cfg)
        run_name = cfg.run_name or "retrain-" + hashlib.sha256(json.dumps(
            [cfg.store, version, cfg.inference.model, recipe, SPLIT_RULE, since],
            sort_keys=True).encode()).hexdigest()[:12]
        tracking.data(cfg.store, version, train_items, held, run_name, replay)  # MLflow
        if cfg.candidate:
            adapter_dir, train_metrics = cfg.candidate, {"trained": False}
        else:
            adapter_dir, train_metrics = fit(cfg, train_items, run_name, tracking)
        train_s = time.time() - t0
        # The gate's engine runs where --gate-resources point (a GPU node), not in the driver.
        # This gate's level among the gates against this production (k read from the
        # registry's events: a restarted scheduler carries on).
        sequential = spend(registry.events(), production, cfg.confidence, cfg.alpha_spending)
        verdict = on_gate_node(cfg, adapter_dir, lambda local: gate(
            cfg, local, held, production, registry, earlier_ids, since_note, regression,
            sequential))
        meta = {"base_model": cfg.inference.model, "store": cfg.store, "snapshot_version": version,
                "train_items": len(train_items), "heldout_items": len(held),
                "replay": replay, "recipe": recipe, "run_name": run_name,
                "train_metrics": train_metrics, "gate": verdict, "seconds": round(train_s, 1)}
        meta |= tracking.meta()  # MLflow: the run that recorded this adapter (none: nothing)
        name = registry.register(adapter_dir, meta)
        decision, now = None, production
        if verdict["passed"] and cfg.promote:
            try:
                event = registry.promote(name, "gate", verdict, expected=production,
                                         key=f"retrain:{name}:promote")
                decision, now = "promoted", name
            except RegistryError as e:  # production moved while this retrain ran
                verdict = dict(verdict, passed=False, reasons=[*verdict["reasons"], str(e)])
                verdict["summary"] = gate_summary(verdict)
                now = registry.production()
        if decision is None:
            decision = "refused" if not verdict["passed"] else "passed (not promoted)"
            event = registry.record("refuse" if not verdict["passed"] else "pass",
                                    name=name, production=production,
                                    reason="; ".join(verdict["reasons"]) or None,
                                    metrics=verdict, key=f"retrain:{name}:decision")
    return {"adapter": name, "decision": decision, "reasons": verdict["reasons"],
            "summary": verdict["summary"],
            "event": event, "production": now,
            "snapshot_version": version, "gate": verdict,
            "new_domain": _scores(verdict["new"]), "old_domain": _scores(verdict["old"]),
            "regression": _scores(verdict["regression"]),
            "train_items": len(train_items), "heldout_items": len(held), "replay": replay,
            # items people disagree on, without an adjudication: in neither side
            "unresolved_items": store.resolution(version, exclude)["unresolved"], **excluded,
            "train_metrics": train_metrics, "seconds": round(time.time() - t0, 1)}


def _scores(cmp: dict | None) -> dict | None:
    """Acc@0.5 of both sides on one part of the gate (None: that part was not scored)."""
    if cmp is None:
        return None
    return {k: cmp.get(k) for k in ("candidate", "production", "n", "unreadable", "note")
            if cmp.get(k) is not None}


def earlier_labels(store, registry, production: str | None,
                   store_uri: str) -> tuple[set[str] | None, int | None, str]:
    """(item_ids of the labels production was trained with, its snapshot version, a note).

    Those are the accepted/corrected items of production's snapshot in this store: held-out
    ones measure forgetting, train-side ones are replayed. (None, None, why) when there is no
    such snapshot: production is the base model, or was trained elsewhere.
    """
    if not production:
        return None, None, "production is the base model"
    meta = registry.show(production)
    since = meta.get("snapshot_version")
    if (meta.get("store") or "").rstrip("/") != store_uri.rstrip("/") or not since:
        return None, None, (f"production {production} was not trained on a snapshot of "
                            f"{store_uri} (store {meta.get('store')!r}, version {since})")
    return ({it["item_id"] for it in store.labels(since)}, since,
            f"production {production} was trained on labels up to store version {since}")
