"""Each family's answer grammar: accepts its documented answers, refuses broken ones, and every
answer it accepts parses into boxes (or a clean "no such object"). Pure Python: the engines'
use of the grammar is tested in tests/grounding/test_engines.py."""

from __future__ import annotations

import random
import re

import pytest
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

# The answers each family's sources document (see the family modules' docstrings).
DOCUMENTED = {
    "qwen2_vl": ["<|object_ref_start|>a dog<|object_ref_end|><|box_start|>(221,423),(569,886)"
                 "<|box_end|>", "<|box_start|>(0,0),(1000,1000)<|box_end|>"],
    "qwen2_5_vl": ['```json\n[\n\t{"bbox_2d": [146, 137, 615, 415], "label": "bowl of carrots"},'
                   '\n\t{"bbox_2d": [0, 0, 504, 252], "label": "plate"}\n]\n```'],
    "qwen3_vl": ['[{"bbox_2d": [139, 768, 315, 954], "label": "cat"}]',
                 '[{"bbox_2d": [0, 0, 1000, 1000]}, {"bbox_2d": [1, 2, 3, 4], "label": "a b"}]'],
    "internvl2": ["<ref>dog</ref><box>[[221, 423, 569, 886]]</box>",
                  "<ref>cats</ref><box>[[1, 2, 3, 4], [5, 6, 7, 8]]</box>"],
    "florence2": ["dog<loc_221><loc_423><loc_569><loc_886>",
                  "a<loc_0><loc_0><loc_999><loc_999>b<loc_1><loc_2><loc_3><loc_4>"],
    "paligemma": ["<loc0423><loc0221><loc0886><loc0569> dog",
                  "<loc0000><loc0000><loc1023><loc1023> a ; <loc0001><loc0002><loc0003><loc0004>"],
    "generic-norm1000": ["[221, 423, 569, 886]", "[0, 0, 1000, 1000], [1, 2, 3, 4]"],
    "generic-pixels": ["[12, 40, 630, 479]"],
    "generic-resized_pixels": ["[12, 40, 630, 479]"],
    "generic-norm1": ["[0.1, 0.25, 0.5, 1]", "[0, 0.001, 0.999, 1.0]"],
}

# Broken answers: the garbled JSON, cut-off text, out-of-range numbers, prose, too many
# boxes, another family's format.
BROKEN = {
    "qwen3_vl": ['[{"bbox_2d": [2d": [ "d": "d"}]', '[{"bbox_2d": [1, 2, 3, 4]',
                 '[{"bbox_2d": [1, 2, 3, 1001]}]', '[{"bbox_2d": [1, 2, 3]}]',
                 '[{"bbox_2d": [01, 2, 3, 4]}]', "The cat is at the top left.",
                 '[{"bbox_2d": [1, 2, 3, 4], "label": "a\\"b"}]',
                 "[" + ", ".join(['{"bbox_2d": [1, 2, 3, 4]}'] * 9) + "]"],
    "qwen2_5_vl": ['[{"bbox_2d": [1, 2, 3, 4]}]', '```json\n[\n\t{"bbox_2d": [1, 2, 3, 4]}\n]'],
    "qwen2_vl": ["<|box_start|>(1,2),(3,4)", "<|box_start|>(1,2),(3,1001)<|box_end|>",
                 "<|box_start|>(1, 2), (3, 4)<|box_end|>"],
    "internvl2": ["<ref>dog</ref><box>[[1, 2, 3]]</box>", "<box>[[1, 2, 3, 4]]"],
    "florence2": ["dog<loc_1><loc_2><loc_3>", "dog<loc_1000><loc_2><loc_3><loc_4>"],
    "paligemma": ["<loc1024><loc0000><loc0001><loc0002>", "<loc1><loc2><loc3><loc4> dog"],
    "generic-norm1000": ["[1, 2, 3]", "[1, 2, 3, 1001]", "[1.5, 2, 3, 4]", "box: [1, 2, 3, 4]"],
    "generic-norm1": ["[0.1, 0.2, 0.3, 1.5]", "[0.1234, 0.2, 0.3, 0.4]"],
}


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
