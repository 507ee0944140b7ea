"""Each family's answer grammar: accepts its documented answers, refuses broken ones, and every
answer it accepts parses into boxes (or a clean "no such object"). Pure Python: the engines'
use of the grammar is tested in tests/grounding/test_engines.py."""

from __future__ import annotations

import random
import re

import pytest
from grammar_cases import BROKEN, DOCUMENTED
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grounding.boxes import Box
from grounding.families import FAMILIES, get_family
from grounding.families import _grammar as g
from grounding.families.generic import Generic
from grounding.resize import ResizeSpec

SIZE = (640, 480)
RESIZE = ResizeSpec(min_pixels=3136, max_pixels=1003520)
GENERICS = {f"generic-{c}": Generic(coords=c)
            for c in ("pixels", "resized_pixels", "norm1000", "norm1")}
ALL = {**FAMILIES, **GENERICS}

def _matches(family, text: str) -> bool:
    return re.fullmatch(family.grammar, text) is not None


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_documented_answers_are_accepted_and_parse(name):
    family = ALL[name]
    for text in DOCUMENTED[name]:
        assert _matches(family, text), (name, text)
        result = family.parse(text, SIZE, RESIZE)
        assert result.ok, (name, text, result.message)


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_answers_are_refused(name):
    family = ALL[name]
    for text in BROKEN[name]:
        assert not _matches(family, text), (name, text)


@pytest.mark.parametrize("name", sorted(ALL))
def test_rendered_answers_and_no_object_are_accepted(name):
    """What `render` writes (training targets) is inside the grammar; so is "no object"."""
    family = ALL[name]
    rng = random.Random(3)
    for _ in range(60):
        size = (rng.randint(16, 2000), rng.randint(16, 2000))
        boxes = []
        for _ in range(rng.randint(1, g.MAX_BOXES)):
            x1, y1 = rng.uniform(0, size[0] - 1), rng.uniform(0, size[1] - 1)
            boxes.append(Box(x1=x1, y1=y1, x2=rng.uniform(x1 + 0.5, size[0]),
                             y2=rng.uniform(y1 + 0.5, size[1]),
                             label=rng.choice([None, "red car", "the dog left of the cat"])))
        if name == "internvl2":  # one <ref> per run of equal labels: keep runs short
            boxes = boxes[:1]
        text = family.render(boxes, size, RESIZE)
        assert _matches(family, text), (name, text)
    empty = family.render([], SIZE, RESIZE)
    assert _matches(family, empty), (name, empty)
    assert family.parse(empty, SIZE, RESIZE).status == "empty", (name, empty)


@pytest.mark.parametrize("name", sorted(ALL))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_accepted_answer_parses(name, data):
    """Constrained decoding is only worth having if the parser reads everything the grammar
    lets through: any string of the grammar gives boxes or a clean "no such object"."""
    family = ALL[name]
    text = data.draw(st.from_regex(family.grammar, fullmatch=True))
    result = family.parse(text, SIZE, RESIZE)
    assert result.status in ("ok", "clipped", "empty"), (text, result.message)
    assert result.ok or result.status == "empty"
    assert result.dropped == 0, (text, result.message)


def test_zero_width_box_is_widened_not_dropped():
    """x1 == x2 is grammatical (a regex cannot compare numbers): the parser keeps a box one
    grid unit wide, inside the image, and says so."""
    fam = get_family("qwen3_vl")
    r = fam.parse('[{"bbox_2d": [500, 100, 500, 300]}]', (1000, 500))
    assert r.status == "ok" and r.widened == 1
    assert r.boxes[0].to_list() == [500.0, 50.0, 501.0, 150.0]
    edge = fam.parse('[{"bbox_2d": [1000, 100, 1000, 100]}]', (1000, 500)).boxes[0]
    assert edge.to_list() == [999.0, 50.0, 1000.0, 50.5]


def test_generic_settings_are_checked():
    with pytest.raises(ValueError, match=r"\{text\} exactly once"):
        Generic(template="no placeholder")
    with pytest.raises(ValueError, match="unknown coordinate convention"):
        Generic(coords="percent")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="generic family only"):
        get_family("qwen3_vl", template="Find {text}.")
    fam = get_family("generic", "Where is {text}? Reply [x1,y1,x2,y2] in pixels.", "pixels")
    assert fam.prompt("the cat") == "Where is the cat? Reply [x1,y1,x2,y2] in pixels."
    assert fam.parse("[10, 20, 30, 40]", (100, 100)).boxes[0].to_list() == [10, 20, 30, 40]
    assert fam.parse("[]", (100, 100)).status == "empty"


def test_engine_settings_refuse_a_bad_generic_setup():
    """Clear errors before any model loads: generic settings without the generic family, or a
    template without its placeholder."""
    from grounding.engines import EngineConfig

    with pytest.raises(ValueError, match="--family generic"):
        EngineConfig(prompt_template="Find {text}.")
    with pytest.raises(ValueError, match="--family generic"):
        EngineConfig(coords="pixels")
    with pytest.raises(ValueError, match=r"\{text\} exactly once"):
        EngineConfig(family="generic", prompt_template="Find it.")
    cfg = EngineConfig(family="generic", prompt_template="Find {text}.", coords="norm1")
    fam = cfg.resolve_family()
    assert (fam.name, fam.coords, fam.prompt("a cat")) == ("generic", "norm1", "Find a cat.")
