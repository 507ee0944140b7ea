"""Qwen3-VL: JSON boxes normalised to 0-1000 of the image.

Answer (a plain JSON list; the model may also wrap it in a ```json fence)::

    [{"bbox_2d": [139, 768, 315, 954], "label": "cat"}]

Coordinates: ``x = v * W / 1000`` (some Qwen docs say 0-999; the difference is under one
unit). Unlike Qwen2.5-VL they do not depend on the resize settings.

Source: QwenLM/Qwen3-VL cookbooks ``2d_grounding.ipynb``; the prompt is the one the tiny
test model is trained on.
"""

from __future__ import annotations

import json

from grounding.boxes import Box
from grounding.families import _grammar as g
from grounding.families._base import Encoder, Family, json_items
from grounding.families._text import Found, read_json_boxes


class Qwen3VL(Family):
    name = "qwen3_vl"
    coords = "norm1000"
    needs_resize = False
    chat = True
    architectures = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")

    def _prompt(self, text: str) -> str:
        return f"Locate {text} in the image and output its bbox coordinates in JSON format."

    def _extract(self, text: str) -> Found:
        return read_json_boxes(text)

    def _render(self, boxes: list[Box], encode: Encoder) -> str:
        return json.dumps(json_items(boxes, encode), ensure_ascii=False)

    def _grammar(self) -> str:
        # A plain JSON list as json.dumps writes it; "[]" says there is no such object.
        return rf"\[(?:{g.listed(g.json_item(g.N1000), ', ')})?\]"


FAMILY = Qwen3VL()
