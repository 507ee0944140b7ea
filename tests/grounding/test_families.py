import random

import pytest

from grounding.boxes import Box
from grounding.families import (
    FAMILIES,
    REQUIREMENTS,
    ParseResult,
    family_for_architecture,
    get_family,
)
from grounding.resize import ResizeSpec

SIZE = (1000, 500)  # (width, height) of the original image in the table below
RESIZE = ResizeSpec(min_pixels=3136, max_pixels=12845056)  # 1000x500 -> 1008x504
RW, RH = RESIZE.resized_size(SIZE)
assert (RW, RH) == (1008, 504)


def q25(x1, y1, x2, y2):
    """Qwen2.5-VL resized pixels -> original pixels for SIZE."""
    return (x1 * 1000 / RW, y1 * 500 / RH, x2 * 1000 / RW, y2 * 500 / RH)


def n1000(x1, y1, x2, y2):
    """0-1000 -> original pixels for SIZE."""
    return (x1 * 1000 / 1000, y1 * 500 / 1000, x2 * 1000 / 1000, y2 * 500 / 1000)


def bins(x1, y1, x2, y2):
    """Florence-2 bin centres -> original pixels for SIZE."""
    return n1000(x1 + 0.5, y1 + 0.5, x2 + 0.5, y2 + 0.5)


def loc(y1, x1, y2, x2):
    """PaliGemma y, x order over 1024 -> original pixels for SIZE."""
    return (x1 / 1024 * 1000, y1 / 1024 * 500, x2 / 1024 * 1000, y2 / 1024 * 500)


QWEN25_DOC = '{"bbox_2d": [146, 137, 615, 415], "label": "bowl of carrots"}'
QWEN25_FENCED = (
    "```json\n[\n"
    '\t{"bbox_2d": [146, 137, 615, 415], "label": "bowl of carrots"},\n'
    '\t{"bbox_2d": [0, 0, 504, 252], "label": "plate"}\n'
    "]\n```"
)

