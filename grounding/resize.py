"""Qwen-VL's ``smart_resize``: the size of the image the model actually sees.

Qwen2.5-VL answers with boxes in pixels of this resized image, so turning its output into
original-image pixels needs the same ``min_pixels`` / ``max_pixels`` / ``factor`` the processor
used (see `grounding.families.qwen2_5_vl`).

Source: transformers ``models/qwen2_vl/image_processing_qwen2_vl.py::smart_resize`` (the
processor vLLM runs), which matches ``qwen_vl_utils.vision_process.smart_resize``.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, Field, model_validator

from grounding.boxes import check_image_size

__all__ = ["MAX_RATIO", "ResizeSpec", "smart_resize"]

MAX_RATIO = 200
"""Qwen refuses images whose long side is more than 200 times the short side."""


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:
    """Return ``(resized_height, resized_width)`` as Qwen's image processor computes it.

    Both sides become multiples of ``factor``, the pixel count lands in
    ``[min_pixels, max_pixels]`` and the aspect ratio is kept as closely as possible:

    1. round each side to the nearest multiple of ``factor``;
    2. if the area exceeds ``max_pixels``: ``beta = sqrt(h * w / max_pixels)`` and each side is
       floored to a multiple of ``factor`` (at least ``factor``);
    3. elif the area is below ``min_pixels``: ``beta = sqrt(min_pixels / (h * w))`` and each
       side is ceiled to a multiple of ``factor``.

    Note the argument order ``(height, width)``, as in Qwen's code.

    >>> smart_resize(500, 1000)
    (504, 1008)
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got height={height} width={width}")
    if factor <= 0:
        raise ValueError(f"factor must be positive, got {factor}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_RATIO}, got {ratio}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class ResizeSpec(BaseModel):
    """The resize settings of a Qwen-style image processor."""

    min_pixels: int = Field(
        gt=0, description="Smallest pixel count of the model input (processor `min_pixels`)."
    )
    max_pixels: int = Field(
        gt=0, description="Largest pixel count of the model input (processor `max_pixels`)."
    )
    factor: int = Field(
        default=28,
        gt=0,
        description="Sides are multiples of this: patch_size * merge_size "
        "(28 for Qwen2-VL / Qwen2.5-VL, 32 for Qwen3-VL).",
    )

    @model_validator(mode="after")
    def _check(self) -> ResizeSpec:
        if self.max_pixels < self.min_pixels:
            raise ValueError(
                "`max_pixels` must be >= `min_pixels` "
                f"(got max_pixels={self.max_pixels}, min_pixels={self.min_pixels})"
            )
        return self

    def resized_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """``(width, height)`` of the model input for an original ``(width, height)`` image."""
        width, height = check_image_size(image_size)
        rh, rw = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return rw, rh
