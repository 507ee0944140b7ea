"""Labeling guidelines: the written rules every reviewer labels by, versioned.

A guideline is a Markdown file with a front matter naming it and its version::

    ---
    name: groundlabel-default
    version: "1"
    ---
    # How to label ...

groundlabel ships one (`DEFAULT`, ``grounding/guidelines/default.md``). It states the box
convention all our formats share: ``[x1, y1, x2, y2]`` (xyxy) in continuous pixels of the
original image as displayed (EXIF orientation applied), a pixel inside when its centre is
(``x1 <= i + 0.5 < x2``), so ``x2``/``y2`` are the far edges (the whole image is
``[0, 0, W, H]``); COCO ``bbox`` is ``[x1, y1, x2 - x1, y2 - y1]``; Label Studio's value is
percent of the original size. It also gives the defaults for occlusion, several matching
objects and "no such object".

``review push`` puts the guideline into the Label Studio project's instructions (shown before
and during labeling) and into every task's data (``guideline``); every decision pulled back
records it (the store's ``guideline`` column, ``NAME@VERSION``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT = Path(__file__).with_name("guidelines") / "default.md"

_FRONT = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.S)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# The line the instructions carry, so a project's guideline can be read back from it.
_MARK = re.compile(r"groundlabel guideline <code>([^<@]+)@([^<]+)</code>")


class GuidelineError(ValueError):
    """A guideline file that cannot be used (no front matter, no version ...)."""


@dataclass(frozen=True)
class Guideline:
    """A labeling guideline: its ``name``, ``version`` and Markdown ``body``."""

    name: str
    version: str
    body: str
    source: str

    @property
    def id(self) -> str:
        """``NAME@VERSION``: what each decision made under it records."""
        return f"{self.name}@{self.version}"

    def html(self) -> str:
        """The guideline as HTML for Label Studio's project instructions (``expert_instruction``,
        "Labeling instructions in HTML format"), headed by a line naming it and its version."""
        from markdown_it import MarkdownIt

        md = MarkdownIt("commonmark", {"html": False}).enable("table")
        head = (f"<p><small>groundlabel guideline <code>{self.name}@{self.version}</code>"
                "</small></p>\n")
        return head + md.render(self.body)


def load(path: str | Path | None = None) -> Guideline:
    """The guideline at ``path`` (a local Markdown file; default: the shipped `DEFAULT`)."""
    import yaml

    p = Path(path) if path is not None else DEFAULT
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise GuidelineError(f"cannot read the guideline {p}: {e}") from None
    m = _FRONT.match(text)
    if not m:
        raise GuidelineError(f"{p}: a guideline starts with a front matter naming its version:\n"
                             "---\nname: my-project\nversion: \"1\"\n---")
    try:
        meta = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError as e:
        raise GuidelineError(f"{p}: its front matter is not YAML: {e}") from None
    if not isinstance(meta, dict):
        raise GuidelineError(f"{p}: its front matter must be `key: value` lines")
    name, version = meta.get("name"), meta.get("version")
    if version is None or not str(version).strip():
        raise GuidelineError(f"{p}: the front matter has no `version:` (every decision records "
                             "the version it was made under)")
    if not isinstance(name, str) or not _NAME.match(name):
        raise GuidelineError(f"{p}: the front matter needs `name:` (letters, digits, . _ -; "
                             f"up to 64), got {name!r}")
    version = str(version).strip()
    if "@" in version or "<" in version or len(version) > 64:
        raise GuidelineError(f"{p}: version {version!r} must be up to 64 characters without "
                             "'@' or '<'")
    body = text[m.end():]
    if not body.strip():
        raise GuidelineError(f"{p}: the guideline has no text after its front matter")
    return Guideline(name=name, version=version, body=body, source=str(p))


def from_instructions(html: str | None) -> str | None:
    """The ``NAME@VERSION`` of the groundlabel guideline in a project's instructions, or None."""
    m = _MARK.search(html or "")
    return f"{m.group(1)}@{m.group(2)}" if m else None
