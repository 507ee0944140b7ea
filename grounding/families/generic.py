"""Generic: any chat VLM asked in plain words for ``[x1,y1,x2,y2]``.

For a vLLM-served model none of the other families describes. The prompt is a template the
user may change (``{text}`` stands for the referring expression); the coordinate convention is
a setting, since each model has its own:

* ``pixels``: pixels of the original image (``x = v``);
* ``resized_pixels``: pixels of the processor's resized input (Qwen2.5-VL style);
* ``norm1000``: 0-1000 of the image (``x = v * W / 1000``, the default);
* ``norm1``: 0-1 of the image (``x = v * W``), three decimals.

Answer: one or more ``[x1, y1, x2, y2]`` lists separated by ", ", or ``[]`` for "no such
object". The parser is lenient (any four numbers in brackets, prose around); the grammar
(`Generic._grammar`) holds a constrained answer to exactly that form.

Its prompt version (``generic:<hash>``, recorded in every output row's lineage) hashes the
template and the convention, so outputs of different prompts never mix unnoticed.

Example::

    groundlabel label --input data/ --output out/ --family generic \\
      --prompt-template "Where is {text}? Answer [x1,y1,x2,y2] in 0-1000." --coords norm1000
"""

from __future__ import annotations

from typing import Literal

from grounding.boxes import Box
from grounding.families import _grammar as g
from grounding.families._base import Encoder, Family
from grounding.families._text import QUAD, Found, Raw, conclude, strip_special, to_float

DEFAULT_TEMPLATE = "Locate {text} in the image and return the bounding box as [x1,y1,x2,y2]."
"""The plain prompt of the seed recipe."""

_NUMBERS = {"pixels": g.PIXELS, "resized_pixels": g.PIXELS, "norm1000": g.N1000,
            "norm1": g.UNIT}


Convention = Literal["pixels", "resized_pixels", "norm1000", "norm1"]


class Generic(Family):
    name = "generic"
    coords = "norm1000"
    chat = True

    def __init__(self, template: str | None = None, coords: Convention | None = None):
        """``template`` (default `DEFAULT_TEMPLATE`) must hold ``{text}`` once; ``coords``
        (default ``norm1000``) is one of the conventions above. `ValueError` otherwise."""
        template = DEFAULT_TEMPLATE if template is None else template
        if not isinstance(template, str) or template.count("{text}") != 1:
            raise ValueError("the generic prompt template must contain {text} exactly once, "
                             f"got {template!r}")
        coords = coords or "norm1000"
        if coords not in _NUMBERS:
            raise ValueError(f"unknown coordinate convention {coords!r}; known: "
                             f"{', '.join(_NUMBERS)}")
        self.template = template
        self.coords = coords  # type: ignore[misc] - a setting here, not a class constant
        self.needs_resize = coords == "resized_pixels"  # type: ignore[misc]

    def prompt_id(self) -> str:
        return f"{self.template}|{self.coords}"

    def _prompt(self, text: str) -> str:
        return self.template.replace("{text}", text)

    def _extract(self, text: str) -> Found:
        text = strip_special(text)
        raws = [Raw(tuple(to_float(v) for v in m.groups())) for m in QUAD.finditer(text)]
        if not raws and text.strip().replace(" ", "") in ("[]", "[[]]"):
            return Found(empty=True, note="the model answered with no box")
        tail = (text[text.rfind("]") + 1:] if raws else text).strip()
        # cut inside a box, or right after a separator that promised another one
        truncated = tail.startswith(",") or ("[" in tail and any(c.isdigit() for c in tail))
        return conclude(raws, truncated, text, "no [x1,y1,x2,y2] box in the model text")

    def _render(self, boxes: list[Box], encode: Encoder) -> str:
        if not boxes:
            return "[]"
        if self.coords == "norm1":  # encode gives thousandths
            return ", ".join("[{}]".format(", ".join(f"{v / 1000:g}" for v in encode(b)))
                             for b in boxes)
        return ", ".join("[{}, {}, {}, {}]".format(*encode(b)) for b in boxes)

    def _grammar(self) -> str:
        return rf"\[\]|{g.listed(g.quad(_NUMBERS[self.coords]), ', ')}"


FAMILY = Generic()
