"""What a checkpoint folder says about itself: its model family and its image resize settings.

Real checkpoints (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, ...) and the bundled tiny model are read the
same way: ``config.json`` names the architecture, and ``preprocessor_config.json`` or
``processor_config.json`` holds the image processor's min/max pixels and patch/merge sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

from grounding.resize import ResizeSpec


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def detect_family(model_dir: str | Path) -> str:
    """Family name for a checkpoint folder, from ``config.json``'s ``architectures``."""
    from grounding.families import family_for_architecture

    p = Path(model_dir)
    if not p.is_dir():
        raise FileNotFoundError(f"model folder not found: {p}")
    cfg = _read_json(p / "config.json")
    archs = cfg.get("architectures") or []
    if not archs:
        raise ValueError(f"{p}/config.json names no architectures; pass --family explicitly")
    return family_for_architecture(archs[0])


def image_processor_settings(model_dir: str | Path) -> dict:
    p = Path(model_dir)
    pre = _read_json(p / "preprocessor_config.json")
    if not pre:
        pre = _read_json(p / "processor_config.json").get("image_processor", {})
    return pre


def resize_spec(model_dir: str | Path, min_pixels: int | None = None,
                max_pixels: int | None = None) -> ResizeSpec:
    """The resize the model's processor applies (overrides win), as a `ResizeSpec`."""
    pre = image_processor_settings(model_dir)
    size = pre.get("size") or {}
    lo = min_pixels or pre.get("min_pixels") or size.get("shortest_edge") or 56 * 56
    hi = max_pixels or pre.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280
    factor = int(pre.get("patch_size", 14)) * int(pre.get("merge_size", 2))
    return ResizeSpec(min_pixels=int(lo), max_pixels=int(hi), factor=factor)


def max_positions(model_dir: str | Path) -> int | None:
    """The longest sequence the checkpoint's language model takes (``max_position_embeddings``
    of ``text_config`` or of the top level), None when the config does not say."""
    cfg = _read_json(Path(model_dir) / "config.json")
    for part in (cfg.get("text_config") or {}, cfg.get("llm_config") or {}, cfg):
        if part.get("max_position_embeddings"):
            return int(part["max_position_embeddings"])
    return None