# (family, model text, expected [(x1, y1, x2, y2, label)], status, (clipped, fixed, dropped))
CASES = [
    # --- qwen2_vl -----------------------------------------------------------------------------
    # the documented answer
    (
        "qwen2_vl",
        "<|object_ref_start|>a dog<|object_ref_end|><|box_start|>(221,423),(569,886)<|box_end|>",
        [(*n1000(221, 423, 569, 886), "a dog")],
        "ok",
        (0, 0, 0),
    ),
    # Qwen-VL-Chat's <ref>/<box> tags, same numbers
    (
        "qwen2_vl",
        "<ref>Woman</ref><box>(451,379),(731,806)</box>",
        [(*n1000(451, 379, 731, 806), "Woman")],
        "ok",
        (0, 0, 0),
    ),
    # two boxes after one ref, spaces in the numbers, prose around and an end token
    (
        "qwen2_vl",
        "Sure. <|object_ref_start|>dogs<|object_ref_end|><|box_start|>(0, 0), (100, 100)"
        "<|box_end|><|box_start|>(200,200),(300,300)<|box_end|> are the dogs.<|im_end|>",
        [(*n1000(0, 0, 100, 100), "dogs"), (*n1000(200, 200, 300, 300), "dogs")],
        "ok",
        (0, 0, 0),
    ),
    # cut off inside the second box
    (
        "qwen2_vl",
        "<|object_ref_start|>a<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>"
        "<|object_ref_start|>b<|object_ref_end|><|box_start|>(10,",
        [(*n1000(1, 2, 3, 4), "a")],
        "truncated",
        (0, 0, 0),
    ),
    # corners swapped by the model
    (
        "qwen2_vl",
        "<|box_start|>(569,886),(221,423)<|box_end|>",
        [(*n1000(221, 423, 569, 886), None)],
        "ok",
        (0, 1, 0),
    ),
    # beyond the 0-1000 range: clipped to the image
    (
        "qwen2_vl",
        "<|box_start|>(900,900),(1200,1100)<|box_end|>",
        [(900, 450, 1000, 500, None)],
        "clipped",
        (1, 0, 0),
    ),
    # entirely outside the image: clipped to the corner and widened to one grid unit (flagged
    # clipped; its score still ranks it for review)
    (
        "qwen2_vl",
        "<|box_start|>(1100,1100),(1200,1200)<|box_end|>",
        [(999, 499.5, 1000, 500, None)],
        "clipped",
        (1, 0, 0),
    ),
    # prose only
    ("qwen2_vl", "I cannot find a dog in this image.", [], "unparseable", (0, 0, 0)),
    # nothing at all
    ("qwen2_vl", "", [], "empty", (0, 0, 0)),
    # --- qwen2_5_vl ---------------------------------------------------------------------------
    # the documented single object, no fence
    ("qwen2_5_vl", QWEN25_DOC, [(*q25(146, 137, 615, 415), "bowl of carrots")], "ok", (0, 0, 0)),
    # the cookbook's fenced, tab-indented list with two boxes
    (
        "qwen2_5_vl",
        QWEN25_FENCED,
        [(*q25(146, 137, 615, 415), "bowl of carrots"), (0, 0, 1000 * 504 / RW, 250, "plate")],
        "ok",
        (0, 0, 0),
    ),
    # fence cut off inside the second object: the first survives
    (
        "qwen2_5_vl",
        QWEN25_FENCED[:90],
        [(*q25(146, 137, 615, 415), "bowl of carrots")],
        "truncated",
        (0, 0, 0),
    ),
    # cut off inside a label string
    # (the second box's four numbers are complete: it is kept, without its lost label)
    (
        "qwen2_5_vl",
        '[{"bbox_2d": [0, 0, 504, 252], "label": "a"}, {"bbox_2d": [1, 2, 3, 4], "label": "ca',
        [(0, 0, 1000 * 504 / RW, 250, "a"), (*q25(1, 2, 3, 4), None)],
        "truncated",
        (0, 0, 0),
    ),
    # cut off before the first complete box
    ("qwen2_5_vl", '```json\n[{"bbox_2d": [146, 13', [], "unparseable", (0, 0, 0)),
    # "bbox" key instead of "bbox_2d", no label
    (
        "qwen2_5_vl",
        '[{"bbox": [0, 0, 504, 252]}]',
        [(0, 0, 1000 * 504 / RW, 250, None)],
        "ok",
        (0, 0, 0),
    ),
    # prose before and after the JSON
    (
        "qwen2_5_vl",
        "Here you go: " + QWEN25_DOC + " Hope this helps!",
        [(*q25(146, 137, 615, 415), "bowl of carrots")],
        "ok",
        (0, 0, 0),
    ),
    # Python-style single quotes (not JSON)
    (
        "qwen2_5_vl",
        "[{'bbox_2d': [0, 0, 504, 252], 'label': 'x'}]",
        [(0, 0, 1000 * 504 / RW, 250, "x")],
        "ok",
        (0, 0, 0),
    ),
    # out of range on both sides
    (
        "qwen2_5_vl",
        '[{"bbox_2d": [-20, 0, 2000, 504]}]',
        [(0, 0, 1000, 500, None)],
        "clipped",
        (1, 0, 0),
    ),
    # empty list in a fence: the model found nothing
    ("qwen2_5_vl", "```json\n[]\n```", [], "empty", (0, 0, 0)),
    # --- qwen3_vl -----------------------------------------------------------------------------
    # the documented answer
    (
        "qwen3_vl",
        '[{"bbox_2d": [139, 768, 315, 954], "label": "cat"}]',
        [(*n1000(139, 768, 315, 954), "cat")],
        "ok",
        (0, 0, 0),
    ),
    # fenced, several boxes
    (
        "qwen3_vl",
        '```json\n[{"bbox_2d": [0, 0, 10, 10], "label": "a"}, '
        '{"bbox_2d": [500, 500, 1000, 1000], "label": "b"}]\n```',
        [(0, 0, 10, 5, "a"), (500, 250, 1000, 500, "b")],
        "ok",
        (0, 0, 0),
    ),
    # a bare list of four numbers
    ("qwen3_vl", "[100, 200, 300, 400]", [(*n1000(100, 200, 300, 400), None)], "ok", (0, 0, 0)),
    # an overflowing number: json gives inf, the box is dropped
    ("qwen3_vl", '[{"bbox_2d": [1e400, 0, 10, 10]}]', [], "unparseable", (0, 0, 1)),
    # NaN from the model: dropped, the good box kept
    (
        "qwen3_vl",
        '[{"bbox_2d": [NaN, 0, 10, 10]}, {"bbox_2d": [0, 0, 10, 10]}]',
        [(0, 0, 10, 5, None)],
        "ok",
        (0, 0, 1),
    ),
    # objects without boxes
    ("qwen3_vl", '[{"label": "cat"}]', [], "unparseable", (0, 0, 0)),
    # JSON null
    ("qwen3_vl", "null", [], "empty", (0, 0, 0)),
    # --- internvl2 ----------------------------------------------------------------------------
    # the documented answer
    (
        "internvl2",
        "<ref>the lady with the blue shirt</ref><box>[[243, 469, 558, 746]]</box>",
        [(*n1000(243, 469, 558, 746), "the lady with the blue shirt")],
        "ok",
        (0, 0, 0),
    ),
    # two boxes in one <box>, then a second ref
    (
        "internvl2",
        "<ref>cups</ref><box>[[0, 0, 10, 10], [20, 20, 30, 30]]</box> and "
        "<ref>plate</ref><box>[[100, 100, 200, 200]]</box>",
        [(0, 0, 10, 5, "cups"), (20, 10, 30, 15, "cups"), (100, 50, 200, 100, "plate")],
        "ok",
        (0, 0, 0),
    ),
    # cut off inside the second box of a <box>
    (
        "internvl2",
        "<ref>a</ref><box>[[1, 2, 3, 4], [5, 6",
        [(*n1000(1, 2, 3, 4), "a")],
        "truncated",
        (0, 0, 0),
    ),
    # no tags, only the list
    ("internvl2", "[[100, 200, 300, 400]]", [(*n1000(100, 200, 300, 400), None)], "ok", (0, 0, 0)),
    # garbage
    ("internvl2", "<box>not a box</box>", [], "unparseable", (0, 0, 0)),
    # --- florence2 ----------------------------------------------------------------------------
    # the documented answer, with the decoder's special tokens left in
    (
        "florence2",
        "</s><s>a green car<loc_52><loc_332><loc_932><loc_774></s>",
        [(*bins(52, 332, 932, 774), "a green car")],
        "ok",
        (0, 0, 0),
    ),
    # two phrases, the second with two boxes
    (
        "florence2",
        "a car<loc_0><loc_0><loc_9><loc_9>wheels<loc_10><loc_10><loc_19><loc_19>"
        "<loc_20><loc_20><loc_29><loc_29>",
        [
            (*bins(0, 0, 9, 9), "a car"),
            (*bins(10, 10, 19, 19), "wheels"),
            (*bins(20, 20, 29, 29), "wheels"),
        ],
        "ok",
        (0, 0, 0),
    ),
    # cut off inside the second group of four
    (
        "florence2",
        "a<loc_0><loc_0><loc_9><loc_9>b<loc_10><loc_1",
        [(*bins(0, 0, 9, 9), "a")],
        "truncated",
        (0, 0, 0),
    ),
    # a bin beyond 999
    (
        "florence2",
        "x<loc_900><loc_0><loc_1500><loc_10>",
        [(900.5, 0.25, 1000, 5.25, "x")],
        "clipped",
        (1, 0, 0),
    ),
    # nothing found: only special tokens
    ("florence2", "</s><s></s>", [], "empty", (0, 0, 0)),
    # --- paligemma ----------------------------------------------------------------------------
    # the documented answer
    (
        "paligemma",
        "<loc0001><loc0123><loc0530><loc1012> stop sign",
        [(*loc(1, 123, 530, 1012), "stop sign")],
        "ok",
        (0, 0, 0),
    ),
    # two detections separated by " ; "
    (
        "paligemma",
        "<loc0000><loc0000><loc0512><loc0512> cat ; <loc0512><loc0512><loc1023><loc1023> dog",
        [(*loc(0, 0, 512, 512), "cat"), (*loc(512, 512, 1023, 1023), "dog")],
        "ok",
        (0, 0, 0),
    ),
    # cut off inside the second detection
    (
        "paligemma",
        "<loc0000><loc0000><loc0512><loc0512> cat ; <loc0512><loc05",
        [(*loc(0, 0, 512, 512), "cat")],
        "truncated",
        (0, 0, 0),
    ),
    # segmentation tokens between the box and the label
    (
        "paligemma",
        "<loc0100><loc0100><loc0200><loc0200><seg012><seg044> cat",
        [(*loc(100, 100, 200, 200), "cat")],
        "ok",
        (0, 0, 0),
    ),
    # nothing detected
    ("paligemma", "<eos>", [], "empty", (0, 0, 0)),
    # a caption instead of a detection
    ("paligemma", "a stop sign on a street", [], "unparseable", (0, 0, 0)),
]


