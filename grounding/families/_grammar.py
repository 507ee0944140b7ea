"""Building blocks of the answer grammars: regular expressions of a well-formed answer.

Each family's ``grammar`` (see `Family.grammar`) is a regular expression of every answer it
accepts as well formed: its boxes in its own coordinate convention, up to `MAX_BOXES` of them,
an optional label, and its way of saying "no such object". The engines decode under it
(vLLM's structured outputs; xgrammar in the transformers engine), so a constrained answer
always parses. The subset of regex syntax used here (literals, classes, ``(?:...)``, ``?``,
``{m,n}``, ``|``) means the same to Python's ``re``, xgrammar and vLLM's other backends.

Numbers are integers without leading zeros (``0-1000`` ...), except PaliGemma's zero-padded
four-digit ``<locNNNN>`` and the 0-1 convention's decimals. A regular grammar cannot say
``x2 > x1``; the parser widens a zero-width box to one unit of its grid instead (see
`grounding.families._base`).
"""

from __future__ import annotations

import re

MAX_BOXES = 8
"""Boxes one answer may hold: enough for "all the dogs", short of a box repeated until the
token limit cuts the answer."""

MAX_LABEL = 48
"""Characters of a label: the referring expression or a short name. Bounded so a label
cannot run the answer into the token limit before it closes."""

N1000 = r"(?:1000|[1-9][0-9]{0,2}|0)"
"""An integer 0-1000 (``norm1000``)."""

N999 = r"(?:[1-9][0-9]{0,2}|0)"
"""An integer 0-999 (Florence-2's bins)."""

LOC1024 = r"(?:0[0-9]{3}|10[01][0-9]|102[0-3])"
"""A zero-padded four-digit integer 0000-1023 (PaliGemma's ``<locNNNN>``)."""

PIXELS = r"(?:[1-9][0-9]{0,4}|0)"
"""An integer pixel coordinate 0-99999 (larger than any image the resize settings allow)."""

UNIT = r"(?:0(?:\.[0-9]{1,3})?|1(?:\.0{1,3})?)"
"""A number 0-1 with at most three decimals (``norm1``)."""


def label(exclude: str) -> str:
    """A label of 1-`MAX_LABEL` characters, none of them a newline, a bracket or brace, or in
    ``exclude`` (the characters that would end the label's field; given unescaped). Brackets
    are kept out so a label never looks like structure to the lenient parser."""
    chars = "".join("\\" + c if c in "\\]^-[" else c for c in "{}[]" + exclude)
    return rf"[^\n{chars}]{{1,{MAX_LABEL}}}"


def listed(item: str, sep: str) -> str:
    """1 to `MAX_BOXES` of ``item`` separated by ``sep`` (both regexes)."""
    return rf"{item}(?:{sep}{item}){{0,{MAX_BOXES - 1}}}"


def quad(number: str, sep: str = ", ") -> str:
    """``[a, b, c, d]``: four ``number`` s in brackets."""
    return rf"\[{number}{sep}{number}{sep}{number}{sep}{number}\]"


def json_item(number: str) -> str:
    """``{"bbox_2d": [x1, y1, x2, y2], "label": "..."}`` as ``json.dumps`` writes it, the label
    optional (the Qwen JSON answer style)."""
    return rf'\{{"bbox_2d": {quad(number)}(?:, "label": "{label(chr(34) + chr(92))}")?\}}'


def as_lark(regex: str) -> str:
    """The answer grammar ``regex`` as a Lark grammar of one regular terminal: what the
    engines send. vLLM 0.33 compiles regex requests against a vocabulary without special
    tokens, so Qwen2-VL's ``<|box_start|>`` could not be produced; Lark grammars are compiled
    against the full vocabulary (there and in 0.32), and xgrammar reads the terminal as the
    same regular language (tests/grounding/test_grammar_reach.py)."""
    return "start: /" + re.sub(r"(?<!\\)/", r"\/", regex) + "/"
