"""Lenient helpers for reading boxes out of model text, shared by the family modules.

Nothing here raises on odd text: each helper returns what it could find. Every regular
expression is linear in the text length (no ``.*`` spanning unbounded text before a literal),
because model output can be 100k characters of garbage.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
"""A decimal number as models write it (ints mostly; floats and exponents tolerated)."""

QUAD = re.compile(
    rf"\[\s*({NUM})\s*,\s*({NUM})\s*,\s*({NUM})\s*,\s*({NUM})\s*\]",
)
"""``[a, b, c, d]`` with four numbers."""

# Tokens some engines leave in the decoded text (skip_special_tokens=False).
_SPECIAL = (
    "</s>",
    "<s>",
    "<pad>",
    "<eos>",
    "<bos>",
    "<|im_end|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "<|im_start|>",
)
_MAX_JSON_STARTS = 64  # candidate '[' / '{' positions tried by `decode_json`
_MAX_DEPTH = 32  # nesting walked by `json_boxes`
_JSON_START = re.compile(r"[\[{]")
BOX_KEYS = ("bbox_2d", "bbox", "box", "bbox2d", "box_2d")
LABEL_KEYS = ("label", "name")


@dataclass(frozen=True)
class Raw:
    """Four numbers as the model wrote them (the family's order and units) and a label."""

    values: tuple[float, float, float, float]
    label: str | None = None


@dataclass
class Found:
    """What a family's extractor read from the text, before conversion to pixels."""

    raws: list[Raw] = field(default_factory=list)
    truncated: bool = False  # the text stops inside a box or a JSON value
    empty: bool = False  # the model said there is nothing (empty text, `[]`, `null`)
    note: str = ""


def as_text(text: Any) -> str:
    """Model text as ``str``: None -> "", bytes decoded leniently, anything else via ``str``."""
    if text is None:
        return ""
    if isinstance(text, bytes | bytearray):
        return bytes(text).decode("utf-8", errors="replace")
    if isinstance(text, str):
        return text
    return str(text)


def strip_special(text: str) -> str:
    """Remove end-of-sequence / padding tokens an engine may leave in decoded text."""
    for token in _SPECIAL:
        if token in text:
            text = text.replace(token, "")
    return text


def to_float(token: str) -> float:
    """``float(token)``; NaN when it is not a number (huge digit strings become inf)."""
    try:
        return float(token)
    except (ValueError, OverflowError):
        return math.nan


def numbers4(value: Any) -> tuple[float, float, float, float] | None:
    """Four numbers from a JSON value ``[a, b, c, d]`` (numeric strings allowed), else None."""
    if not isinstance(value, list) or len(value) != 4:
        return None
    out = []
    for v in value:
        if isinstance(v, bool):
            return None
        if isinstance(v, int | float):
            out.append(float(v))
        elif isinstance(v, str) and re.fullmatch(rf"\s*{NUM}\s*", v):
            out.append(to_float(v))
        else:
            return None
    return (out[0], out[1], out[2], out[3])


def clean_label(value: Any) -> str | None:
    """A label as a stripped string, or None when absent or blank."""
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    text = text.strip()
    return text or None


def strip_fences(text: str) -> str:
    """The inside of the first Markdown code fence (```json ... ```), else the text itself.

    A fence that never closes (output cut off) yields everything after its opening.
    """
    start = text.find("```")
    if start < 0:
        return text
    line_end = text.find("\n", start + 3)
    # The info string ("json") runs to the end of the line; a one-line fence has none.
    head_end = start + 3
    if line_end >= 0 and re.fullmatch(r"[\w.+-]*\s*", text[start + 3 : line_end]):
        head_end = line_end + 1
    elif text[head_end : head_end + 4].lower() == "json":
        head_end += 4
    stop = text.find("```", head_end)
    if stop < 0:
        return text[head_end:]
    return text[head_end:stop]


def decode_json(body: str) -> tuple[list[Any], int | None, bool]:
    """Every JSON value ('[' or '{' opened) found left to right in ``body``.

    Returns ``(values, cut, failed)``: ``cut`` is the offset of a value that runs off the end
    of the text (truncated output), else None; ``failed`` says some '[' / '{' opened something
    that is not JSON (prose in brackets, single quotes...). Prose around the JSON is skipped.
    """
    decoder = json.JSONDecoder()
    values: list[Any] = []
    failed = False
    end_of_text = len(body.rstrip())
    pos = 0
    for _ in range(_MAX_JSON_STARTS):
        m = _JSON_START.search(body, pos)
        if m is None:
            break
        try:
            value, pos = decoder.raw_decode(body, m.start())
        except json.JSONDecodeError as exc:
            if exc.pos >= end_of_text or exc.msg.startswith("Unterminated string"):
                return values, m.start(), failed
            failed = True
            pos = m.start() + 1
            continue
        except (RecursionError, ValueError, OverflowError):
            failed = True
            pos = m.start() + 1
            continue
        values.append(value)
    return values, None, failed


def json_boxes(value: Any, label: str | None = None, depth: int = 0) -> Iterator[Raw]:
    """Boxes in a decoded JSON value: ``{"bbox_2d"|"bbox": [4 numbers], "label": ...}``
    objects, bare ``[4 numbers]`` lists, and lists / objects holding either."""
    if depth > _MAX_DEPTH:
        return
    if isinstance(value, dict):
        keys = {k.lower(): k for k in value if isinstance(k, str)}
        own = next((value[keys[k]] for k in LABEL_KEYS if k in keys), None)
        own_label = clean_label(own) if own is not None else label
        box_key = next((keys[k] for k in BOX_KEYS if k in keys), None)
        if box_key is not None:
            yield from json_boxes(value[box_key], own_label, depth + 1)
            return
        for v in value.values():
            if isinstance(v, dict | list):
                yield from json_boxes(v, own_label, depth + 1)
    elif isinstance(value, list):
        quad = numbers4(value)
        if quad is not None:
            yield Raw(quad, label)
            return
        for v in value:
            yield from json_boxes(v, label, depth + 1)


_OBJECT = re.compile(r"\{[^{}]*\}")
_LOOSE_BOX = re.compile(
    rf"""["']?(?:{"|".join(BOX_KEYS)})["']?\s*:\s*\[\s*({NUM})\s*,\s*({NUM})\s*,"""
    rf"""\s*({NUM})\s*,\s*({NUM})\s*\]""",
    re.IGNORECASE,
)
_LOOSE_LABEL = re.compile(r"""["']?label["']?\s*:\s*(?:"([^"]*)"|'([^']*)')""", re.IGNORECASE)


def object_fragments(text: str) -> list[Raw]:
    """Boxes from every complete ``{...}`` object (no nested braces) in ``text``.

    Used after a cut or on not-quite-JSON (single quotes, trailing commas): each object is
    tried as JSON, then read with loose ``bbox_2d: [...]`` / ``label: "..."`` patterns.
    """
    raws: list[Raw] = []
    for m in _OBJECT.finditer(text):
        chunk = m.group(0)
        try:
            raws.extend(json_boxes(json.loads(chunk)))
            continue
        except (ValueError, RecursionError):
            pass
        box = _LOOSE_BOX.search(chunk)
        if box is None:
            continue
        lab = _LOOSE_LABEL.search(chunk)
        label = clean_label(
            (lab.group(1) if lab.group(1) is not None else lab.group(2)) if lab else None
        )
        raws.append(Raw(tuple(to_float(g) for g in box.groups()), label))  # type: ignore[arg-type]
    return raws


def open_object_box(text: str) -> list[Raw]:
    """The box of an object cut off after its coordinates (``{"bbox_2d": [1, 2, 3, 4], "lab``):
    the four numbers are complete, only the label was lost to the token limit."""
    start = text.rfind("{")
    if start < 0 or "}" in text[start:]:
        return []
    box = _LOOSE_BOX.search(text, start)
    return [Raw(tuple(to_float(g) for g in box.groups()))] if box else []  # type: ignore[misc]


def is_nothing(value: Any) -> bool:
    """True for JSON that says "no objects": ``[]``, ``{}``, ``null``, or lists of those."""
    if value is None:
        return True
    if isinstance(value, list | dict):
        items = value.values() if isinstance(value, dict) else value
        return all(is_nothing(v) for v in items)
    return False


def read_json_boxes(text: str) -> Found:
    """The JSON answer style of Qwen2.5-VL / Qwen3-VL: a list of ``{"bbox_2d": ...}`` objects,
    a single object, fenced or not, with prose around, possibly cut off."""
    body = strip_fences(strip_special(text))
    values, cut, failed = decode_json(body)
    raws = [raw for value in values for raw in json_boxes(value)]
    truncated = cut is not None
    if truncated:
        raws.extend(object_fragments(body[cut:]))
        raws.extend(open_object_box(body[cut:]))
    if failed or not raws:
        # Not-quite-JSON (single quotes, trailing commas): a failed outer value may have let a
        # bare inner [x1, y1, x2, y2] decode without its label, so read whole objects instead.
        raws = object_fragments(body) or raws
    if raws:
        return Found(raws, truncated=truncated)
    if truncated:
        return Found(truncated=True, note="output was cut off before the first complete box")
    nothing = body.strip().lower() in ("", "null", "none")
    if nothing or (values and all(is_nothing(v) for v in values)):
        return Found(empty=True, note="the model answered with no box")
    return Found(note="no box-like JSON in the model text")


def conclude(
    raws: list[Raw], truncated: bool, text: str, missing: str = "no box in the model text"
) -> Found:
    """The usual ending of a token/tag family's extractor: the boxes read (and whether the text
    was cut off), else an empty answer when the text is blank, else ``missing`` as the note."""
    if raws or truncated:
        return Found(
            raws,
            truncated=truncated,
            note="" if raws else "output was cut off before the first box",
        )
    if not text.strip():
        return Found(empty=True, note="the model answered with no box")
    return Found(note=missing)


def has_alnum(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def labelled_blocks(
    text: str, ref: re.Pattern[str], block: re.Pattern[str]
) -> list[tuple[str | None, re.Match[str]]]:
    """Pair each ``block`` match (one or more boxes) with the ``ref`` label before it.

    A ref (group 1 = its text) labels the blocks that follow it as long as only whitespace,
    punctuation or other blocks come between; any other word in between ends it.
    """
    events = [(m.start(), 0, m) for m in ref.finditer(text)]
    events += [(m.start(), 1, m) for m in block.finditer(text)]
    events.sort(key=lambda e: (e[0], e[1]))
    out: list[tuple[str | None, re.Match[str]]] = []
    label: str | None = None
    last_end = 0
    for start, kind, m in events:
        if start < last_end:
            continue  # overlapping match, already consumed
        if has_alnum(text[last_end:start]):
            label = None
        if kind == 0:
            label = clean_label(m.group(1))
        else:
            out.append((label, m))
        last_end = m.end()
    return out


@dataclass
class Run:
    """Consecutive location tokens (``<loc_12><loc_34>...``) and where they sit in the text."""

    start: int
    end: int
    values: list[float]


def token_runs(text: str, token: re.Pattern[str]) -> list[Run]:
    """Group matches of ``token`` (group 1 = number) that touch (whitespace allowed) into runs."""
    runs: list[Run] = []
    for m in token.finditer(text):
        value = to_float(m.group(1))
        if runs and not text[runs[-1].end : m.start()].strip():
            runs[-1].end = m.end()
            runs[-1].values.append(value)
        else:
            runs.append(Run(m.start(), m.end(), [value]))
    return runs


def chunks4(values: list[float]) -> tuple[list[tuple[float, float, float, float]], int]:
    """Split into groups of four; also return how many values were left over."""
    n = len(values) // 4 * 4
    quads = [(values[i], values[i + 1], values[i + 2], values[i + 3]) for i in range(0, n, 4)]
    return quads, len(values) - n


def loc_groups(
    text: str, token: re.Pattern[str], partial: re.Pattern[str]
) -> tuple[list[tuple[Run, list[tuple[float, float, float, float]]]], bool]:
    """Runs of location tokens (see `token_runs`), each with its values in groups of four, and
    whether the text is cut off: ``partial`` (a half-written token at the end) matches without
    a closing ``>``, or the last run stops inside a group of four."""
    truncated = partial.search(text) is not None and not text.rstrip().endswith(">")
    groups = []
    for run in token_runs(text, token):
        quads, left = chunks4(run.values)
        if left and not text[run.end :].strip():
            truncated = True  # cut inside the last group of four
        groups.append((run, quads))
    return groups, truncated
