"""``groundlabel merge``: fold a LoRA adapter into the base weights, a standalone checkpoint.

The result loads in vLLM and transformers like any checkpoint (no LoRA at serving time, so
no per-request adapter cost), with the base's processor, chat template and groundlabel.json.

On a Ray cluster (``--ray-address``, or ``RAY_ADDRESS`` as under ``ray job submit``) the merge
runs as a Ray task there, on a node with ``--num-gpus`` / ``--task-resources``: the adapter's
files travel through Ray's object store, and the task writes ``--out`` where it runs, so give an
``s3://`` URI (or a path on a file system every node shares). Without an address it runs in
this process (no Ray is started for it).

Run::

    groundlabel merge --adapter runs/adapter --out runs/merged
    groundlabel merge --registry s3://b/adapters --name gl-20261126-010203-abc123 --out merged/
    RAY_ADDRESS=http://head:8265 groundlabel merge --registry s3://b/adapters \
        --out s3://b/merged/7b-v3 --model /models/Qwen2.5-VL-7B-Instruct --task-resources '{"train": 1}'
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from pydantic import Field

from grounding.paths import DEFAULT_MODEL
from grounding.settings import RaySettings, Settings
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
                                    description="Object storage for the registry and --out.")
    ray: RaySettings = Field(default_factory=RaySettings, description="The Ray cluster to "
                             "merge on (none: in this process).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs of the merge task on a cluster.")
    task_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources of the merge task on a cluster, "
        "e.g. {\"train\": 1} to run it on the nodes that offer it.")


def merge(cfg: MergeConfig) -> str:
    """Merge; returns ``cfg.out``. On a cluster the work is a Ray task there (module doc)."""
    from grounding.engines.base import check_adapter_dir

    adapter = _adapter_dir(cfg)
    check_adapter_dir(adapter)
    if not cfg.ray.address():
        return _merge_into(cfg, adapter)
    import ray

    from grounding.storage import folder_files

    cfg.ray.connect(log_to_driver=False)
    files = folder_files(adapter)
    task = ray.remote(_merge_task).options(num_cpus=1, num_gpus=cfg.num_gpus,
                                           resources=cfg.task_resources, name="groundlabel-merge")
    return ray.get(task.remote(cfg, files))


def _merge_task(cfg: MergeConfig, files: dict[str, bytes]) -> str:
    """The Ray task: the adapter's files into a folder of this node, then `_merge_into`."""
    from grounding.storage import write_folder

    with tempfile.TemporaryDirectory(prefix="gl-merge-") as d:
        return _merge_into(cfg, write_folder(files, d))


def _adapter_dir(cfg: MergeConfig) -> str:
    """The adapter as a local folder: --adapter, or downloaded from the registry."""
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
    return adapter


def _merge_into(cfg: MergeConfig, adapter: str) -> str:
    """Fold ``adapter`` into the base and write the checkpoint to ``cfg.out`` (a folder, or an
    ``s3://`` URI: written locally first, then uploaded)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if "://" in cfg.out:
        from grounding.storage import filesystem

        with tempfile.TemporaryDirectory(prefix="gl-merged-") as d:
            _merge_into(cfg.model_copy(update={"out": d}), adapter)
            fs, root = filesystem(cfg.out, cfg.storage)
            fs.put(f"{d}/", root, recursive=True)
        return cfg.out
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
    return cfg.out
