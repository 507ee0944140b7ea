"""Florence-2: phrase grounding with ``<loc_N>`` bin tokens.

Task prompt ``<CAPTION_TO_PHRASE_GROUNDING>`` + the phrase; answer::

    a green car<loc_52><loc_332><loc_932><loc_774>

Each phrase is followed by one or more groups of four tokens ``x1, y1, x2, y2``, each a bin
0-999 over the image. Decoding takes the bin centre, ``x = (b + 0.5) * W / 1000``; encoding
floors ``x / W * 1000`` into 0-999 (``BoxQuantizer(mode="floor", bins=(1000, 1000))``).

Source: transformers ``models/florence2/processing_florence2.py`` (``BoxQuantizer``,
``post_process_generation``).
"""

from __future__ import annotations

import re

from grounding.boxes import Box
from grounding.families import _grammar as g
from grounding.families._base import Encoder, Family
from grounding.families._text import Found, Raw, clean_label, conclude, loc_groups, strip_special

_LOC = re.compile(r"<loc_(\d+)>")
_PARTIAL = re.compile(r"<loc_\d*>?\s*$")


class Florence2(Family):
    name = "florence2"
    coords = "bins1000"
    needs_resize = False
    chat = False
    architectures = ("Florence2ForConditionalGeneration",)

    def _prompt(self, text: str) -> str:
        return "<CAPTION_TO_PHRASE_GROUNDING>" + text

    def _extract(self, text: str) -> Found:
        text = strip_special(text)
        groups, truncated = loc_groups(text, _LOC, _PARTIAL)
        raws: list[Raw] = []
        prev_end = 0
        for run, quads in groups:
            label = clean_label(text[prev_end : run.start])
            raws += [Raw(q, label) for q in quads]
            prev_end = run.end
        return conclude(raws, truncated, text, "no <loc_N> box in the model text")

    def _render(self, boxes: list[Box], encode: Encoder) -> str:
        return "".join(
            (box.label or "") + "".join(f"<loc_{v}>" for v in encode(box)) for box in boxes
        )

    def _grammar(self) -> str:
        # label<loc_x1><loc_y1><loc_x2><loc_y2>, repeated; the empty answer says no object.
        box = rf"(?:{g.label('<>')})?" + "".join(rf"<loc_{g.N999}>" for _ in range(4))
        return rf"(?:{box}){{0,{g.MAX_BOXES}}}"


FAMILY = Florence2()
