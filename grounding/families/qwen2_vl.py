"""Qwen2-VL (and Qwen-VL-Chat): special-token boxes normalised to 0-1000 of the image.

Answer::

    <|object_ref_start|>a dog<|object_ref_end|><|box_start|>(221,423),(569,886)<|box_end|>

i.e. ``(x1,y1),(x2,y2)`` with ``x = v * W / 1000``. Qwen-VL-Chat's
``<ref>Woman</ref><box>(451,379),(731,806)</box>`` uses the same numbers and is accepted too.
Several boxes after one ref all get its label.

Source: QwenLM/Qwen-VL README (grounding); Qwen2-VL tokenizer special tokens; ms-swift
``docs/source_en/Customization/Custom-dataset.md`` (grounding, ``norm1000``).
"""

from __future__ import annotations

import re

from grounding.boxes import Box
from grounding.families import _grammar as g
from grounding.families._base import Encoder, Family
from grounding.families._text import (
    NUM,
    Found,
    Raw,
    conclude,
    labelled_blocks,
    strip_special,
    to_float,
)

_REF = re.compile(r"(?:<\|object_ref_start\|>|<ref>)([^<]*)(?:<\|object_ref_end\|>|</ref>)")
_BOX = re.compile(
    rf"(?:<\|box_start\|>|<box>)?\s*\(\s*({NUM})\s*,\s*({NUM})\s*\)\s*,?\s*"
    rf"\(\s*({NUM})\s*,\s*({NUM})\s*\)\s*(?:<\|box_end\|>|</box>)?"
)
_OPEN_BOX = re.compile(r"<\|box_start\|>|<box>")


class Qwen2VL(Family):
    name = "qwen2_vl"
    coords = "norm1000"
    needs_resize = False
    chat = True
    architectures = ("Qwen2VLForConditionalGeneration",)

    def _prompt(self, text: str) -> str:
        return (
            f"Find <|object_ref_start|>{text}<|object_ref_end|> in the image "
            "and output its bounding box."
        )

    def _extract(self, text: str) -> Found:
        text = strip_special(text)
        pairs = labelled_blocks(text, _REF, _BOX)
        raws = [Raw(tuple(to_float(g) for g in m.groups()), label) for label, m in pairs]
        tail = text[pairs[-1][1].end() :] if pairs else text
        truncated = _OPEN_BOX.search(tail) is not None
        return conclude(raws, truncated, text, "no (x1,y1),(x2,y2) box in the model text")

    def _render(self, boxes: list[Box], encode: Encoder) -> str:
        parts = []
        for box in boxes:
            x1, y1, x2, y2 = encode(box)
            ref = (
                "" if box.label is None else (f"<|object_ref_start|>{box.label}<|object_ref_end|>")
            )
            parts.append(f"{ref}<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>")
        return "".join(parts)

    def _grammar(self) -> str:
        # Boxes, each after an optional ref; the empty answer says no such object.
        n = g.N1000
        ref = rf"(?:<\|object_ref_start\|>{g.label('<>')}<\|object_ref_end\|>)?"
        box = rf"{ref}<\|box_start\|>\({n},{n}\),\({n},{n}\)<\|box_end\|>"
        return rf"(?:{box}){{0,{g.MAX_BOXES}}}"


FAMILY = Qwen2VL()
