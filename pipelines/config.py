"""Settings of a bulk labeling job: the same object from the CLI, a YAML spec or Python.

The storage, Ray and engine settings are the shared groups of `grounding.settings` (flat:
``--s3-region``, ``--ray-address``, ``--model``, ``--max-pixels`` ...); the rest is the job's own.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from grounding.engines.base import EngineConfig
from grounding.settings import JobOutputURI, RaySettings, Settings
from grounding.storage import StorageOptions


class LabelJobConfig(Settings):
    """``groundlabel label``: image-text rows in, boxes (Parquet) out, every row exactly once."""

    input: str = Field(description="Input shard file or folder/prefix: local path or s3:// URI. "
                       "Shards are seed JSONL, ms-swift grounding JSONL or Parquet.")
    output: JobOutputURI = Field(description="Output folder/prefix (local or s3://): a Delta "
                                 "Lake table; a rerun resumes and never duplicates a row.")
    inference: EngineConfig = Field(default_factory=EngineConfig,
                                    description="The model and engine every actor runs.")
    adapter: str | None = Field(None, description="Default LoRA adapter name for rows without "
                                "an `adapter` column value (None = base model).")
    adapters_dir: str | None = Field(None, description="Folder whose subfolders are LoRA adapters,"
                                     " each registered under its folder name.")
    registry: str | None = Field(None, description="Adapter registry (folder or s3://): "
                                 "adapter names (and `production`) resolve there; each actor "
                                 "downloads what its rows name. Its calibrations give each row "
                                 "a calibrated_score beside the raw score.")
    num_actors: int = Field(1, ge=1, description="Inference actors (one engine each).")
    actor_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each inference actor needs, "
        "e.g. {\"inference\": 1} to place engines on the nodes that offer it.")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved per inference actor.")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per inference actor (0 on CPU; "
                                 "default: --tensor-parallel-size when that is over 1).")
    batch_size: int = Field(16, ge=1, description="Rows per block an inference actor takes "
                            "(and per block read): smaller blocks reach the engine sooner.")
    batches_in_flight: int = Field(8, ge=1, description="Blocks each inference actor keeps in "
                                   "its engine at once: their rows are scheduled together, new "
                                   "ones entering while earlier ones decode (batch_size x this "
                                   "rows in flight per engine).")
    fetch_batch_size: int = Field(32, ge=1, description="Rows per image fetch/decode task.")
    commit_rows: int = Field(4096, ge=1, description="Commit to the output table every this "
                             "many rows (one data file each): what a killed job can lose.")
    commit_seconds: float = Field(120.0, gt=0, description="... or every this many seconds, "
                                  "whichever comes first (a slow job still commits).")
    piece_rows: int = Field(128, ge=1, description="Input lines per piece, the unit a commit "
                            "covers whole and a resume skips; fixed for the job by its first "
                            "run.")
    max_image_bytes: int = Field(50 * 1024 * 1024, description="Larger images are error rows.")
    max_image_pixels: int = Field(64_000_000, description="Decoded pixels above this are refused "
                                  "as decompression bombs.")
    storage: StorageOptions = Field(default_factory=StorageOptions,
                                    description="Object storage for input, output and images.")
    ray: RaySettings = Field(default_factory=RaySettings, description="The Ray cluster.")
    job_id: str | None = Field(None, description="Job id; default: reuse the output's, or new.")
    retry_transient: bool = Field(True, description="On a rerun, label again the rows that "
                                  "failed with a transient error (fetch failures, engine "
                                  "errors); the old row is replaced, never duplicated.")
    wait: float = Field(0.0, ge=0, description="Seconds to wait for another job writing the "
                        "same output (default 0: refuse at once).")
    lease_seconds: float = Field(120.0, gt=0, description="How long the output's lease lasts "
                                 "without renewal (renewed every third of it). The lease only "
                                 "refuses a second job early; exactly once never depends on it.")
    limit: int | None = Field(None, ge=1, description="Label at most this many rows of each "
                              "shard (part of the job's identity).")
    progress: bool = Field(True, description="Show Ray Data progress bars.")

    @model_validator(mode="after")
    def _check(self) -> LabelJobConfig:
        if self.input.rstrip("/") == self.output.rstrip("/"):
            raise ValueError("`--output` must differ from `--input`")
        self.gpus_per_actor = self.inference.actor_gpus(self.gpus_per_actor, "--gpus-per-actor")
        return self
