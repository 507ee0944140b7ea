"""``groundlabel merge``: fold a LoRA adapter into the base weights, a standalone checkpoint.

The result loads in vLLM and transformers like any checkpoint (no LoRA at serving time, so
no per-request adapter cost), with the base's processor, chat template and groundlabel.json.

Run::

    groundlabel merge --adapter runs/adapter --out runs/merged
    groundlabel merge --registry s3://b/adapters --name gl-20261126-010203-abc123 --out merged/
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from pydantic import Field

from grounding.paths import DEFAULT_MODEL
from grounding.settings import Settings
from grounding.storage import StorageOptions


class MergeConfig(Settings):
    """Settings of ``groundlabel merge``."""

    out: str = Field(description="Folder for the merged checkpoint.")
    adapter: str | None = Field(None, description="Adapter folder (or use --registry/--name).")
    registry: str | None = Field(None, description="Adapter registry to take --name from.")
    name: str | None = Field(None, description="Adapter name in the registry (default: the "
                             "production adapter).")
    model: str = Field(str(DEFAULT_MODEL), description="Base checkpoint the adapter was "
                       "trained on.")
    dtype: str = Field("bfloat16", description="dtype of the saved weights.")
    storage: StorageOptions = Field(default_factory=StorageOptions,
                                    description="Object storage for the registry.")


def merge(cfg: MergeConfig) -> str:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from grounding.engines.base import check_adapter_dir

    adapter = cfg.adapter
    if adapter is None:
        from grounding.registry import AdapterRegistry, RegistryError

        if not cfg.registry:
            raise ValueError("give --adapter DIR, or --registry URI [--name NAME]")
        reg = AdapterRegistry(cfg.registry, cfg.storage)
        name = cfg.name or reg.production()
        if name is None:
            raise RegistryError(f"{cfg.registry} has no production adapter; pass --name")
        adapter = reg.download(name, tempfile.mkdtemp(prefix="gl-merge-"))
    check_adapter_dir(adapter)
    base = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, cfg.dtype)
    merged.save_pretrained(out, state_dict={k: v.to(dtype) for k, v in merged.state_dict().items()})
    AutoProcessor.from_pretrained(cfg.model).save_pretrained(out)
    for extra in ("groundlabel.json", "chat_template.jinja"):
        if (Path(cfg.model) / extra).exists() and not (out / extra).exists():
            shutil.copy(Path(cfg.model) / extra, out / extra)
    return str(out)
