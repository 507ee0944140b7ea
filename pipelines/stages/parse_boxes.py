"""Stage 4, parse_boxes: model text -> scored boxes in ORIGINAL-image pixels (CPU tasks).

Lenient with the text (an unparseable answer is a row with ``status="unparseable"`` and no
boxes), strict with structure. Adds the lineage columns (model, adapter, family, prompt
version, job id).
"""

from __future__ import annotations

import pyarrow as pa

from grounding.resize import ResizeSpec
from pipelines import schema
from pipelines.stages import Stage, StageFn


class ParseBoxes(StageFn):
    name = "parse_boxes"
    needs = ("row_id", "raw_text", "tokens", "logprobs", "width", "height", "error_code")
    after = "stage 'infer'"

    def __init__(self, family, resize: ResizeSpec, lineage: dict,
                 calibrations: dict | None = None, registry: str | None = None,
                 storage=None):
        """``family``: a `grounding.families.Family` (or a registered family's name).
        ``calibrations``: ``{adapter or None: Calibration or None}`` resolved by the driver;
        an adapter not in it is looked up in ``registry`` once per task."""
        self.family = family
        self.resize = resize
        self.lineage = lineage
        self.calibrations = dict(calibrations or {})
        self.registry = registry
        self.storage = storage

    @classmethod
    def stage(cls, family, resize: ResizeSpec, lineage: dict, batch_size: int,
              calibrations: dict | None = None, registry: str | None = None,
              storage=None) -> Stage:
        # batch_size = rows per output part: each parse batch is written as one Parquet part
        return Stage(cls, {"family": family, "resize": resize, "lineage": lineage,
                           "calibrations": calibrations, "registry": registry,
                           "storage": storage}, batch_size=batch_size)

    def calibration(self, adapter: str | None):
        if adapter not in self.calibrations:
            self.calibrations[adapter] = None
            if self.registry:
                from grounding.calibration import Key
                from grounding.registry import AdapterRegistry

                key = Key(model=self.lineage["model"], adapter=adapter,
                          prompt_version=self.lineage["prompt_version"])
                self.calibrations[adapter] = AdapterRegistry(self.registry,
                                                             self.storage).calibration(key)
        return self.calibrations[adapter]

    def __call__(self, batch: pa.Table) -> pa.Table:
        from grounding.engines import Generation
        from grounding.engines.grounder import BoxReader
        reader = BoxReader(self.family, self.resize)
        rows = self.check(batch)
        for row in rows:
            row.update(self.lineage)
            if row["error_code"]:
                row.update(status="error", boxes=[])
                continue
            gen = Generation(text=row["raw_text"] or "", logprobs=row["logprobs"] or [],
                             tokens=row["tokens"] or [], token_ids=[0] * len(row["tokens"] or []))
            res = reader.read(gen, (row["width"], row["height"]))
            row.update(status=res.status, score=res.score, num_tokens=res.num_tokens,
                       boxes=[b.model_dump() for b in res.boxes])
            cal = self.calibration(row.get("adapter") or None)
            if cal is not None:
                row.update(calibrated_score=cal.one(res.score), calibration=cal.id)
        return schema.table(rows, schema.PARSED)
