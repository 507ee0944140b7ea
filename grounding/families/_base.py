"""What every model family provides, and the shared text -> `Box` pipeline.

A family module subclasses `Family`, sets its class attributes, and implements `_prompt`,
`_extract` (text -> numbers as the model wrote them), `_render` (boxes -> answer text) and
`_grammar` (the regular expression of a well-formed answer, see `grounding.families._grammar`).
The conversion of those numbers into original-image pixels, the fixing of swapped corners,
clipping, dropping and the status of the result are shared here, keyed on `Family.coords`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar, Literal

from pydantic import BaseModel, Field

from grounding.boxes import Box, check_image_size
from grounding.families._text import Found, as_text
from grounding.resize import ResizeSpec

Coords = Literal["norm1000", "resized_pixels", "bins1000", "loc1024", "pixels", "norm1"]
"""What the numbers in a family's answer text mean (``W``/``H``: original width/height):

* ``norm1000``: 0-1000 of the image, ``x = v * W / 1000``.
* ``pixels``: pixels of the original image, ``x = v``.
* ``norm1``: 0-1 of the image, ``x = v * W`` (rendered with three decimals).
* ``resized_pixels``: pixels of the `smart_resize`'d model input, ``x = v * W / W_res``.
* ``bins1000``: bin index 0-999, decoded to the bin centre ``x = (v + 0.5) * W / 1000``.
* ``loc1024``: ``<locNNNN>`` token 0-1023, ``x = v / 1024 * W``.
"""

Encoder = Callable[[Box], tuple[int, int, int, int]]
"""Box -> its integer coordinates x1, y1, x2, y2 in the family's grid (see `Family._render`)."""

_EPS = 1e-6  # pixels: clipping by less than this is float noise, not a model error

Status = Literal["ok", "clipped", "truncated", "empty", "unparseable"]


class ParseResult(BaseModel):
    """Boxes read from one model answer, with what had to be repaired to get them."""

    boxes: list[Box] = Field(
        default_factory=list, description="Boxes in original-image pixels, in text order."
    )
    status: Status = Field(
        description="ok; clipped (some box left the image); truncated (text cut off, complete "
        "boxes before the cut kept); empty (the model answered with no box); unparseable "
        "(nothing box-like found, or no usable box)."
    )
    clipped: int = Field(default=0, description="Boxes clipped to the image bounds.")
    fixed: int = Field(default=0, description="Boxes whose swapped corners were put in order.")
    widened: int = Field(default=0, description="Boxes with zero width or height (written "
                         "x1 == x2, or clipped from wholly outside the image) widened to one "
                         "unit of the family's grid.")
    dropped: int = Field(default=0, description="Boxes discarded: non-finite numbers.")
    message: str = Field(default="", description="Human-readable note on what happened.")

    @property
    def ok(self) -> bool:
        """True when usable boxes came out (status ok, clipped or truncated)."""
        return self.status in ("ok", "clipped", "truncated") and bool(self.boxes)


