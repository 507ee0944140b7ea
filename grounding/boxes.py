"""The one box type of groundlabel, and conversions between coordinate systems.

Coordinate convention (everything in this package, unless a name says otherwise):

* A `Box` is ``x1, y1, x2, y2`` in float pixels of the ORIGINAL image: origin at the top-left
  corner, x to the right, y down. Coordinates are continuous: a box covering the whole
  ``W x H`` image is ``(0, 0, W, H)`` (``x2``/``y2`` are the far edges, not the last pixel index).
* Image sizes are always ``(width, height)`` tuples of positive ints (PIL's ``Image.size``).
* "norm1000": ``x_norm = x / W * 1000`` (Qwen-VL, Qwen2-VL, Qwen3-VL, InternVL2).
* "resized": absolute pixels of the model's resized input (Qwen2.5-VL, after
  `grounding.resize.smart_resize`): ``x_orig = x_res * W / W_res``.

Our own code is held to the structure strictly: a box with ``x2 < x1`` raises `ValueError`
naming what was expected and what came. Lenient handling of model text lives in
`grounding.families`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "Box",
    "check_image_size",
    "from_norm1000",
    "from_resized",
    "iou",
    "to_norm1000",
    "to_resized",
]


class Box(BaseModel):
    """An axis-aligned box in float pixels of the original image (xyxy, origin top-left)."""

    model_config = ConfigDict(frozen=True)

    x1: float = Field(description="Left edge, pixels of the original image (0 = left border).")
    y1: float = Field(description="Top edge, pixels of the original image (0 = top border).")
    x2: float = Field(description="Right edge (continuous, exclusive), >= x1.")
    y2: float = Field(description="Bottom edge (continuous, exclusive), >= y1.")
    score: float | None = Field(
        default=None, description="Confidence in [0, 1], or None when the model gives none."
    )
    label: str | None = Field(
        default=None, description="Text the model attached to the box (referring expression)."
    )

    @model_validator(mode="after")
    def _check(self) -> Box:
        for name in ("x1", "y1", "x2", "y2"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"Box needs finite coordinates, got {name}={value}")
        if self.x2 < self.x1 or self.y2 < self.y1:
            raise ValueError(
                "Box needs x1 <= x2 and y1 <= y2, "
                f"got x1={self.x1:g} x2={self.x2:g} y1={self.y1:g} y2={self.y2:g}"
            )
        if self.score is not None and not (0.0 <= self.score <= 1.0):
            raise ValueError(f"Box score must be within [0, 1], got score={self.score}")
        return self

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    @property
    def area(self) -> float:
        return self.width * self.height

    def iou(self, other: Box) -> float:
        """Intersection over union with ``other``; see `iou`."""
        return iou(self, other)

    def clip(self, width: float, height: float) -> tuple[Box, bool]:
        """Clip to the image ``[0, width] x [0, height]``; also return whether anything moved."""
        x1 = min(max(self.x1, 0.0), width)
        y1 = min(max(self.y1, 0.0), height)
        x2 = min(max(self.x2, 0.0), width)
        y2 = min(max(self.y2, 0.0), height)
        if (x1, y1, x2, y2) == (self.x1, self.y1, self.x2, self.y2):
            return self, False
        return self.model_copy(update={"x1": x1, "y1": y1, "x2": x2, "y2": y2}), True

    def to_list(self) -> list[float]:
        """``[x1, y1, x2, y2]``."""
        return [self.x1, self.y1, self.x2, self.y2]

    @classmethod
    def from_list(cls, seq: Sequence[float], **kw: Any) -> Box:
        """Build from ``[x1, y1, x2, y2]``; ``kw`` sets ``score`` / ``label``."""
        values = list(seq)
        if len(values) != 4:
            raise ValueError(f"expected 4 numbers [x1, y1, x2, y2], got {len(values)}")
        x1, y1, x2, y2 = values
        return cls(x1=x1, y1=y1, x2=x2, y2=y2, **kw)

    def scale(self, sx: float, sy: float) -> Box:
        """Multiply x coordinates by ``sx`` and y coordinates by ``sy`` (both must be > 0)."""
        if not (sx > 0 and sy > 0 and math.isfinite(sx) and math.isfinite(sy)):
            raise ValueError(f"scale factors must be finite and > 0, got sx={sx} sy={sy}")
        return self.model_copy(
            update={
                "x1": self.x1 * sx,
                "y1": self.y1 * sy,
                "x2": self.x2 * sx,
                "y2": self.y2 * sy,
            }
        )


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes; 0 when they do not overlap or the union is 0."""
    iw = min(a.x2, b.x2) - max(a.x1, b.x1)
    ih = min(a.y2, b.y2) - max(a.y1, b.y1)
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = a.area + b.area - inter
    if union <= 0:
        return 0.0
    return inter / union


