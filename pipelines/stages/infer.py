"""Stage 3, infer: an actor pool, one engine per actor (vLLM by default), greedy generation.

Each actor starts its engine once and registers the job's adapters. A row naming an adapter the
job does not have becomes an ``unknown_adapter`` error row; if the engine fails on a whole batch,
its rows become ``engine_error`` rows instead of killing the job.
"""

from __future__ import annotations

import time

import pyarrow as pa

from grounding.engines.base import EngineConfig
from grounding.storage import StorageOptions
from pipelines import schema
from pipelines.stages import Stage, StageFn


class Infer(StageFn):
    name = "infer"
    needs = ("row_id", "text", "adapter", "pixels", "in_width", "in_height", "error_code")
    after = "stage 'fetch_images'"

    def __init__(self, engine: EngineConfig, adapters: dict[str, str],
                 default_adapter: str | None, registry: str | None = None,
                 storage: StorageOptions | None = None):
        from grounding.engines import load_engine
        from grounding.engines.grounder import Grounder

        self.engine = load_engine(engine)
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

    @classmethod
    def stage(cls, engine: EngineConfig, adapters: dict[str, str], default_adapter: str | None,
              registry: str | None, storage: StorageOptions, *, actors: int, batch_size: int,
              cpus: float, gpus: float, resources: dict[str, float]) -> Stage:
        return Stage(
            cls, {"engine": engine, "adapters": adapters, "default_adapter": default_adapter,
                  "registry": registry, "storage": storage},
            batch_size=batch_size, actors=actors,
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

    def __call__(self, batch: pa.Table) -> pa.Table:
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
        t0 = time.perf_counter()
        try:
            gens = self.engine.generate([e for _, e in todo])
        except Exception as e:  # noqa: BLE001 - one bad batch must not kill a million-row job
            for row, _ in todo:
                row.update(error_code="engine_error", error=f"{type(e).__name__}: {e}"[:500])
            gens = []
        per_row = (time.perf_counter() - t0) * 1000 / max(1, len(todo))
        for (row, _), gen in zip(todo, gens, strict=False):
            row.update(raw_text=gen.text, tokens=gen.tokens, logprobs=gen.logprobs,
                       infer_ms=per_row)
        return schema.table(rows, schema.GENERATED)
