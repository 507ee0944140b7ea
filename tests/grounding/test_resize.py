import random

import pytest

from grounding.resize import ResizeSpec, smart_resize

QWEN_MIN, QWEN_MAX = 56 * 56, 28 * 28 * 1280


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((500, 1000), (504, 1008)),  # defaults: each side rounded to a multiple of 28
        ((28, 28), (56, 56)),  # below min_pixels: scaled up with ceil
        ((20, 20), (56, 56)),  # smaller than one patch
        ((10000, 10000), (980, 980)),  # above max_pixels: scaled down with floor
        ((1080, 1920), (728, 1316)),  # full HD with the default cap
        ((1080, 1920, 28, 3136, 12845056), (1092, 1932)),  # full HD, Qwen2.5-VL's large cap
        ((480, 640, 32, 4096, 16777216), (480, 640)),  # Qwen3-VL factor 32
        ((56, 56 * 199), (56, 11144)),  # aspect ratio just under 200
    ],
)
def test_smart_resize_known_values(args, expected):
    # Expected values checked against transformers' Qwen2VL smart_resize.
    assert smart_resize(*args) == expected


@pytest.mark.parametrize(
    ("height", "width", "match"),
    [
        (10, 2010, "absolute aspect ratio must be smaller than 200, got 201"),  # too wide
        (2010, 10, "absolute aspect ratio must be smaller than 200"),  # too tall
        (0, 100, "must be positive, got height=0"),  # empty image
    ],
)
def test_smart_resize_refuses(height, width, match):
    with pytest.raises(ValueError, match=match):
        smart_resize(height, width)


def test_smart_resize_invariants():
    rng = random.Random(0)
    for _ in range(2000):
        height, width = rng.randint(1, 8000), rng.randint(1, 8000)
        if max(height, width) / min(height, width) > 150:
            continue
        factor = rng.choice([28, 32])
        h, w = smart_resize(height, width, factor, QWEN_MIN, QWEN_MAX)
        assert h % factor == 0 and w % factor == 0, (height, width)
        assert QWEN_MIN <= h * w <= QWEN_MAX, (height, width, h, w)


def test_resize_spec():
    spec = ResizeSpec(min_pixels=3136, max_pixels=12845056)
    assert spec.factor == 28
    # (width, height) in, (width, height) out
    assert spec.resized_size((1000, 500)) == (1008, 504)
    assert ResizeSpec(min_pixels=1, max_pixels=QWEN_MAX, factor=32).resized_size((640, 480)) == (
        640,
        480,
    )
    for field in ("min_pixels", "max_pixels", "factor"):
        assert ResizeSpec.model_fields[field].description


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        # max below min names both flags
        (dict(min_pixels=100, max_pixels=10), r"`max_pixels` must be >= `min_pixels` \(got"),
        # zero pixels
        (dict(min_pixels=0, max_pixels=10), "greater than 0"),
        # zero factor
        (dict(min_pixels=1, max_pixels=10, factor=0), "greater than 0"),
    ],
)
def test_resize_spec_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResizeSpec(**kwargs)


def test_resize_spec_checks_image_size():
    with pytest.raises(ValueError, match="image_size"):
        ResizeSpec(min_pixels=1, max_pixels=10).resized_size((0, 5))
