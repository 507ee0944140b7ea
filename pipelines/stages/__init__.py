"""The labeling job's stages, one file each, chained by `pipelines.label`.

read -> fetch_images -> infer -> parse_boxes -> write. Each stage is one Ray Data
``map_batches`` over pyarrow tables; it names the columns it needs and says which stage failed
to provide them.
"""

from __future__ import annotations

import pyarrow as pa


class Stage:
    """Base: a name, the columns needed, and the stage expected to provide them."""

    name = "stage"
    needs: tuple[str, ...] = ()
    after = "the previous stage"

    def check(self, batch: pa.Table) -> list[dict]:
        missing = [c for c in self.needs if c not in batch.column_names]
        if missing:
            raise ValueError(f"stage {self.name!r} needs columns {missing} that {self.after} did "
                             f"not produce (got {batch.column_names})")
        return batch.to_pylist()