@pytest.mark.parametrize(("family", "text", "expected", "status", "counts"), CASES)
def test_parse_table(family, text, expected, status, counts):
    result = get_family(family).parse(text, SIZE, RESIZE)
    got = [(*b.to_list(), b.label) for b in result.boxes]
    assert len(got) == len(expected), result
    for g, e in zip(got, expected, strict=True):
        assert g[:4] == pytest.approx(e[:4], abs=1e-9), result
        assert g[4] == e[4]
    assert result.status == status, result.message
    assert (result.clipped, result.fixed, result.dropped) == counts
    assert result.ok is (status in ("ok", "clipped", "truncated") and bool(expected))


def test_registry():
    assert set(FAMILIES) == {
        "qwen2_vl",
        "qwen2_5_vl",
        "qwen3_vl",
        "internvl2",
        "florence2",
        "paligemma",
        "generic",
    }
    for name, family in FAMILIES.items():
        assert family.name == name
        assert family.coords in ("norm1000", "resized_pixels", "bins1000", "loc1024")
        assert family.needs_resize is (name == "qwen2_5_vl")
        assert family.chat is (name not in ("florence2", "paligemma"))
        assert REQUIREMENTS[name][0] == "image_size"
    assert REQUIREMENTS["qwen2_5_vl"] == ("image_size", "resize")
    with pytest.raises(ValueError, match="unknown model family 'llava'; known: florence2, "):
        get_family("llava")


