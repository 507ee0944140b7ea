"""PaliGemma: ``detect`` answers with ``<locNNNN>`` tokens in y, x order over 1024 steps.

Prompt ``detect a cat\n`` (several classes: ``detect cat ; dog\n``); answer::

    <loc0001><loc0123><loc0530><loc1012> stop sign ; <loc0200><loc0010><loc0400><loc0300> car

Each box is four tokens ``y1, x1, y2, x2`` then its label; boxes are separated by `` ; ``.
Decoding: ``x = v / 1024 * W``; encoding rounds ``x / W * 1024`` and clamps to 0-1023.

Source: google-research/big_vision PaliGemma (``<locNNNN>`` tokens); roboflow/supervision
``from_paligemma``.
"""

from __future__ import annotations

import re

from grounding.boxes import Box
from grounding.families import _grammar as g
from grounding.families._base import Encoder, Family
from grounding.families._text import Found, Raw, clean_label, conclude, loc_groups, strip_special

_LOC = re.compile(r"<loc(\d+)>")
_SEG = re.compile(r"<seg\d+>")  # segmentation tokens after the box (``segment`` prompts)
_PARTIAL = re.compile(r"<loc\d*>?\s*$")


class PaliGemma(Family):
    name = "paligemma"
    coords = "loc1024"
    needs_resize = False
    chat = False
    architectures = ("PaliGemmaForConditionalGeneration",)

    def _prompt(self, text: str) -> str:
        return f"detect {text}\n"

    def _extract(self, text: str) -> Found:
        text = strip_special(text)
        groups, truncated = loc_groups(text, _LOC, _PARTIAL)
        raws: list[Raw] = []
        for i, (run, quads) in enumerate(groups):
            stop = groups[i + 1][0].start if i + 1 < len(groups) else len(text)
            label = clean_label(_SEG.sub("", text[run.end : stop].split(";")[0]))
            # y1, x1, y2, x2 -> x1, y1, x2, y2
            raws += [Raw((q[1], q[0], q[3], q[2]), label) for q in quads]
        return conclude(raws, truncated, text, "no <locNNNN> box in the model text")

    def _render(self, boxes: list[Box], encode: Encoder) -> str:
        parts = []
        for box in boxes:
            x1, y1, x2, y2 = encode(box)
            locs = "".join(f"<loc{v:04d}>" for v in (y1, x1, y2, x2))
            parts.append(locs if box.label is None else f"{locs} {box.label}")
        return " ; ".join(parts)

    def _grammar(self) -> str:
        # <locY1><locX1><locY2><locX2> label, joined by " ; "; the empty answer: no object.
        box = "".join(rf"<loc{g.LOC1024}>" for _ in range(4)) + rf"(?: {g.label('<>;')})?"
        return rf"(?:{g.listed(box, ' ; ')})?"


FAMILY = PaliGemma()
