"""The settings of ``groundlabel retrain`` (and ``schedule``, which adds its own), declared once.

Shared by the driver (`train.retrain`), the Ray Train workers (`train.worker`) and the gate
(`train.gate`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from grounding.engines.base import EngineConfig
from grounding.gold import ReviewerFilter
from grounding.settings import RaySettings, RegistryURI, Settings, StoreURI
from grounding.storage import StorageOptions

# The language model's linear layers (Qwen2/2.5/3-VL naming). vLLM applies LoRA to these; the
# vision tower stays frozen unless ``freeze_vision`` is off.
LM_LINEAR = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_LINEAR = r".*visual.*\.(qkv|proj|linear_fc1|linear_fc2)"


class RetrainConfig(Settings):
    """Settings of ``groundlabel retrain`` (ms-swift-like LoRA settings included)."""

    store: StoreURI
    registry: RegistryURI
    version: int | None = Field(None, ge=1, description="Store version to train on: the "
                                "store's Delta table version, recorded as the adapter's "
                                "snapshot_version (default: newest).")
    train_on_auto: bool = Field(False, description="Also train on auto-accepted predictions "
                                "(decision `auto`; off by default: the model would learn from "
                                "itself). They are never held out for the gate.")
    reviewers: ReviewerFilter = Field(default_factory=ReviewerFilter,
                                      description="Reviewers judged on gold items.")
    inference: EngineConfig = Field(default_factory=EngineConfig, description="The base "
                                    "checkpoint (kept frozen; its pixels settings are used for "
                                    "training too) and the engine of the gate.")
    candidate: str | None = Field(None, description="Gate this adapter folder instead of "
                                  "training one.")
    target_modules: str = Field(LM_LINEAR, description="Regex of the modules LoRA adapts.")
    rank: int = Field(16, ge=1, description="LoRA rank r.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    lr: float = Field(2e-3, gt=0, description="Peak learning rate (AdamW; warm-up, cosine decay).")
    warmup_frac: float = Field(0.05, ge=0, lt=1, description="Warm-up share of the steps.")
    epochs: float = Field(6.0, gt=0, description="Passes over the training items.")
    batch_size: int = Field(8, ge=1, description="Items per optimizer step (per worker).")
    max_minutes: float = Field(10.0, gt=0, description="Training time cap; the schedule "
                               "(cosine) is fitted to the steps that fit.")
    coord_step: int | None = Field(None, ge=1, description="Round 0-1000 target coordinates "
                                   "to this grid (default: the checkpoint's groundlabel.json "
                                   "coord_step, else 1 = exact).")
    augment: bool = Field(True, description="Horizontal flip (every left/right word swapped in "
                          "the text; never for expressions a flip would falsify) "
                          "and zoom-out, each with p=0.5, freshly every epoch.")
    mask_label_text: bool = Field(True, description="No loss on the expression Qwen echoes "
                                  "in `\"label\": ...` (new words would swamp the gradient).")
    freeze_vision: bool = Field(True, description="Keep the vision tower frozen (no LoRA on it).")
    quantize: Literal["auto", "nf4", "none"] = Field(
        "auto", description="nf4: QLoRA (the frozen base in 4-bit nf4 through bitsandbytes, "
        "on CUDA or the CPU); none: plain LoRA; auto: nf4 wherever bitsandbytes can run it, "
        "else none (the choice and its reason land in the train metrics).")
    holdout_frac: float = Field(0.2, gt=0, lt=1, description="Share of images held out for "
                                "the gate (by a hash of the normalised image reference: every "
                                "expression of an image on one side, the same side in every "
                                "store version).")
    min_heldout: int = Field(50, ge=1, description="Refuse to promote when fewer held-out items "
                             "could be scored (unreadable images do not count); the adapter is "
                             "still registered.")
    max_items: int | None = Field(None, ge=1, description="Train on at most this many items "
                                  "(new ones first, keeping --replay-share of earlier ones).")
    margin: float = Field(0.02, ge=0, description="Promote only if held-out Acc@0.5 beats "
                          "production by at least this (0-1), besides the paired test.")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Promote only if the candidate "
                              "beats production on the same held-out images at this confidence "
                              "(exact one-sided sign test on per-image differences), spent over "
                              "the repeated gates against one production (--alpha-spending).")
    alpha_spending: bool = Field(True, description="The k-th gate against the same production "
                                 "tests at (1 - confidence) / (k (k + 1)), so that over all "
                                 "gates a no-better candidate is promoted at most "
                                 "1 - confidence of the time (k is read from the registry's "
                                 "events). Off: every gate at 1 - confidence (repeated gates "
                                 "then promote no-better candidates far more often).")
    max_forgetting: float = Field(0.05, ge=0, le=1, description="Refuse unless the upper "
                                  "--confidence bound of the Acc@0.5 drop (0-1; paired, per "
                                  "image) is at most this, on held-out labels production was "
                                  "trained with (store versions <= its snapshot) and on "
                                  "--regression-set (a non-inferiority test).")
    min_forgetting: int = Field(50, ge=2, description="Refuse (too few) when fewer items than "
                                "this could be scored to check forgetting on (earlier held-out "
                                "labels, or the regression set); none at all: nothing to check.")
    regression_set: str | None = Field(None, description="Labels of an older domain the "
                                       "candidate must not forget (a label file, or a reviewed-"
                                       "label store folder); scored, never trained on.")
    regression_format: Literal["seed", "swift", "coco", "parquet", "labelstudio"] = Field(
        "seed", description="Format of a --regression-set file.")
    replay_share: float = Field(0.2, ge=0, lt=1, description="Least share of the training list "
                                "given to earlier labels (those in production's snapshot), so a "
                                "big new batch cannot crowd them out: every train-side item is "
                                "used once, and earlier ones are repeated (seeded order) until "
                                "they make up this share; with --max-items, new items fill at "
                                "most 1 - share of it. No production adapter: all items, no "
                                "replay. 0: the natural mix.")
    promote: bool = Field(True, description="Promote when the gate passes (else only record).")
    seed: int = Field(0, description="Shuffling / init seed.")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data parallel: each "
                             "trains on its own shard, all take the same steps).")
    max_failures: int = Field(2, ge=-1, description="Worker failures Ray Train recovers from "
                              "(restarting the workers from the last checkpoint); -1: no limit, "
                              "0: fail at once.")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: int = Field(2, ge=1, description="CPUs per worker (torch threads).")
    worker_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each training worker needs, "
        "e.g. {\"train\": 1} to place training on the nodes that offer it.")
    gate_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources of the gate's task (it runs "
        "the vLLM engine; one GPU with --use-gpu), e.g. {\"inference\": 1}: on a cluster the "
        "gate runs on such a node, never in the driver on the head.")
    storage_path: str = Field("runs/retrain", description="Ray Train storage for checkpoints "
                              "(folder or s3://).")
    checkpoint_every_s: float = Field(60.0, gt=0, description="Seconds between checkpoints "
                                      "(adapter + optimizer) in the Ray Train storage.")
    run_name: str | None = Field(None, description="Ray Train run name; the same name resumes "
                                 "(default: from store, version and recipe).")
    storage: StorageOptions = Field(default_factory=StorageOptions, description="Object "
                                    "storage for the store, registry, images and checkpoints.")
    ray: RaySettings = Field(default_factory=RaySettings, description="The Ray cluster.")
    eval_batch_size: int = Field(32, ge=1, description="Requests per vLLM call in the gate.")
    mlflow_tracking_uri: str | None = Field(
        None, description="Record the retrain as an MLflow run on this tracking server (e.g. "
        "http://mlflow:5000; default: MLFLOW_TRACKING_URI, else no tracking and no mlflow "
        "import): parameters, data version, loss and learning rate per step, the gate's "
        "figures, the adapter's name (train/tracking.py). Checked before training: an "
        "unreachable server stops the retrain at once.")
    mlflow_experiment: str | None = Field(
        None, description="MLflow experiment of the runs (default: MLFLOW_EXPERIMENT_NAME, "
        "else groundlabel-retrain).")



def recipe_of(cfg: RetrainConfig) -> dict:
    """The training settings recorded with an adapter (and hashed into the run name)."""
    recipe = cfg.model_dump(include={"target_modules", "rank", "alpha", "dropout", "lr",
                                     "warmup_frac", "epochs", "batch_size", "max_minutes",
                                     "freeze_vision", "quantize", "coord_step",
                                     "mask_label_text", "augment", "seed", "max_items",
                                     "replay_share"})
    recipe.update(min_pixels=cfg.inference.min_pixels, max_pixels=cfg.inference.max_pixels)
    return recipe