@pytest.mark.parametrize(
    ("arch", "name"),
    [
        ("Qwen2VLForConditionalGeneration", "qwen2_vl"),
        ("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl"),
        ("Qwen3VLForConditionalGeneration", "qwen3_vl"),
        ("Qwen3VLMoeForConditionalGeneration", "qwen3_vl"),
        ("InternVLChatModel", "internvl2"),
        ("InternVLForConditionalGeneration", "internvl2"),
        ("Florence2ForConditionalGeneration", "florence2"),
        ("PaliGemmaForConditionalGeneration", "paligemma"),
    ],
)
def test_family_for_architecture(arch, name):
    assert family_for_architecture(arch) == name


def test_family_for_unknown_architecture():
    with pytest.raises(ValueError, match="no grounding family for architecture 'LlavaFor"):
        family_for_architecture("LlavaForConditionalGeneration")


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        (
            "qwen3_vl",
            "Locate the red car in the image and output its bbox coordinates in JSON format.",
        ),
        ("qwen2_5_vl", "Locate the red car, output its bbox coordinates using JSON format."),
        (
            "qwen2_vl",
            "Find <|object_ref_start|>the red car<|object_ref_end|> in the image and "
            "output its bounding box.",
        ),
        (
            "internvl2",
            "Please provide the bounding box coordinate of the region this sentence "
            "describes: <ref>the red car</ref>",
        ),
        ("florence2", "<CAPTION_TO_PHRASE_GROUNDING>the red car"),
        ("paligemma", "detect the red car\n"),
    ],
)
def test_prompt(family, expected):
    assert get_family(family).prompt("  the red car ") == expected


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("text", ["", "   \n"])
def test_prompt_refuses_empty(name, text):
    with pytest.raises(ValueError, match="referring expression is empty"):
        FAMILIES[name].prompt(text)


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("size", [(0, 10), (10,), (10.0, 10.0), None])
def test_parse_is_strict_with_image_size(name, size):
    with pytest.raises(ValueError, match=r"`image_size` must be \(width, height\)"):
        FAMILIES[name].parse("[1, 2, 3, 4]", size, RESIZE)


