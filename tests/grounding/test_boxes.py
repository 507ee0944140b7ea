import math

import pytest

from grounding.boxes import (
    Box,
    check_image_size,
    from_norm1000,
    from_resized,
    iou,
    to_norm1000,
    to_resized,
)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        # x2 left of x1
        (dict(x1=5, y1=0, x2=3, y2=1), r"x1 <= x2 and y1 <= y2, got x1=5 x2=3"),
        # y2 above y1
        (dict(x1=0, y1=9, x2=1, y2=2), r"x1 <= x2 and y1 <= y2, got .* y1=9 y2=2"),
        # NaN coordinate
        (dict(x1=math.nan, y1=0, x2=1, y2=1), r"finite coordinates, got x1=nan"),
        # infinite coordinate
        (dict(x1=0, y1=0, x2=math.inf, y2=1), r"finite coordinates, got x2=inf"),
        # score outside [0, 1]
        (dict(x1=0, y1=0, x2=1, y2=1, score=1.5), r"score must be within \[0, 1\], got"),
    ],
)
def test_box_validation_says_expected_and_got(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Box(**kwargs)


def test_box_is_frozen_and_has_geometry():
    box = Box(x1=10, y1=20, x2=40, y2=60, score=0.5, label="cat")
    assert (box.width, box.height, box.area) == (30, 40, 1200)
    assert box.to_list() == [10, 20, 40, 60]
    with pytest.raises(ValueError):
        box.x1 = 0
    # a degenerate (zero-area) box is valid structure
    assert Box(x1=1, y1=1, x2=1, y2=1).area == 0


@pytest.mark.parametrize(
    ("seq", "match"),
    [
        ([1, 2, 3], "expected 4 numbers \\[x1, y1, x2, y2\\], got 3"),  # too short
        ([1, 2, 3, 4, 5], "expected 4 numbers \\[x1, y1, x2, y2\\], got 5"),  # too long
        ([], "got 0"),  # empty
    ],
)
def test_from_list_wrong_shape(seq, match):
    with pytest.raises(ValueError, match=match):
        Box.from_list(seq)


def test_from_list_passes_keywords():
    box = Box.from_list((1, 2, 3, 4), label="dog", score=0.25)
    assert box == Box(x1=1, y1=2, x2=3, y2=4, label="dog", score=0.25)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),  # identical
        ([0, 0, 10, 10], [5, 0, 15, 10], 50 / 150),  # half overlap
        ([0, 0, 10, 10], [10, 0, 20, 10], 0.0),  # touching edges only
        ([0, 0, 10, 10], [20, 20, 30, 30], 0.0),  # disjoint
        ([0, 0, 10, 10], [2, 2, 4, 4], 4 / 100),  # nested
        ([0, 0, 0, 0], [0, 0, 0, 0], 0.0),  # zero union
        ([5, 5, 5, 5], [0, 0, 10, 10], 0.0),  # a point inside a box
    ],
)
def test_iou(a, b, expected):
    box_a, box_b = Box.from_list(a), Box.from_list(b)
    assert iou(box_a, box_b) == pytest.approx(expected)
    assert box_b.iou(box_a) == pytest.approx(expected)  # symmetric


@pytest.mark.parametrize(
    ("coords", "expected", "was_clipped"),
    [
        ([10, 10, 50, 50], [10, 10, 50, 50], False),  # inside
        ([-5, 10, 50, 50], [0, 10, 50, 50], True),  # left of the image
        ([10, 10, 150, 90], [10, 10, 100, 80], True),  # beyond right and bottom
        ([120, 90, 150, 95], [100, 80, 100, 80], True),  # fully outside -> zero area
        ([0, 0, 100, 80], [0, 0, 100, 80], False),  # exactly the image
    ],
)
def test_clip(coords, expected, was_clipped):
    box, clipped = Box.from_list(coords, label="x").clip(100, 80)
    assert box.to_list() == expected
    assert clipped is was_clipped
    assert box.label == "x"


def test_scale():
    box = Box(x1=1, y1=2, x2=3, y2=4, label="a").scale(2, 0.5)
    assert box == Box(x1=2, y1=1, x2=6, y2=2, label="a")
    with pytest.raises(ValueError, match="must be finite and > 0, got sx=-1"):
        box.scale(-1, 1)


@pytest.mark.parametrize(
    "size",
    [
        (0, 10),  # zero width
        (10, -1),  # negative height
        (10.5, 10),  # float
        (True, 10),  # bool is not a size
        (10,),  # one number
        "ab",  # not numbers
        None,  # nothing
    ],
)
def test_check_image_size_rejects(size):
    with pytest.raises(ValueError, match=r"`image_size` must be \(width, height\)"):
        check_image_size(size)


def test_norm1000_conversions():
    box = Box(x1=100, y1=50, x2=500, y2=250)
    # x_norm = x / W * 1000 with W=1000, H=500
    assert to_norm1000(box, (1000, 500)) == [100, 100, 500, 500]
    assert from_norm1000([100, 100, 500, 500], (1000, 500), label="a") == box.model_copy(
        update={"label": "a"}
    )
    with pytest.raises(ValueError, match="expected 4 numbers"):
        from_norm1000([1, 2, 3], (10, 10))


def test_resized_conversions():
    # x_orig = x_res * W / W_res
    box = from_resized([146, 137, 615, 415], (1000, 500), (1008, 504))
    assert box.to_list() == pytest.approx(
        [146 * 1000 / 1008, 137 * 500 / 504, 615 * 1000 / 1008, 415 * 500 / 504]
    )
    assert to_resized(box, (1000, 500), (1008, 504)) == pytest.approx([146, 137, 615, 415])
    with pytest.raises(ValueError, match="`resized_size` must be"):
        to_resized(box, (1000, 500), (0, 504))


def test_conversions_round_trip_exactly():
    import random

    rng = random.Random(0)
    for _ in range(500):
        size = (rng.randint(1, 5000), rng.randint(1, 5000))
        resized = (rng.randint(1, 5000), rng.randint(1, 5000))
        x1, x2 = sorted(rng.uniform(0, size[0]) for _ in range(2))
        y1, y2 = sorted(rng.uniform(0, size[1]) for _ in range(2))
        box = Box(x1=x1, y1=y1, x2=x2, y2=y2)
        back = from_norm1000(to_norm1000(box, size), size)
        assert back.to_list() == pytest.approx(box.to_list(), abs=1e-6)
        back = from_resized(to_resized(box, size, resized), size, resized)
        assert back.to_list() == pytest.approx(box.to_list(), abs=1e-6)
