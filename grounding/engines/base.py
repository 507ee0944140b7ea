"""The engine interface: prompts with images in, generated text with token log-probs out.

Engines know nothing about boxes. `grounding.engines.grounder.Grounder` builds the prompts with a
model family and parses the text into boxes, so every engine gives boxes in the same way.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from grounding.families.generic import Convention
from grounding.paths import DEFAULT_MODEL

_VISION_MARKERS = 2  # <|vision_start|> and <|vision_end|> around an image's tokens
_MIN_PROMPT = 32  # the chat template and a short referring expression
_TEXT_BUDGET = 512  # text tokens the derived context leaves for template + expression
_LEN_STEP = 1024  # the derived context is a whole number of these
_MEMORY_SHARE = 0.9  # of a whole GPU: vLLM's own default, leaving room for CUDA and NCCL


@dataclass(frozen=True)
class Device:
    """Where this process runs an engine: ``cpu`` or ``cuda``, whether it computes in bf16,
    and the GPUs it holds (Ray's assignment: 0.5 for an actor sharing one GPU; all visible
    GPUs outside Ray)."""

    kind: Literal["cpu", "cuda"] = "cpu"
    bf16: bool = False
    gpus: float = 0.0
    name: str = "cpu"

    @classmethod
    def detect(cls) -> Device:
        import torch

        if not torch.cuda.is_available():
            return cls()
        gpus = float(torch.cuda.device_count())
        try:
            import ray

            if ray.is_initialized():
                gpus = float(ray.get_runtime_context().get_assigned_resources().get("GPU", gpus))
        except Exception:  # noqa: BLE001 - outside a Ray worker: the visible GPUs
            pass
        return cls(kind="cuda", bf16=torch.cuda.is_bf16_supported(), gpus=gpus,
                   name=torch.cuda.get_device_name(0))


class EngineConfig(BaseModel):
    """Engine: which model, and how to load and run it. The settings group of every verb that
    runs a model (label, serve, retrain's gate, eval-synth, demo), and what every engine takes."""

    model: str = Field(str(DEFAULT_MODEL), description="Checkpoint folder (a Qwen2-VL / "
                       "Qwen2.5-VL / Qwen3-VL `save_pretrained` folder); default: the bundled "
                       "tiny Qwen3-VL.")
    engine: Literal["vllm", "transformers"] = Field(
        "vllm", description="vllm: the production engine (CPU build here, CUDA on GPU nodes); "
        "transformers: the reference/fallback engine.")
    family: str | None = Field(None, description="Model family for prompt/parse formats "
                               "(generic: any chat VLM asked for [x1,y1,x2,y2]); None detects "
                               "it from the checkpoint's architecture.")
    constrained: bool = Field(True, description="Decode under the family's answer grammar "
                              "(vLLM structured outputs; xgrammar in the transformers engine), "
                              "so every answer is well formed; --no-constrained turns it off.")
    prompt_template: str | None = Field(None, description="Generic family only: the prompt, "
                                        "with {text} for the referring expression (default: "
                                        "'Locate {text} in the image and return the bounding "
                                        "box as [x1,y1,x2,y2].').")
    coords: Convention | None = Field(
        None, description="Generic family only: what its numbers mean: original pixels, "
        "resized-input pixels, 0-1000 or 0-1 of the image (default norm1000).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Compute dtype. auto: bfloat16 on a GPU that computes in it, "
        "float16 on an older GPU, float32 on the CPU (`resolved`).")
    max_model_len: int | None = Field(
        None, ge=64, description="Longest prompt + image + answer, in tokens. Default: one "
        "image at max_pixels (visual tokens + 2 markers) + 512 text tokens + max_new_tokens, "
        "rounded up to a multiple of 1024, within the checkpoint's positions (1024 for the "
        "tiny model, 2048 for Qwen2.5-VL at --max-pixels 1003520). A setting too small for one "
        "image is refused at start.")
    max_new_tokens: int = Field(64, description="Answer token limit per request.")
    min_new_tokens: int = Field(0, ge=0, description="Answer tokens generated before the end "
                                "token is allowed (vLLM min_tokens): fixed answer lengths for "
                                "throughput checks (`make gpu-check`); 0 in production.")
    min_pixels: int | None = Field(None, description="Override the processor's min pixels.")
    max_pixels: int | None = Field(None, description="Override the processor's max pixels: "
                                   "bounds visual tokens and memory per image.")
    enable_lora: bool = Field(True, description="Allow LoRA adapters (per request).")
    max_lora_rank: int = Field(16, description="Largest adapter rank vLLM reserves room for.")
    vision_lora: bool = Field(False, description="Apply adapters' vision-tower layers too "
                              "(vLLM enable_tower_connector_lora; adapters trained with "
                              "--no-freeze-vision).")
    max_loras: int = Field(2, description="Adapters vLLM keeps resident at once.")
    kv_cache_gb: float = Field(1.0, description="vLLM CPU KV-cache size in GiB.")
    mm_cache_gb: float = Field(0.0, ge=0, description="vLLM's cache of processed images, in "
                               "GiB: pays only when rows repeat images. 0 keeps an engine's "
                               "memory flat over a long job (vLLM's 4 GiB default grew the "
                               "label actor by about 0.5 GB per 2,000 distinct images).")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="vLLM's share of each GPU's memory (GPU only). Default: "
        "0.9 x the share of a GPU this process holds (Ray's assignment): 0.45 for an actor "
        "with 0.5 GPU, so two engines fit on one card.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one engine is split across "
                                      "(vLLM tensor parallelism), for checkpoints larger than "
                                      "one GPU; each label actor / serve replica then asks Ray "
                                      "for this many GPUs.")
    engine_seed: int = Field(0, description="Engine seed (decoding is greedy anyway).")

    @field_validator("model")
    @classmethod
    def _pin_local_folder(cls, v: str) -> str:
        # A relative folder means the caller's working directory; Ray Train's workers (and any
        # process started elsewhere) have their own, where transformers would take the name
        # for a hub id. A hub id or a URI is not a folder here and stays as given.
        import os

        return os.path.abspath(v) if not os.path.isabs(v) and os.path.isdir(v) else v

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.min_pixels and self.max_pixels and self.max_pixels < self.min_pixels:
            raise ValueError(f"`--max-pixels` must be >= `--min-pixels` (got {self.max_pixels} < "
                             f"{self.min_pixels})")
        if self.max_new_tokens < 1:
            raise ValueError(f"`--max-new-tokens` must be >= 1, got {self.max_new_tokens}")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"`--min-new-tokens` ({self.min_new_tokens}) must be <= "
                             f"`--max-new-tokens` ({self.max_new_tokens})")
        if (self.prompt_template is not None or self.coords is not None) and \
                self.family != "generic":
            raise ValueError("`--prompt-template` and `--coords` are settings of the generic "
                             "family: add `--family generic`")
        if self.family == "generic":
            self.resolve_family()  # a bad template is an error now, not at the first request
        return self

    # ---- device-aware defaults: the one place they are derived -----------------------------
    def model_len(self) -> int:
        """``max_model_len`` as given, or derived from the checkpoint and the image budget.
        Raises ValueError when one image cannot fit (in the setting or in the checkpoint's
        positions), naming the flags that change it."""
        from grounding.checkpoint import max_positions, resize_spec

        # Qwen-VL processors resize to at most max_pixels in whole patch x merge cells, one
        # visual token per cell: the largest image the processor lets through.
        spec = resize_spec(self.model, self.min_pixels, self.max_pixels)
        image = spec.max_pixels // (spec.factor * spec.factor)
        need = image + _VISION_MARKERS + _MIN_PROMPT + self.max_new_tokens
        positions = max_positions(self.model)
        hint = ("lower --max-pixels (each visual token covers "
                f"{spec.factor}x{spec.factor} px) or --max-new-tokens")
        if positions is not None and need > positions:
            raise ValueError(f"one image at max_pixels is {image} visual tokens: with a prompt "
                             f"and {self.max_new_tokens} answer tokens it needs {need}, more "
                             f"than the checkpoint's {positions} positions; {hint}")
        if self.max_model_len is not None:
            if need > self.max_model_len:
                raise ValueError(f"one image at max_pixels is {image} visual tokens: with a "
                                 f"prompt and {self.max_new_tokens} answer tokens it needs "
                                 f"{need} > --max-model-len {self.max_model_len}; raise "
                                 f"--max-model-len or {hint}")
            return self.max_model_len
        derived = image + _VISION_MARKERS + _TEXT_BUDGET + self.max_new_tokens
        derived = -(-derived // _LEN_STEP) * _LEN_STEP
        return derived if positions is None else min(derived, positions)

    def resolved(self, device: Device | None = None) -> EngineConfig:
        """These settings with every derived default made concrete for ``device`` (detected
        when None): dtype, max_model_len, gpu_memory_utilization. Engines run on the resolved
        copy; errors here come before any model loads."""
        device = device or Device.detect()
        tp = self.tensor_parallel_size
        if tp > 1 and (device.kind != "cuda" or device.gpus < tp):
            raise ValueError(f"tensor_parallel_size {tp} needs {tp} GPUs; this process holds "
                             f"{device.gpus:g} ({device.kind}): ask Ray for {tp} GPUs per "
                             "actor (the label and serve settings do so by default)")
        dtype = self.dtype
        if dtype == "auto":
            dtype = ("float32" if device.kind == "cpu" else
                     "bfloat16" if device.bf16 else "float16")
        share = self.gpu_memory_utilization
        if device.kind == "cpu":
            share = None
        elif share is None:
            # Each engine worker uses one GPU (its tp-th of the actor's); an actor holding
            # part of a GPU shares it, so its engine takes only that part of the memory.
            per_gpu = min(1.0, device.gpus / tp) if device.gpus > 0 else 1.0
            share = round(_MEMORY_SHARE * per_gpu, 4)
        return self.model_copy(update={"dtype": dtype, "max_model_len": self.model_len(),
                                       "gpu_memory_utilization": share})

    def actor_gpus(self, asked: float, flag: str) -> float:
        """The GPUs an actor running this engine asks Ray for: ``asked`` (its ``flag``), or
        ``tensor_parallel_size`` when that is over 1 and nothing was asked; fewer than the
        engine is split across is refused."""
        tp = self.tensor_parallel_size
        if tp == 1:
            return asked
        if asked == 0:
            return float(tp)
        if asked != tp:
            raise ValueError(f"tensor_parallel_size {tp} needs {tp} GPUs per actor, "
                             f"{flag} says {asked:g}: leave {flag} unset or make it {tp}")
        return asked

    def resolve_family(self):
        """The `grounding.families.Family` object these settings ask for: ``family`` (the
        generic one with its template and coordinates) or the one the checkpoint's
        architecture names."""
        from grounding.checkpoint import detect_family
        from grounding.families import get_family

        return get_family(self.family or detect_family(self.model), self.prompt_template,
                          self.coords)


@dataclass
class EngineInput:
    """One request: a chat-formatted prompt, its image, and an optional adapter name."""

    prompt: str
    image: Any  # PIL.Image.Image, RGB
    adapter: str | None = None
    grammar: str | None = None  # regex the answer must match in full (None: unconstrained)


@dataclass
class Generation:
    """Generated text with the log-prob of each generated token (natural log)."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)

    @property
    def mean_prob(self) -> float:
        return math.exp(sum(self.logprobs) / len(self.logprobs)) if self.logprobs else 0.0


class UnknownAdapterError(KeyError):
    """A request named an adapter the engine does not know."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown adapter"


def check_adapter_dir(path: str | Path) -> Path:
    """Structural check of a peft adapter folder; raises ValueError saying what is missing."""
    p = Path(path)
    if not (p / "adapter_config.json").is_file():
        raise ValueError(f"adapter folder {p} has no adapter_config.json")
    if not any((p / n).is_file() for n in ("adapter_model.safetensors", "adapter_model.bin")):
        raise ValueError(f"adapter folder {p} has no adapter_model.safetensors")
    try:
        json.loads((p / "adapter_config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"adapter folder {p}: adapter_config.json is not JSON ({e})") from e
    return p


def _weight_shapes(folder: Path, pattern: str) -> dict[str, list[int]]:
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    for f in sorted(folder.glob(pattern)):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                shapes[k] = list(st.get_slice(k).get_shape())
    return shapes


def check_adapter_fits(adapter: str | Path, model: str | Path, max_rank: int | None = None) -> None:
    """Check a LoRA adapter against the base checkpoint's weight shapes without loading either:
    every ``lora_A`` must be ``(r, in)`` and every ``lora_B`` ``(out, r)`` of a weight the model
    has. Raises ValueError naming the first mismatch (an adapter for another model, or corrupt
    weights, that an engine might otherwise load silently)."""
    a, m = Path(adapter), Path(model)
    base = _weight_shapes(m, "*.safetensors")
    if not base:
        return  # no safetensors to compare with (e.g. .bin checkpoints): structural check only
    lora = _weight_shapes(a, "adapter_model.safetensors")
    if not lora:
        raise ValueError(f"adapter {a} has no LoRA weights")
    for key, shape in lora.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        module = key.split(".lora_")[0]
        name = module.removeprefix("base_model.model.") + ".weight"
        target = base.get(name) or next((v for k, v in base.items() if k.endswith(name)), None)
        if target is None or len(target) != 2 or len(shape) != 2:
            raise ValueError(f"adapter {a}: {module} is not a linear layer of {m.name}")
        out_f, in_f = target
        if ".lora_A." in key and shape[1] != in_f:
            raise ValueError(f"adapter {a}: {key} has shape {shape}, the model's layer takes "
                             f"{in_f} inputs (expected [r, {in_f}])")
        if ".lora_B." in key and shape[0] != out_f:
            raise ValueError(f"adapter {a}: {key} has shape {shape}, the model's layer gives "
                             f"{out_f} outputs (expected [{out_f}, r])")
        r = shape[0] if ".lora_A." in key else shape[1]
        if max_rank is not None and r > max_rank:
            raise ValueError(f"adapter {a} has rank {r}, this engine allows at most {max_rank} "
                             f"(raise max_lora_rank)")


class Engine(ABC):
    """Batch generation over (prompt, image, adapter) requests, greedy decoding."""

    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self._adapters: dict[str, str] = {}

    @property
    def adapters(self) -> dict[str, str]:
        """Registered adapters: name -> folder."""
        return dict(self._adapters)

    def add_adapter(self, name: str, path: str | Path) -> None:
        """Register a LoRA adapter under a name that is never reused for other weights.

        vLLM and Ray Serve cache adapters by name (vllm #42125): re-registering a name with
        another folder would serve stale weights, so it is refused.
        """
        path = str(check_adapter_dir(path))
        check_adapter_fits(path, self.cfg.model,
                           self.cfg.max_lora_rank if self.cfg.engine == "vllm" else None)
        if name in self._adapters and self._adapters[name] != path:
            raise ValueError(f"adapter name {name!r} is already bound to {self._adapters[name]}; "
                             "adapter names are never reused, register a new name")
        if not self.cfg.enable_lora:
            raise ValueError("this engine was started with enable_lora=False")
        self._adapters[name] = path

    def remove_adapter(self, name: str) -> None:
        """Forget an adapter that was refused before it ever served (its name stays burnt:
        never register other weights under it)."""
        self._adapters.pop(name, None)

    def _adapter_path(self, name: str) -> str:
        try:
            return self._adapters[name]
        except KeyError:
            known = ", ".join(sorted(self._adapters)) or "none"
            raise UnknownAdapterError(f"unknown adapter {name!r} (known: {known})") from None

    @abstractmethod
    def generate(self, inputs: list[EngineInput]) -> list[Generation]:
        """Greedy generation for each input, in order."""

    def submit(self, inputs: list[EngineInput]) -> Future:
        """Start `generate` on ``inputs`` without waiting; the future gives its result.

        Here one call runs at a time on a worker thread, so async callers (Ray Data's async
        batches) can use any engine; vLLM overrides it to feed its scheduler continuously."""
        if getattr(self, "_runner", None) is None:
            self._runner = ThreadPoolExecutor(1, thread_name_prefix="engine")
        return self._runner.submit(self.generate, list(inputs))

    @abstractmethod
    def chat_prompt(self, instruction: str) -> str:
        """The model's chat template applied to one image + instruction."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the engine's resources."""