def test_qwen2_5_vl_needs_resize():
    family = get_family("qwen2_5_vl")
    with pytest.raises(ValueError, match="qwen2_5_vl needs `resize` \\(min/max pixels\\)"):
        family.parse(QWEN25_DOC, SIZE)
    with pytest.raises(ValueError, match="qwen2_5_vl needs `resize`"):
        family.render([Box(x1=0, y1=0, x2=1, y2=1)], SIZE)


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        (
            "qwen3_vl",
            '[{"bbox_2d": [100, 200, 500, 1000], "label": "cat"}, {"bbox_2d": [0, 0, 10, 20]}]',
        ),
        (
            "qwen2_5_vl",
            '```json\n[\n\t{"bbox_2d": [101, 202, 504, 1008], "label": "cat"},\n'
            '\t{"bbox_2d": [0, 0, 10, 20]}\n]\n```',
        ),
        (
            "qwen2_vl",
            "<|object_ref_start|>cat<|object_ref_end|><|box_start|>(100,200),(500,1000)"
            "<|box_end|><|box_start|>(0,0),(10,20)<|box_end|>",
        ),
        (
            "internvl2",
            "<ref>cat</ref><box>[[100, 200, 500, 1000]]</box><box>[[0, 0, 10, 20]]</box>",
        ),
        ("florence2", "cat<loc_100><loc_200><loc_500><loc_999><loc_0><loc_0><loc_10><loc_20>"),
        (
            "paligemma",
            "<loc0205><loc0102><loc1023><loc0512> cat ; <loc0000><loc0000><loc0020><loc0010>",
        ),
    ],
)
def test_render_exact_text(family, expected):
    # image 1000x1000 -> Qwen2.5-VL input 1008x1008
    boxes = [Box(x1=100, y1=200, x2=500, y2=1000, label="cat"), Box(x1=0, y1=0, x2=10, y2=20)]
    assert get_family(family).render(boxes, (1000, 1000), RESIZE) == expected


def _unit(name, size, resize):
    """Pixels per step of the family's integer grid, along x and y."""
    w, h = size
    if name == "qwen2_5_vl":
        rw, rh = resize.resized_size(size)
        return w / rw, h / rh
    steps = 1024 if name == "paligemma" else 1000
    return w / steps, h / steps


