"""Model families: how to ask each one for a box and how to read its answer.

Every family object has ``name``, ``coords``, ``needs_resize``, ``chat``, ``prompt(text)``,
``parse(text, image_size, resize=None) -> ParseResult`` and ``render(boxes, image_size,
resize=None)`` (see `Family`). Parsing is lenient with the model's text (never raises on it)
and strict with our arguments.

| family     | answer                                                              | numbers           |
|------------|---------------------------------------------------------------------|-------------------|
| qwen2_vl   | ``<|object_ref_start|>dog<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`` | 0-1000 |
| qwen2_5_vl | ``[{"bbox_2d": [x1, y1, x2, y2], "label": "dog"}]`` in a json fence  | resized pixels    |
| qwen3_vl   | ``[{"bbox_2d": [x1, y1, x2, y2], "label": "dog"}]``                  | 0-1000            |
| internvl2  | ``<ref>dog</ref><box>[[x1, y1, x2, y2]]</box>``                      | 0-1000            |
| florence2  | ``dog<loc_x1><loc_y1><loc_x2><loc_y2>``                              | bins 0-999        |
| paligemma  | ``<locY1><locX1><locY2><locX2> dog``                                 | 0-1023 of 1024    |
| generic    | ``[x1, y1, x2, y2]`` (any chat VLM; prompt template is a setting)    | a setting         |

Every family also has ``grammar``: the regular expression of a well-formed answer, which the
engines decode under by default (`EngineConfig.constrained`).

Adding a family: write ``grounding/families/<name>.py`` with a `Family` subclass and a
``FAMILY`` object, then add it to ``_ALL`` below.

>>> from grounding.families import get_family
>>> get_family("qwen3_vl").parse('[{"bbox_2d": [0, 0, 500, 500]}]', (640, 480)).boxes[0].x2
320.0
"""

from __future__ import annotations

from grounding.families import (
    florence2,
    generic,
    internvl2,
    paligemma,
    qwen2_5_vl,
    qwen2_vl,
    qwen3_vl,
)
from grounding.families._base import Coords, Family, ParseResult, Status

__all__ = [
    "ARCHITECTURES",
    "FAMILIES",
    "REQUIREMENTS",
    "Coords",
    "Family",
    "ParseResult",
    "Status",
    "family_for_architecture",
    "get_family",
]

_ALL: tuple[Family, ...] = (
    qwen2_vl.FAMILY,
    qwen2_5_vl.FAMILY,
    qwen3_vl.FAMILY,
    internvl2.FAMILY,
    florence2.FAMILY,
    paligemma.FAMILY,
    generic.FAMILY,
)

FAMILIES: dict[str, Family] = {family.name: family for family in _ALL}
"""Family name -> family object."""

REQUIREMENTS: dict[str, tuple[str, ...]] = {family.name: family.requires for family in _ALL}
"""What ``parse`` / ``render`` need besides the text, per family (like supervision's
``REQUIRED_ARGUMENTS``): ``image_size`` always, ``resize`` where boxes are resized pixels."""

ARCHITECTURES: dict[str, str] = {
    arch: family.name for family in _ALL for arch in family.architectures
}
"""HF ``config.architectures[0]`` -> family name."""


def get_family(name: str, template: str | None = None, coords: str | None = None) -> Family:
    """The family registered as ``name``; `ValueError` listing the known names otherwise.

    ``template`` and ``coords`` set the generic family's prompt template and coordinate
    convention (see `grounding.families.generic`); other families refuse them."""
    try:
        family = FAMILIES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}"
        ) from None
    if template is None and coords is None:
        return family
    if name != "generic":
        raise ValueError(f"a prompt template and coordinate convention are settings of the "
                         f"generic family only, not of {name!r} (use --family generic)")
    return generic.Generic(template, coords)  # type: ignore[arg-type]


def family_for_architecture(arch: str) -> str:
    """Family name for a HF ``architectures[0]`` such as ``Qwen2_5_VLForConditionalGeneration``."""
    try:
        return ARCHITECTURES[arch]
    except (KeyError, TypeError):
        raise ValueError(
            f"no grounding family for architecture {arch!r}; known: "
            f"{', '.join(sorted(ARCHITECTURES))}"
        ) from None
