"""Qwen2.5-VL: JSON boxes in absolute pixels of the RESIZED model input.

Answer (usually inside a ```json fence, a list even for one object)::

    [{"bbox_2d": [146, 137, 615, 415], "label": "bowl of carrots"}]

Coordinates are pixels of the image after `grounding.resize.smart_resize` (sides multiples of
28, pixel count within the processor's ``min_pixels``/``max_pixels``), so parsing needs the same
`ResizeSpec`: ``x_orig = x_res * W / W_res``.

Source: QwenLM/Qwen2.5-VL cookbooks ``spatial_understanding.ipynb`` and
``qwen-vl-finetune/tools/process_bbox.ipynb``; roboflow/supervision ``from_qwen_2_5_vl``.
"""

from __future__ import annotations

import json

from grounding.boxes import Box
from grounding.families import _grammar as g
from grounding.families._base import Encoder, Family, json_items
from grounding.families._text import Found, read_json_boxes


class Qwen25VL(Family):
    name = "qwen2_5_vl"
    coords = "resized_pixels"
    needs_resize = True
    chat = True
    architectures = ("Qwen2_5_VLForConditionalGeneration",)

    def _prompt(self, text: str) -> str:
        return f"Locate {text}, output its bbox coordinates using JSON format."

    def _extract(self, text: str) -> Found:
        return read_json_boxes(text)

    def _render(self, boxes: list[Box], encode: Encoder) -> str:
        # The cookbook answers: a ```json fence, one tab-indented object per line.
        items = json_items(boxes, encode)
        lines = ["\t" + json.dumps(item, ensure_ascii=False) for item in items]
        return "```json\n[\n" + ",\n".join(lines) + "\n]\n```"

    def _grammar(self) -> str:
        # The cookbook's fence as `_render` writes it; an empty list says no such object.
        items = g.listed("\t" + g.json_item(g.PIXELS), ",\n")
        return rf"```json\n\[\n(?:{items})?\n\]\n```"


FAMILY = Qwen25VL()
