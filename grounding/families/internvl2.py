"""InternVL2 / InternVL2.5 / InternVL3: ``<ref>``/``<box>`` tags, 0-1000 of the image.

Answer::

    <ref>the lady with the blue shirt</ref><box>[[243, 469, 558, 746]]</box>

``[[x1, y1, x2, y2], ...]`` (several boxes possible in one ``<box>``), ``x = v * W / 1000``.
Bare ``[[...]]`` lists without tags are accepted too.

Source: OpenGVLab InternVL docs "Grounding" / fine-tuning data format (``<ref>``, ``<box>``,
coordinates normalised to [0, 1000]).
"""

from __future__ import annotations

import re
from itertools import groupby

from grounding.boxes import Box
from grounding.families import _grammar as g
from grounding.families._base import Encoder, Family
from grounding.families._text import (
    QUAD,
    Found,
    Raw,
    conclude,
    labelled_blocks,
    strip_special,
    to_float,
)

_REF = re.compile(r"<ref>([^<]*)</ref>")
_BLOCK = re.compile(r"<box>([^<]*)(</box>)?")


class InternVL2(Family):
    name = "internvl2"
    coords = "norm1000"
    needs_resize = False
    chat = True
    architectures = ("InternVLChatModel", "InternVLForConditionalGeneration")

    def _prompt(self, text: str) -> str:
        return (
            "Please provide the bounding box coordinate of the region this sentence "
            f"describes: <ref>{text}</ref>"
        )

    def _extract(self, text: str) -> Found:
        text = strip_special(text).rstrip()
        truncated = False
        raws: list[Raw] = []
        blocks = labelled_blocks(text, _REF, _BLOCK)
        if blocks:
            for label, m in blocks:
                for quad in QUAD.finditer(m.group(1)):
                    raws.append(Raw(tuple(to_float(g) for g in quad.groups()), label))
                if m.group(2) is None and m.end() == len(text):
                    truncated = True
        else:  # no <box> tags: bare [x1, y1, x2, y2] lists
            for label, quad in labelled_blocks(text, _REF, QUAD):
                raws.append(Raw(tuple(to_float(g) for g in quad.groups()), label))
        return conclude(raws, truncated, text, "no [[x1, y1, x2, y2]] box in the model text")

    def _render(self, boxes: list[Box], encode: Encoder) -> str:
        parts = []
        for label, group in groupby(boxes, key=lambda b: b.label):
            quads = ", ".join("[{}, {}, {}, {}]".format(*encode(b)) for b in group)
            ref = "" if label is None else f"<ref>{label}</ref>"
            parts.append(f"{ref}<box>[{quads}]</box>")
        return "".join(parts)

    def _grammar(self) -> str:
        # One <box> of 1+ quads per ref; the empty answer says no such object.
        block = rf"(?:<ref>{g.label('<>')}</ref>)?<box>\[{g.listed(g.quad(g.N1000), ', ')}\]</box>"
        return rf"(?:{block}){{0,{g.MAX_BOXES}}}"


FAMILY = InternVL2()