class Family(ABC):
    """One model family's prompt, answer parser and answer renderer."""

    name: ClassVar[str]
    coords: ClassVar[Coords]
    needs_resize: ClassVar[bool] = False
    chat: ClassVar[bool] = True
    architectures: ClassVar[tuple[str, ...]] = ()
    """HF ``config.architectures[0]`` values served by this family."""

    @property
    def requires(self) -> tuple[str, ...]:
        """Arguments `parse` and `render` need besides the text."""
        return ("image_size", "resize") if self.needs_resize else ("image_size",)

    def __repr__(self) -> str:
        return f"<family {self.name} coords={self.coords}>"

    def prompt_id(self) -> str:
        """What identifies this family's prompt (hashed into the prompt version of outputs)."""
        return self.prompt("{text}")

    @property
    def grammar(self) -> str:
        """The regular expression every well-formed answer of this family matches in full:
        1 to `MAX_BOXES` boxes in its coordinates, labels optional, or its "no such object"
        answer. Engines decode under it when ``EngineConfig.constrained`` is on."""
        return self._grammar()

    # -- public API ------------------------------------------------------------------------

    def prompt(self, text: str) -> str:
        """The grounding instruction for a referring expression (no image placeholder)."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"referring expression is empty, got {text!r}")
        return self._prompt(text.strip())

    def parse(
        self, text: str, image_size: tuple[int, int], resize: ResizeSpec | None = None
    ) -> ParseResult:
        """Model answer text -> boxes in original-image pixels. Never raises on the text;
        raises `ValueError` on a bad ``image_size`` or a missing ``resize``."""
        size = check_image_size(image_size)
        model_size = self._model_size(size, resize)
        try:
            found = self._extract(as_text(text))
            return _finish(found, size, lambda v: self._to_pixels(v, size, model_size),
                           self._unit(size, model_size))
        except Exception as exc:  # model text must never crash a batch; report it instead
            return ParseResult(
                status="unparseable",
                message=f"{self.name} parser failed on the text: {type(exc).__name__}: {exc}",
            )

    def render(
        self,
        boxes: Sequence[Box],
        image_size: tuple[int, int],
        resize: ResizeSpec | None = None,
    ) -> str:
        """The answer text this family's model would give for ``boxes`` (training targets).

        Coordinates are quantised to the family's integer grid and clamped to its range.
        """
        size = check_image_size(image_size)
        model_size = self._model_size(size, resize)
        return self._render(list(boxes), lambda b: self._from_pixels(b, size, model_size))

    # -- to implement ----------------------------------------------------------------------

    @abstractmethod
    def _prompt(self, text: str) -> str: ...

    @abstractmethod
    def _extract(self, text: str) -> Found:
        """Numbers as the model wrote them, reordered to x1, y1, x2, y2 (not yet pixels)."""

    @abstractmethod
    def _render(self, boxes: list[Box], encode: Encoder) -> str:
        """Answer text; ``encode(box)`` gives the box's integer coordinates (x1, y1, x2, y2)."""

    @abstractmethod
    def _grammar(self) -> str:
        """The regex of a well-formed answer (see `grammar`)."""

    # -- shared ----------------------------------------------------------------------------

    def _model_size(
        self, size: tuple[int, int], resize: ResizeSpec | None
    ) -> tuple[int, int] | None:
        if not self.needs_resize:
            return None
        if resize is None:
            raise ValueError(
                f"{self.name} needs `resize` (min/max pixels) because its boxes are in "
                "resized-image pixels"
            )
        if not isinstance(resize, ResizeSpec):
            raise ValueError(f"`resize` must be a ResizeSpec, got {type(resize).__name__}")
        return resize.resized_size(size)

    def _to_pixels(
        self,
        v: tuple[float, float, float, float],
        size: tuple[int, int],
        model_size: tuple[int, int] | None,
    ) -> tuple[float, float, float, float]:
        w, h = size
        if self.coords == "norm1000":
            den_x, den_y, off = 1000, 1000, 0.0
        elif self.coords == "pixels":
            den_x, den_y, off = w, h, 0.0
        elif self.coords == "norm1":
            den_x, den_y, off = 1, 1, 0.0
        elif self.coords == "resized_pixels":
            assert model_size is not None
            den_x, den_y, off = model_size[0], model_size[1], 0.0
        elif self.coords == "bins1000":
            den_x, den_y, off = 1000, 1000, 0.5
        else:  # loc1024
            den_x, den_y, off = 1024, 1024, 0.0
        # Multiply before dividing: v = den maps exactly onto the image edge.
        x1, y1, x2, y2 = v
        return (
            (x1 + off) * w / den_x,
            (y1 + off) * h / den_y,
            (x2 + off) * w / den_x,
            (y2 + off) * h / den_y,
        )

    def _unit(
        self, size: tuple[int, int], model_size: tuple[int, int] | None
    ) -> tuple[float, float]:
        """One step of the family's integer grid, in original-image pixels (x, y)."""
        step = 0.001 if self.coords == "norm1" else 1.0  # norm1 is written to 3 decimals
        a = self._to_pixels((0.0, 0.0, step, step), size, model_size)
        return (a[2] - a[0], a[3] - a[1])

    def _from_pixels(
        self, box: Box, size: tuple[int, int], model_size: tuple[int, int] | None
    ) -> tuple[int, int, int, int]:
        """Integer grid coordinates; ``norm1`` gives thousandths (the family divides)."""
        if self.coords in ("norm1000", "norm1"):
            return _grid(box, size, (1000, 1000), (1000, 1000), round)
        if self.coords == "pixels":
            return _grid(box, size, size, size, round)
        if self.coords == "resized_pixels":
            assert model_size is not None
            return _grid(box, size, model_size, model_size, round)
        if self.coords == "bins1000":
            # Florence-2's BoxQuantizer: floor into 1000 bins, the last one 999.
            return _grid(box, size, (1000, 1000), (999, 999), math.floor)
        return _grid(box, size, (1024, 1024), (1023, 1023), round)