def check_image_size(image_size: Any, name: str = "image_size") -> tuple[int, int]:
    """Return ``image_size`` as ``(width, height)`` ints, or raise `ValueError`.

    Accepts any two-item sequence of positive integers (numpy ints included; bools and floats
    are refused).
    """
    try:
        width, height = image_size
        if isinstance(width, bool) or isinstance(height, bool):
            raise TypeError
        width, height = operator.index(width), operator.index(height)
    except (TypeError, ValueError):
        raise ValueError(
            f"`{name}` must be (width, height) with two positive ints, got {image_size!r}"
        ) from None
    if width <= 0 or height <= 0:
        raise ValueError(
            f"`{name}` must be (width, height) with two positive ints, got {image_size!r}"
        )
    return width, height


def _four(coords: Sequence[float]) -> list[float]:
    values = [float(v) for v in coords]
    if len(values) != 4:
        raise ValueError(f"expected 4 numbers [x1, y1, x2, y2], got {len(values)}")
    return values


def to_norm1000(box: Box, image_size: tuple[int, int]) -> list[float]:
    """Original-image pixels -> 0-1000 normalised floats: ``x_norm = x / W * 1000``."""
    w, h = check_image_size(image_size)
    return [box.x1 / w * 1000, box.y1 / h * 1000, box.x2 / w * 1000, box.y2 / h * 1000]


def from_norm1000(coords: Sequence[float], image_size: tuple[int, int], **kw: Any) -> Box:
    """0-1000 normalised ``[x1, y1, x2, y2]`` -> `Box` in original pixels: ``x = x_norm * W / 1000``."""
    w, h = check_image_size(image_size)
    x1, y1, x2, y2 = _four(coords)
    return Box(x1=x1 * w / 1000, y1=y1 * h / 1000, x2=x2 * w / 1000, y2=y2 * h / 1000, **kw)


def to_resized(box: Box, image_size: tuple[int, int], resized_size: tuple[int, int]) -> list[float]:
    """Original pixels -> pixels of the resized model input: ``x_res = x * W_res / W``.

    ``image_size`` and ``resized_size`` are both ``(width, height)``.
    """
    w, h = check_image_size(image_size)
    rw, rh = check_image_size(resized_size, "resized_size")
    return [box.x1 * rw / w, box.y1 * rh / h, box.x2 * rw / w, box.y2 * rh / h]


def from_resized(
    coords: Sequence[float],
    image_size: tuple[int, int],
    resized_size: tuple[int, int],
    **kw: Any,
) -> Box:
    """Resized-input pixels ``[x1, y1, x2, y2]`` -> `Box` in original pixels.

    ``x_orig = x_res * W / W_res`` (and likewise for y with heights).
    """
    w, h = check_image_size(image_size)
    rw, rh = check_image_size(resized_size, "resized_size")
    x1, y1, x2, y2 = _four(coords)
    return Box(x1=x1 * w / rw, y1=y1 * h / rh, x2=x2 * w / rw, y2=y2 * h / rh, **kw)
