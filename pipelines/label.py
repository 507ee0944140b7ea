"""The bulk labeling job: shards in object storage -> Ray Data -> vLLM actors -> Parquet boxes.

``read -> fetch_images -> infer -> parse_boxes -> write`` (one file per stage in
``pipelines/stages``), streamed by Ray Data: images are fetched and decoded by CPU tasks while
the actor pool generates, and parts are written as they come. Every input row comes out exactly
once, with boxes or with an error code; a rerun after a crash resumes (see
``pipelines/stages/write.py``).

Run it::

    groundlabel synth --out data/synth --n 64
    groundlabel label --input data/synth/data.jsonl --output runs/label-1
    groundlabel eval --pred runs/label-1

or from Python::

    from pipelines.config import LabelJobConfig
    from pipelines.label import label
    summary = label(LabelJobConfig(input="data/synth/data.jsonl", output="runs/label-1"))

or as a YAML spec (``groundlabel label --config job.yaml``) holding the same fields.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from datetime import UTC, datetime

from grounding.formats import INPUT_EXTS
from grounding.storage import StorageOptions, filesystem, join
from pipelines.config import LabelJobConfig


def prompt_version(family) -> str:
    """Family name + a hash of its prompt template: changes whenever the prompt does."""
    h = hashlib.sha1(family.prompt("{text}").encode()).hexdigest()[:8]
    return f"{family.name}:{h}"


def list_shards(uri: str, opts: StorageOptions) -> list[tuple[str, str]]:
    """``(full URI, name relative to the input)`` of every input shard under ``uri``."""
    fs, path = filesystem(uri, opts)
    if not fs.exists(path):
        raise FileNotFoundError(f"input not found: {uri}")
    scheme = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    if fs.isfile(path):
        return [(uri, path.rsplit("/", 1)[-1])]
    files = sorted(p for p in fs.find(path) if p.endswith(INPUT_EXTS) and "/_" not in p)
    if not files:
        raise ValueError(f"no input shards ({', '.join(INPUT_EXTS)}) under {uri}")
    return [(scheme + p if scheme else p, p[len(path):].lstrip("/")) for p in files]


def _job_record(cfg: LabelJobConfig, opts: StorageOptions, lineage: dict) -> dict:
    """Create ``OUTPUT/_job.json`` or check that a resumed run labels with the same setup."""
    fs, path = filesystem(join(cfg.output, "_job.json"), opts)
    if fs.exists(path):
        with fs.open(path, "r") as f:
            old = json.load(f)
        for key in ("model", "family", "prompt_version", "default_adapter"):
            if old.get(key) != lineage.get(key):
                raise ValueError(
                    f"{cfg.output} holds output of a job with {key}={old.get(key)!r}, this job "
                    f"has {lineage.get(key)!r}: resume with the same settings or use a new --output")
        return old
    rec = dict(lineage, job_id=cfg.job_id or uuid.uuid4().hex[:12],
               created=datetime.now(UTC).isoformat(), input=cfg.input)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        json.dump(rec, f, indent=2)
    return rec


def _adapters(cfg: LabelJobConfig) -> dict[str, str]:
    if not cfg.adapters_dir:
        return {}
    from pathlib import Path

    root = Path(cfg.adapters_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--adapters-dir not found: {root}")
    return {p.name: str(p) for p in sorted(root.iterdir()) if p.is_dir()}


def _init_ray(cfg: LabelJobConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    if cfg.ray_address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.ray_address)  # a cluster, or the one this Ray job runs in
    else:
        # address="local": never attach by accident to another Ray running on this machine.
        ray.init(address="local", num_cpus=cfg.ray_num_cpus or max(4, os.cpu_count() or 1),
                 include_dashboard=False, log_to_driver=False)


def label(cfg: LabelJobConfig) -> dict:
    """Run the job to completion (or resume it) and return its summary."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from grounding.checkpoint import detect_family, resize_spec
    from grounding.engines import EngineConfig
    from grounding.families import get_family
    from pipelines.stages.fetch_images import FetchImages
    from pipelines.stages.infer import Infer
    from pipelines.stages.parse_boxes import ParseBoxes
    from pipelines.stages.read import ReadShards
    from pipelines.stages.write import committed, write
    from pipelines.summary import summarize

    t0 = time.time()
    opts = cfg.storage()
    family = cfg.family or detect_family(cfg.model)
    resize = resize_spec(cfg.model, cfg.min_pixels, cfg.max_pixels)
    adapters = _adapters(cfg)
    default_adapter = cfg.adapter
    if cfg.registry:
        from train.registry import AdapterRegistry

        reg = AdapterRegistry(cfg.registry, opts)
        if default_adapter == "production":  # the adapter in production now, fixed for the job
            default_adapter = reg.production()
        if default_adapter and default_adapter not in adapters:
            reg.show(default_adapter)  # unknown name: a clear error before any work
    elif cfg.adapter and cfg.adapter not in adapters:
        known = ", ".join(adapters) or "none"
        raise ValueError(f"--adapter {cfg.adapter!r} is not in --adapters-dir (known: {known})")
    lineage = {"model": cfg.model, "family": family,
               "prompt_version": prompt_version(get_family(family)),
               "default_adapter": default_adapter, "registry": cfg.registry}
    job = _job_record(cfg, opts, lineage)
    shards = list_shards(cfg.input, opts)
    done = committed(cfg.output, opts)
    n_done = sum(len(v) for v in done.values())
    print(f"[label] job {job['job_id']}: {len(shards)} shard(s) from {cfg.input}; "
          f"{n_done} row(s) already written, resuming" if n_done else
          f"[label] job {job['job_id']}: {len(shards)} shard(s) from {cfg.input}", flush=True)

    _init_ray(cfg)
    DataContext.get_current().enable_progress_bars = cfg.progress
    engine_cfg = EngineConfig(model=cfg.model, engine=cfg.engine, family=family,
                              max_new_tokens=cfg.max_new_tokens, min_pixels=cfg.min_pixels,
                              **({"max_model_len": cfg.max_model_len} if cfg.max_model_len
                                 else {}),
                              max_pixels=cfg.max_pixels)
    storage_json = opts.model_dump_json()
    items = [{"path": uri, "shard": rel, "done": done.get(rel, [])} for uri, rel in shards]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(ReadShards(storage_json, cfg.limit), batch_size=1,
                        batch_format="pyarrow")
    # A shard is one block; cut it into batch-sized blocks so that images are fetched in
    # parallel, the actors stream, and parts are written (committed) as rows finish rather
    # than when a whole shard is done.
    ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)
    ds = ds.map_batches(FetchImages(storage_json, resize.model_dump_json(), cfg.max_image_bytes,
                                    cfg.max_image_pixels),
                        batch_size=cfg.fetch_batch_size, batch_format="pyarrow")
    ds = ds.map_batches(
        Infer, batch_size=cfg.batch_size, batch_format="pyarrow",
        compute=ActorPoolStrategy(size=cfg.num_actors),
        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor or None,
        resources=cfg.actor_resources or None,
        fn_constructor_kwargs={"engine_json": engine_cfg.model_dump_json(), "family": family,
                               "adapters": adapters, "default_adapter": default_adapter,
                               "registry": cfg.registry, "storage_json": storage_json},
        # one OpenMP thread per engine: oversubscribed cores made CPU inference 10-30x slower
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(max(1, int(cfg.cpus_per_actor)))}},
    )
    ds = ds.map_batches(ParseBoxes(family, resize.model_dump_json(),
                                   {"model": cfg.model, "family": family,
                                    "prompt_version": lineage["prompt_version"],
                                    "job_id": job["job_id"]}),
                        batch_size=cfg.rows_per_part, batch_format="pyarrow")
    write(ds, cfg.output, opts)
    summary = summarize(cfg.output, opts, elapsed=time.time() - t0, rows_before=n_done)
    print(json.dumps(summary, indent=2), flush=True)
    return summary
