"""The labeling job's stages, one file each, chained by `pipelines.label`.

read -> fetch_images -> infer -> parse_boxes, then `pipelines.output.JobOutput.write`. As in Ray's
batch-LLM processor, a stage is an object carrying its function, the typed settings the function
is built with, and its own ``map_batches`` arguments; the job is a loop over stages. Each
function runs on pyarrow batches, names the columns it needs, and says which stage failed to
provide them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa


class StageFn:
    """What a stage runs on each batch: a name, the columns needed, and who provides them."""

    name = "stage"
    needs: tuple[str, ...] = ()
    after = "the previous stage"

    def check(self, batch: pa.Table) -> list[dict]:
        missing = [c for c in self.needs if c not in batch.column_names]
        if missing:
            raise ValueError(f"stage {self.name!r} needs columns {missing} that {self.after} did "
                             f"not produce (got {batch.column_names})")
        return batch.to_pylist()


@dataclass
class Stage:
    """One ``map_batches`` of the job.

    ``fn`` is a `StageFn` class built with ``settings`` (typed objects: Ray pickles them to the
    workers). A stage with ``actors`` set runs in an actor pool of that size, each actor built
    once (engines), running up to ``concurrency`` batches at once (async functions); the
    others run as stateless tasks. ``rows_per_block`` re-blocks the dataset after the stage.
    """

    fn: type[StageFn]
    settings: dict[str, Any]
    batch_size: int
    actors: int | None = None
    concurrency: int | None = None
    map_batches: dict[str, Any] = field(default_factory=dict)
    rows_per_block: int | None = None

    @property
    def name(self) -> str:
        return self.fn.name

    def apply(self, ds):
        kw = dict(self.map_batches, batch_size=self.batch_size, batch_format="pyarrow")
        if self.actors:
            from ray.data import ActorPoolStrategy

            pool = ActorPoolStrategy(size=self.actors,
                                     max_concurrent_calls_per_actor=self.concurrency)
            ds = ds.map_batches(self.fn, fn_constructor_kwargs=self.settings, compute=pool, **kw)
        else:
            ds = ds.map_batches(self.fn(**self.settings), **kw)
        if self.rows_per_block:
            ds = ds.repartition(target_num_rows_per_block=self.rows_per_block)
        return ds
