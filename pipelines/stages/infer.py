"""Stage 3, infer: an actor pool, one engine per actor (vLLM by default), greedy generation.

Each actor starts its engine once and registers the job's adapters. The stage is an async UDF:
Ray Data runs up to ``in_flight`` blocks at once in each actor, and each block's rows go to the
engine as soon as they arrive (`Engine.submit`), so vLLM's scheduler adds new rows while earlier
ones decode instead of draining after every block. Each block still comes back whole, its rows
in order. A row naming an adapter the job does not have becomes an ``unknown_adapter`` error
row; if the engine fails on a block, its rows become ``engine_error`` rows instead of killing
the job.

The first block through each actor writes that actor's start-up timeline (worker process,
vLLM import, engine start, first rows) to the job output (`JobOutput.record_startup`), which
the job summary prints.
"""

from __future__ import annotations

import time

import pyarrow as pa

from grounding.engines.base import EngineConfig
from grounding.storage import StorageOptions
from pipelines import schema
from pipelines.output import StartupLog
from pipelines.stages import Stage, StageFn


class Infer(StageFn):
    name = "infer"
    needs = ("row_id", "text", "adapter", "pixels", "in_width", "in_height", "error_code")
    after = "stage 'fetch_images'"

    def __init__(self, engine: EngineConfig, adapters: dict[str, str],
                 default_adapter: str | None, registry: str | None = None,
                 storage: StorageOptions | None = None, startup: StartupLog | None = None):
        from grounding.engines import load_engine
        from grounding.engines.grounder import Grounder

        self.startup = startup
        self.marks = {"worker_process": _process_start(), "actor_init": time.time()}
        self.engine = load_engine(engine)
        self.marks.update(_marks_from(self.marks["actor_init"], getattr(self.engine, "timings",
                                                                        {})))
        self.bad_adapters: dict[str, str] = {}
        for name, path in adapters.items():
            try:
                self.engine.add_adapter(name, path)
            except ValueError as e:  # a corrupt adapter fails its rows, not the job
                self.bad_adapters[name] = str(e)
        self.grounder = Grounder(self.engine)
        self.default_adapter = default_adapter
        self.registry = None
        if registry:
            from grounding.registry import AdapterRegistry

            self.registry = AdapterRegistry(registry, storage)
        self.marks["engine_ready"] = time.time()

    @classmethod
    def stage(cls, engine: EngineConfig, adapters: dict[str, str], default_adapter: str | None,
              registry: str | None, storage: StorageOptions, *, actors: int, batch_size: int,
              in_flight: int, cpus: float, gpus: float, resources: dict[str, float],
              startup: StartupLog | None = None) -> Stage:
        return Stage(
            cls, {"engine": engine, "adapters": adapters, "default_adapter": default_adapter,
                  "registry": registry, "storage": storage, "startup": startup},
            batch_size=batch_size, actors=actors, concurrency=in_flight,
            map_batches={
                "num_cpus": cpus, "num_gpus": gpus or None, "resources": resources or None,
                # one OpenMP thread per engine: oversubscribed cores made CPU inference 10-30x
                # slower
                "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(max(1, int(cpus)))}}})

    def _resolve(self, name: str) -> None:
        """Fetch an adapter a row names from the registry, once per actor (names are
        immutable, so a downloaded copy never goes stale)."""
        import tempfile

        from grounding.registry import RegistryError

        if name in self.engine.adapters or name in self.bad_adapters or self.registry is None:
            return
        try:
            path = self.registry.download(name, tempfile.gettempdir() + "/groundlabel-adapters")
            self.engine.add_adapter(name, path)
        except (RegistryError, ValueError) as e:
            self.bad_adapters[name] = str(e)

    def _prepare(self, batch: pa.Table) -> tuple[list[dict], list[tuple[dict, object]]]:
        """The block's rows, and the engine inputs of those still without an error."""
        from PIL import Image

        from grounding.engines import EngineInput
        from grounding.engines.grounder import GroundingRequest

        rows = self.check(batch)
        todo: list[tuple[dict, EngineInput]] = []
        for row in rows:
            if row["error_code"]:
                continue
            adapter = row["adapter"] or self.default_adapter
            row["adapter"] = adapter
            if adapter:
                self._resolve(adapter)
            if adapter in self.bad_adapters:
                row.update(error_code="unknown_adapter",
                           error=f"adapter {adapter!r} is unusable: {self.bad_adapters[adapter]}")
                continue
            img = Image.frombytes("RGB", (row["in_width"], row["in_height"]), row["pixels"])
            prepared = self.grounder.prepare(GroundingRequest(img, row["text"], adapter))
            if isinstance(prepared, EngineInput):
                todo.append((row, prepared))
            else:
                row.update(error_code=prepared.error_code, error=prepared.error)
        return rows, todo

    async def __call__(self, batch: pa.Table) -> pa.Table:
        import asyncio

        self.marks.setdefault("first_rows_in", time.time())
        rows, todo = self._prepare(batch)
        t0 = time.perf_counter()
        try:
            gens = await asyncio.wrap_future(self.engine.submit([e for _, e in todo]))
        except Exception as e:  # noqa: BLE001 - one bad block must not kill a million-row job
            for row, _ in todo:
                row.update(error_code="engine_error", error=f"{type(e).__name__}: {e}"[:500])
            gens = []
        # Seconds from submit to the block's last row, shared by its rows: with blocks
        # overlapping in the engine this is latency, not engine time per row.
        per_row = (time.perf_counter() - t0) * 1000 / max(1, len(todo))
        for (row, _), gen in zip(todo, gens, strict=False):
            row.update(raw_text=gen.text, tokens=gen.tokens, logprobs=gen.logprobs,
                       infer_ms=per_row)
        out = schema.table(rows, schema.GENERATED)
        if "first_rows_out" not in self.marks:
            self.marks["first_rows_out"] = time.time()
            if self.startup is not None:
                self.startup.record(self.marks)
        return out


def _process_start() -> float:
    """When this worker process started (Ray may have started it before the actor)."""
    import psutil

    return psutil.Process().create_time()


def _marks_from(start: float, timings: dict[str, float]) -> dict[str, float]:
    """The engine's start-up durations as points in time: vLLM imported, engine started."""
    if "vllm_import_s" not in timings:
        return {}  # the transformers engine reports none
    imported = start + timings["vllm_import_s"]
    return {"vllm_imported": imported, "engine_started": imported + timings["engine_init_s"]}
