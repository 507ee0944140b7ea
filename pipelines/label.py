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
    job: dict                # the job's identity (the table's description)
    shards: list[tuple[str, str]]
    done: dict[str, list[list[int]]]   # committed pieces by shard, as ranges
    retry: dict[str, list[tuple[str, str, int]]]  # (row id, its file, retried rows of the file)
    n_done: int = 0          # rows committed before this run
    version: int = -1        # the table version this run started from

    @property
    def retried(self) -> int:
        """Rows with a transient error this run labels again (each replaces its old row)."""
        return sum(len(v) for v in self.retry.values())

    @property
    def piece_rows(self) -> int:
        return int(self.job["piece_rows"])


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
    """Resolve model, family, adapters, the job's identity, the shards and what is committed.

    What is committed comes from the table's log (`JobOutput.progress`: commit records of the
    current files); only the few data files whose records count transient errors are read,
    for the row ids to label again (``retry_transient``)."""
    from collections import Counter

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
    if old and old.get("adapter_requested") == cfg.adapter:
        # A rerun keeps the adapter its first start resolved (`production` may have moved).
        default_adapter = old.get("default_adapter")
    else:
        default_adapter = _default_adapter(cfg, adapters)
    lineage = {"input": cfg.input.rstrip("/"), "model": eng.model, "family": family,
               "prompt_version": prompt_version(family_obj),
               "adapter_requested": cfg.adapter, "default_adapter": default_adapter,
               "registry": cfg.registry}
    identity = dict(lineage, limit=cfg.limit, piece_rows=old.get("piece_rows", cfg.piece_rows),
                    constrained=eng.constrained, max_new_tokens=eng.max_new_tokens,
                    min_pixels=eng.min_pixels, max_pixels=eng.max_pixels)
    shards = list_shards(cfg.input, cfg.storage)
    job = output.start_job(identity, cfg.job_id, fingerprints(shards, cfg.storage))
    progress = output.progress()
    retry: dict[str, list[tuple[str, str, int]]] = {}
    if cfg.retry_transient and progress.transient_files():
        rows = output.transient_rows(sorted(progress.transient_files()))
        per_file = Counter(f for v in rows.values() for _, f in v)
        retry = {s: [(rid, f, per_file[f]) for rid, f in v] for s, v in rows.items()}
    return JobPlan(output=output, engine=engine,
                   resize=resize_spec(eng.model, eng.min_pixels, eng.max_pixels),
                   adapters=adapters, default_adapter=default_adapter, lineage=lineage, job=job,
                   shards=shards, done=progress.done(), retry=retry, n_done=progress.rows,
                   version=progress.version)


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
        ReadShards.stage(cfg.storage, cfg.limit, rows_per_block=cfg.batch_size,
                         piece_rows=p.piece_rows),
        FetchImages.stage(cfg.storage, p.resize, cfg.max_image_bytes, cfg.max_image_pixels,
                          batch_size=cfg.fetch_batch_size),
        Infer.stage(p.engine, p.adapters, p.default_adapter, cfg.registry, cfg.storage,
                    actors=cfg.num_actors, batch_size=cfg.batch_size,
                    in_flight=cfg.batches_in_flight, cpus=cfg.cpus_per_actor,
                    gpus=cfg.gpus_per_actor, resources=cfg.actor_resources, startup=startup),
        ParseBoxes.stage(family, p.resize, {"model": p.lineage["model"], "family": family.name,
                                            "prompt_version": p.lineage["prompt_version"],
                                            "job_id": p.job["job_id"]},
                         batch_size=min(64, cfg.commit_rows), calibrations=calibrations,
                         registry=cfg.registry, storage=cfg.storage),
    ]


_first_call = True  # the first job of a process times its start-up from the process start


def label(cfg: LabelJobConfig) -> dict:
    """Run the job to completion (or resume it) and return its summary."""
    global _first_call
    import ray
    from ray.data import DataContext

    from pipelines.commit import Committer, WriteSpec
    from pipelines.stages.infer import _process_start
    from pipelines.summary import startup_breakdown, summarize

    t0 = time.time()
    marks = {"process_start": _process_start() if _first_call else t0, "label_called": t0}
    _first_call = False
    from pipelines.stages.read import check_output_outside

    check_output_outside(cfg.input, cfg.output, cfg.storage)
    output = JobOutput(cfg.output, cfg.storage)
    # The lease is a courtesy (a second job is refused at once, with a clear message); what
    # keeps every row exactly once is the table's commits, whatever happens to the lease.
    with output.lease(cfg.wait, cfg.lease_seconds):
        p = plan(cfg, output)
        marks["planned"] = time.time()
        print(f"[label] job {p.job['job_id']}: {len(p.shards)} shard(s) from {cfg.input}"
              + (f"; {p.n_done} row(s) already committed, resuming" if p.n_done else "")
              + (f"; retrying {p.retried} row(s) with a transient error" if p.retried else ""),
              flush=True)
        cfg.ray.connect(log_to_driver=False)
        marks["ray_connected"] = time.time()
        DataContext.get_current().enable_progress_bars = cfg.progress
        run = uuid.uuid4().hex[:12]
        startup = p.output.startup_log(run)
        items = [{"path": uri, "shard": rel, "done": p.done.get(rel, []),
                  "retry": [list(r) for r in p.retry.get(rel, [])]} for uri, rel in p.shards]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        for stage in stages(cfg, p, startup):
            ds = stage.apply(ds)
        marks["pipeline_started"] = time.time()
        committer = Committer(p.output, p.job["job_id"],
                              WriteSpec(cfg.output, cfg.storage, run, p.piece_rows,
                                        cfg.commit_rows),
                              commit_rows=cfg.commit_rows, commit_seconds=cfg.commit_seconds,
                              on_commit=_progress_line)
        _run_committer(committer, ds, p.output)
        marks["written"] = time.time()
        marks["first_part"] = committer.first_commit_at
        summary = summarize(p.output, elapsed=time.time() - t0, rows_before=p.n_done,
                            startup=startup_breakdown(marks,
                                                      p.output.startup_records(startup.run)))
    print(json.dumps(summary, indent=2), flush=True)
    return summary


def _run_committer(committer, ds, output: JobOutput) -> None:
    """Drain the dataset into commits; a refused commit stops the job with what happened."""
    from grounding.tables import TableConflict
    from pipelines.output import OutputError

    try:
        committer.run(ds)
    except TableConflict as e:
        done = sum(c["rows"] for c in committer.commits)
        raise OutputError(f"{e}. This run committed {done} row(s) before that and stops; "
                          "nothing committed is lost, and every row is in the table once. "
                          f"Check who else writes {output.uri}, then rerun to finish") from None


def _progress_line(rec: dict) -> None:
    what = (f"replaced {rec['replaces']} ({rec.get('retried', 0)} row(s) labeled again)"
            if rec.get("kind") == "replace" else f"+{rec['rows']} row(s)")
    print(f"[label] committed table version {rec['version']}: {what}"
          + (" (found after a lost response)" if rec.get("recovered") else ""), flush=True)
