"""The bulk labeling job: shards in object storage -> Ray Data -> vLLM actors -> Parquet boxes.

``read -> fetch_images -> infer -> parse_boxes`` (one file per stage in ``pipelines/stages``),
then written as Parquet parts by `pipelines.output.JobOutput`, streamed by Ray Data: images are
fetched and decoded by CPU tasks while the actor pool generates, and parts are written as they
come. Every input row comes out exactly once, with boxes or with an error code; a rerun after a
crash resumes (see `pipelines.output`).

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
import time
import uuid
from dataclasses import dataclass

from grounding.resize import ResizeSpec
from pipelines.config import LabelJobConfig
from pipelines.output import JobOutput


def prompt_version(family) -> str:
    """Family name + a hash of its prompt template (and, for the generic family, its
    coordinate convention): changes whenever the prompt does."""
    h = hashlib.sha1(family.prompt_id().encode()).hexdigest()[:8]
    return f"{family.name}:{h}"


@dataclass
class JobPlan:
    """Everything the job resolved before any Ray work: read once, used by every stage."""

    output: JobOutput
    engine: object           # EngineConfig with the family filled in
    resize: ResizeSpec       # the checkpoint's processor resize (boxes convert through it)
    adapters: dict[str, str]
    default_adapter: str | None
    lineage: dict
    job: dict                # the job record (_job.json)
    shards: list[tuple[str, str]]
    done: dict[str, list[str]]
    scanned: set[str]        # the parts `done` was read from (any other part is newer)
    retried: int = 0         # rows with a transient error removed, to be labeled again

    @property
    def n_done(self) -> int:
        return sum(len(v) for v in self.done.values())


def _adapters_dir(cfg: LabelJobConfig) -> dict[str, str]:
    if not cfg.adapters_dir:
        return {}
    from pathlib import Path

    root = Path(cfg.adapters_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--adapters-dir not found: {root}")
    return {p.name: str(p) for p in sorted(root.iterdir()) if p.is_dir()}


def _default_adapter(cfg: LabelJobConfig, adapters: dict[str, str]) -> str | None:
    """The adapter for rows that name none; ``production`` is fixed for the job here."""
    if cfg.registry:
        from grounding.registry import AdapterRegistry

        reg = AdapterRegistry(cfg.registry, cfg.storage)
        name = reg.production() if cfg.adapter == "production" else cfg.adapter
        if name and name not in adapters:
            reg.show(name)  # unknown name: a clear error before any work
        return name
    if cfg.adapter and cfg.adapter not in adapters:
        known = ", ".join(adapters) or "none"
        raise ValueError(f"--adapter {cfg.adapter!r} is not in --adapters-dir (known: {known})")
    return cfg.adapter


def plan(cfg: LabelJobConfig, output: JobOutput | None = None) -> JobPlan:
    """Resolve model, family, adapters, the job record, the shards and what is already done.

    Call it holding the output's lease (`label` does): it repairs the output and, with
    ``retry_transient``, removes the rows a rerun labels again."""
    from grounding.checkpoint import resize_spec
    from pipelines.stages.read import check_output_outside, fingerprints, list_shards

    check_output_outside(cfg.input, cfg.output, cfg.storage)
    output = output or JobOutput(cfg.output, cfg.storage)
    eng = cfg.inference
    family_obj = eng.resolve_family()
    family = family_obj.name
    engine = eng.model_copy(update={"family": family})
    adapters = _adapters_dir(cfg)
    old = output.job_record()
    if old and "adapter_requested" in old and old["adapter_requested"] == cfg.adapter:
        # A rerun keeps the adapter its first start resolved (`production` may have moved).
        default_adapter = old.get("default_adapter")
    else:
        default_adapter = _default_adapter(cfg, adapters)
    lineage = {"input": cfg.input.rstrip("/"), "model": eng.model, "family": family,
               "prompt_version": prompt_version(family_obj),
               "adapter_requested": cfg.adapter, "default_adapter": default_adapter,
               "registry": cfg.registry}
    shards = list_shards(cfg.input, cfg.storage)
    job = output.start_job(lineage, cfg.job_id, fingerprints(shards, cfg.storage))
    output.repair()  # once: a cut rewrite resolved before transient rows are dropped
    retried = output.drop_transient() if cfg.retry_transient else 0
    return JobPlan(output=output, engine=engine,
                   resize=resize_spec(eng.model, eng.min_pixels, eng.max_pixels),
                   adapters=adapters, default_adapter=default_adapter, lineage=lineage, job=job,
                   shards=shards, done=output.committed(repair=False),
                   scanned=output.scanned, retried=retried)


def stages(cfg: LabelJobConfig, p: JobPlan, startup=None) -> list:
    """The job's chain of stages, each with its settings and ``map_batches`` arguments;
    ``startup`` (a `pipelines.output.StartupLog`) is where inference actors log start-up."""
    from pipelines.stages.fetch_images import FetchImages
    from pipelines.stages.infer import Infer
    from pipelines.stages.parse_boxes import ParseBoxes
    from pipelines.stages.read import ReadShards

    family = p.engine.resolve_family()
    calibrations = {}
    if cfg.registry:  # the job's default adapter (or the base model) resolved once, here
        from grounding.calibration import Key
        from grounding.registry import AdapterRegistry

        key = Key(model=p.lineage["model"], adapter=p.default_adapter,
                  prompt_version=p.lineage["prompt_version"])
        calibrations[p.default_adapter] = AdapterRegistry(cfg.registry,
                                                          cfg.storage).calibration(key)
    return [
        ReadShards.stage(cfg.storage, cfg.limit, rows_per_block=cfg.batch_size),
        FetchImages.stage(cfg.storage, p.resize, cfg.max_image_bytes, cfg.max_image_pixels,
                          batch_size=cfg.fetch_batch_size),
        Infer.stage(p.engine, p.adapters, p.default_adapter, cfg.registry, cfg.storage,
                    actors=cfg.num_actors, batch_size=cfg.batch_size,
                    in_flight=cfg.batches_in_flight, cpus=cfg.cpus_per_actor,
                    gpus=cfg.gpus_per_actor, resources=cfg.actor_resources, startup=startup),
        ParseBoxes.stage(family, p.resize, {"model": p.lineage["model"], "family": family.name,
                                            "prompt_version": p.lineage["prompt_version"],
                                            "job_id": p.job["job_id"]},
                         batch_size=cfg.rows_per_part, calibrations=calibrations,
                         registry=cfg.registry, storage=cfg.storage),
    ]


_first_call = True  # the first job of a process times its start-up from the process start


def label(cfg: LabelJobConfig) -> dict:
    """Run the job to completion (or resume it) and return its summary."""
    global _first_call
    import ray
    from ray.data import DataContext

    from pipelines.stages.infer import _process_start
    from pipelines.summary import startup_breakdown, summarize

    t0 = time.time()
    marks = {"process_start": _process_start() if _first_call else t0, "label_called": t0}
    _first_call = False
    from pipelines.stages.read import check_output_outside

    check_output_outside(cfg.input, cfg.output, cfg.storage)
    output = JobOutput(cfg.output, cfg.storage)
    # One writer: the lease is held from the first look at the output to the summary.
    with output.lease(cfg.wait) as lease:
        p = plan(cfg, output)
        marks["planned"] = time.time()
        print(f"[label] job {p.job['job_id']}: {len(p.shards)} shard(s) from {cfg.input}"
              + (f"; {p.n_done} row(s) already written, resuming" if p.n_done else "")
              + (f"; retrying {p.retried} row(s) with a transient error" if p.retried else ""),
              flush=True)
        cfg.ray.connect(log_to_driver=False)
        marks["ray_connected"] = time.time()
        DataContext.get_current().enable_progress_bars = cfg.progress
        # Parts that appear from now on and are not this run's are a killed run's late
        # writes: compare with what `done` was read from, not with a later listing.
        before = p.scanned
        run = uuid.uuid4().hex[:12]
        startup = p.output.startup_log(run)
        items = [{"path": uri, "shard": rel, "done": p.done.get(rel, [])} for uri, rel in p.shards]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        for stage in stages(cfg, p, startup):
            ds = stage.apply(ds)
        lease.check()
        marks["pipeline_started"] = time.time()
        p.output.write(ds, run)
        marks["written"] = time.time()
        lease.check()  # another writer may have taken over a lease we could not renew
        late = p.output.drop_late_parts(before, run)
        if late:
            print(f"[label] removed {len(late)} part(s) a killed earlier run finished after "
                  "this run started: their rows were labeled again here", flush=True)
        new_parts = [x for x in p.output.parts() if x not in before]
        marks["first_part"] = min(p.output.part_times(new_parts), default=None)
        summary = summarize(p.output, elapsed=time.time() - t0, rows_before=p.n_done,
                            startup=startup_breakdown(marks,
                                                      p.output.startup_records(startup.run)))
    print(json.dumps(summary, indent=2), flush=True)
    return summary