LABELS = ["cat", "red car", "the man on the left", "ünïcode 猫"]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_render_parse_round_trip(name):
    family = FAMILIES[name]
    rng = random.Random(0)
    for _ in range(150):
        size = (rng.randint(16, 4000), rng.randint(16, 4000))
        resize = ResizeSpec(
            min_pixels=rng.choice([3136, 200704]), max_pixels=rng.choice([1003520, 12845056])
        )
        ux, uy = _unit(name, size, resize)
        labelled = rng.random() < 0.7  # all labelled or none: an unlabelled box inherits a ref
        boxes = []
        for _ in range(rng.randint(1, 4)):
            # at least 3 grid steps wide so quantisation cannot collapse a box
            x1 = rng.uniform(0, size[0] - 3 * ux)
            y1 = rng.uniform(0, size[1] - 3 * uy)
            x2 = size[0] if rng.random() < 0.1 else rng.uniform(x1 + 3 * ux, size[0])
            y2 = rng.uniform(y1 + 3 * uy, size[1])
            boxes.append(
                Box(x1=x1, y1=y1, x2=x2, y2=y2, label=rng.choice(LABELS) if labelled else None)
            )
        text = family.render(boxes, size, resize)
        result = family.parse(text, size, resize)
        assert result.status == "ok", (text, result.message)
        # the generic answer "[x1, y1, x2, y2]" carries no label
        labels = [None if name == "generic" else b.label for b in boxes]
        assert [b.label for b in result.boxes] == labels, text
        # half a step of the grid; PaliGemma clamps 1024 to <loc1023>, a whole step at the edge
        tol = 1.0 if name == "paligemma" else 0.5
        for got, want in zip(result.boxes, boxes, strict=True):
            for g, w, u in zip(got.to_list(), want.to_list(), (ux, uy, ux, uy), strict=True):
                assert abs(g - w) <= tol * u + 1e-9, (text, got, want)


_rng = random.Random(0)
NASTY = [
    "",  # empty
    " \n\t ",  # whitespace
    "None",  # the word
    '[{"bbox_2d": [1e400',  # overflow, cut off
    '[{"bbox_2d": [1e400, 0, 1e400, 5]}]',  # overflow, complete
    "{{{{",  # braces only
    "}}}}]]]]",  # closers only
    "[" * 5000,  # deep nesting
    '{"a":' * 3000,  # deep objects
    "x" * 100_000,  # very long prose
    "<loc_" * 20_000,  # many partial Florence tokens
    "<ref>" * 20_000,  # many unclosed refs
    "(" * 50_000,  # many open parens
    "[1, 2, 3, " * 10_000,  # many partial lists
    "1" * 5000,  # a number too long for int()
    '[{"bbox_2d": [' + "9" * 5000 + ", 0, 1, 1]}]",  # a 5000-digit coordinate
    '[{"bbox_2d": [NaN, Infinity, -Infinity, 1]}]',  # JSON's non-finite words
    '[{"bbox_2d": [true, false, null, 1]}]',  # wrong types
    '[{"bbox_2d": "1, 2, 3, 4"}]',  # string instead of list
    '[{"bbox_2d": [1, 2, 3]}]',  # three numbers
    "<|box_start|>(nan,nan),(inf,inf)<|box_end|>",  # words in a Qwen2 box
    "<loc_-1><loc_-5><loc_3><loc_4>",  # negative bins
    "<loc9999><loc9999><loc9999><loc9999> far",  # PaliGemma beyond 1023
    "<box>[[-1e308, -1e308, 1e308, 1e308]]</box>",  # huge finite numbers
    "```json\n```",  # empty fence
    "```",  # fence only
    "\x00\x01\x02\ufffd\ud800",  # control characters and a lone surrogate
    "猫 🐱 " * 1000,  # unicode
    bytes(_rng.randrange(256) for _ in range(4096)).decode("utf-8", errors="replace"),
    "".join(_rng.choice('[]{}(),:"<>loc_0123456789 bbox_2d') for _ in range(20_000)),
    None,  # an engine that returned nothing
    b'[{"bbox_2d": [1, 2, 3, 4]}]',  # bytes instead of str
]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_parse_never_raises(name):
    family = FAMILIES[name]
    for text in NASTY:
        result = family.parse(text, (640, 480), RESIZE)
        assert isinstance(result, ParseResult)
        for box in result.boxes:
            assert 0 <= box.x1 < box.x2 <= 640 and 0 <= box.y1 < box.y2 <= 480, (text[:50], box)
