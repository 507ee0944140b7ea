"""Settings of a bulk labeling job: the same object from the CLI, a YAML spec or Python."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from grounding.paths import DEFAULT_MODEL


class LabelJobConfig(BaseModel):
    """``groundlabel label``: image-text rows in, boxes (Parquet) out, every row exactly once."""

    input: str = Field(description="Input shard file or folder/prefix: local path or s3:// URI. "
                       "Shards are seed JSONL, ms-swift grounding JSONL or Parquet.")
    output: str = Field(description="Output folder/prefix (local or s3://). Parts go to "
                        "OUTPUT/parts/; a rerun resumes and never duplicates a row.")
    model: str = Field(str(DEFAULT_MODEL), description="Checkpoint folder (default: the bundled "
                       "tiny Qwen3-VL).")
    family: str | None = Field(None, description="Model family; None detects it from the "
                               "checkpoint.")
    engine: Literal["vllm", "transformers"] = Field("vllm", description="Inference engine.")
    adapter: str | None = Field(None, description="Default LoRA adapter name for rows without "
                                "an `adapter` column value (None = base model).")
    adapters_dir: str | None = Field(None, description="Folder whose subfolders are LoRA adapters,"
                                     " each registered under its folder name.")
    registry: str | None = Field(None, description="Adapter registry (folder or s3://): "
                                 "adapter names (and `production`) resolve there; each actor "
                                 "downloads what its rows name.")
    num_actors: int = Field(1, ge=1, description="Inference actors (one engine each).")
    actor_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each inference actor needs, "
        "e.g. {\"inference\": 1} to place engines on the nodes that offer it.")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved per inference actor.")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per inference actor (0 on CPU).")
    batch_size: int = Field(16, ge=1, description="Rows per inference call.")
    fetch_batch_size: int = Field(32, ge=1, description="Rows per image fetch/decode task.")
    rows_per_part: int = Field(64, ge=1, description="Rows per output Parquet part: the unit of "
                               "progress a crash can lose (smaller = finer resume, more files).")
    max_new_tokens: int = Field(64, ge=1, description="Answer token limit per row.")
    max_model_len: int | None = Field(None, ge=64, description="Longest prompt + answer in "
                                      "tokens (default: the engine's 1024, enough for the tiny "
                                      "model; a real Qwen2.5-VL on 1024x768 images needs ~1100 "
                                      "visual + text tokens: use 4096).")
    min_pixels: int | None = Field(None, description="Override the processor's min pixels.")
    max_pixels: int | None = Field(None, description="Override the processor's max pixels.")
    max_image_bytes: int = Field(50 * 1024 * 1024, description="Larger images are error rows.")
    max_image_pixels: int = Field(64_000_000, description="Decoded pixels above this are refused "
                                  "as decompression bombs.")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto); "
                                        "credentials come from AWS_* environment variables.")
    s3_region: str | None = Field(None, description="S3 region.")
    ray_address: str | None = Field(None, description="Ray cluster address; None starts a local "
                                    "Ray (or joins the one a Ray job runs in).")
    ray_num_cpus: int | None = Field(None, description="CPUs a local Ray may schedule (default: "
                                     "max(4, cores); vLLM actors use one thread each).")
    job_id: str | None = Field(None, description="Job id; default: reuse the output's, or new.")
    limit: int | None = Field(None, ge=1, description="Label at most this many rows (testing).")
    progress: bool = Field(True, description="Show Ray Data progress bars.")

    @model_validator(mode="after")
    def _check(self) -> LabelJobConfig:
        if self.min_pixels and self.max_pixels and self.max_pixels < self.min_pixels:
            raise ValueError(f"`--max-pixels` must be >= `--min-pixels` (got {self.max_pixels} < "
                             f"{self.min_pixels})")
        if self.input.rstrip("/") == self.output.rstrip("/"):
            raise ValueError("`--output` must differ from `--input`")
        return self

    def storage(self):
        from grounding.storage import StorageOptions

        return StorageOptions(endpoint_url=self.s3_endpoint_url, region=self.s3_region)