def json_items(boxes: Sequence[Box], encode: Encoder) -> list[dict[str, object]]:
    """``{"bbox_2d": [x1, y1, x2, y2], "label": ...}`` per box (no ``label`` key when it has
    none): the items of the Qwen JSON answer style."""
    items = []
    for box in boxes:
        item: dict[str, object] = {"bbox_2d": list(encode(box))}
        if box.label is not None:
            item["label"] = box.label
        items.append(item)
    return items


def _grid(
    box: Box,
    size: tuple[int, int],
    steps: tuple[int, int],
    top: tuple[int, int],
    rounding: Callable[[float], int],
) -> tuple[int, int, int, int]:
    """Quantise ``box`` to ``steps`` per image side, clamped to ``[0, top]``."""

    def q(v: float, axis: int) -> int:
        return min(max(int(rounding(v * steps[axis] / size[axis])), 0), top[axis])

    return (q(box.x1, 0), q(box.y1, 1), q(box.x2, 0), q(box.y2, 1))


def _widen(a: float, b: float, unit: float, top: float) -> tuple[float, float]:
    """A zero-length side ``a == b`` made one ``unit`` long, inside ``[0, top]`` when it was."""
    if b + unit <= top or a - unit < 0:
        return a, b + unit
    return a - unit, b


def _finish(
    found: Found,
    size: tuple[int, int],
    to_pixels: Callable[[tuple[float, float, float, float]], tuple[float, float, float, float]],
    unit: tuple[float, float] = (1.0, 1.0),
) -> ParseResult:
    """Convert to pixels, repair and count, then pick the status.

    A box with zero width or height (written with x1 == x2, which a grammar cannot forbid, or
    wholly outside the image and clipped to its border) is widened to one ``unit`` of the grid
    rather than dropped: the answer stays a box, flagged (``widened``, and ``clipped`` when it
    was outside), and its score (the model's certainty about those digits) still ranks it for
    review. Only non-finite numbers drop a box."""
    boxes: list[Box] = []
    clipped = fixed = dropped = widened = 0
    for raw in found.raws:
        x1, y1, x2, y2 = to_pixels(raw.values)
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            dropped += 1
            continue
        if x2 < x1 or y2 < y1:
            x1, x2 = min(x1, x2), max(x1, x2)
            y1, y2 = min(y1, y2), max(y1, y2)
            fixed += 1
        box, was_clipped = Box(x1=x1, y1=y1, x2=x2, y2=y2, label=raw.label).clip(*size)
        # Float noise at the border is not worth a flag.
        moved = max(abs(a - b) for a, b in zip(box.to_list(), (x1, y1, x2, y2), strict=True))
        clipped += was_clipped and moved > _EPS
        if box.area <= 0:  # written with x1 == x2, or wholly outside the image
            bx1, bx2 = _widen(box.x1, box.x2, unit[0], size[0]) if box.x1 == box.x2 else \
                (box.x1, box.x2)
            by1, by2 = _widen(box.y1, box.y2, unit[1], size[1]) if box.y1 == box.y2 else \
                (box.y1, box.y2)
            box = Box(x1=bx1, y1=by1, x2=bx2, y2=by2, label=raw.label)
            widened += 1
        boxes.append(box)

    counts = dict(clipped=clipped, fixed=fixed, dropped=dropped, widened=widened)
    if not found.raws:
        status: Status = "empty" if found.empty else "unparseable"
        return ParseResult(status=status, message=found.note, **counts)
    if not boxes:
        return ParseResult(
            status="unparseable",
            message=f"all {dropped} boxes dropped (non-finite numbers)",
            **counts,
        )
    notes = [f"{len(boxes)} box(es)"]
    if found.truncated:
        notes.append("text cut off: kept the complete boxes before the cut")
    notes += [f"{n} {what}" for what, n in counts.items() if n]
    if found.note:
        notes.append(found.note)
    status = "truncated" if found.truncated else "clipped" if clipped else "ok"
    return ParseResult(boxes=boxes, status=status, message="; ".join(notes), **counts)
