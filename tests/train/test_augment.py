"""Augmentation keeps labels true: under a horizontal flip every left/right word is swapped,
and an expression the code cannot flip safely is not flipped at all."""

from __future__ import annotations

import random

import pytest

from train.data import augment, mirror_text


@pytest.mark.parametrize("text, mirrored", [
    ("the left circle", "the right circle"),
    ("the right circle", "the left circle"),
    ("the leftmost square", "the rightmost square"),          # superlative, one word
    ("the rightmost square", "the leftmost square"),
    ("the left-most square", "the right-most square"),        # hyphenated superlative
    ("the left-hand cup", "the right-hand cup"),              # compound adjective
    ("the righthand cup", "the lefthand cup"),                # closed compound
    ("a left-handed glove", "a right-handed glove"),          # chirality flips in a mirror
    ("the arrow pointing leftward", "the arrow pointing rightward"),
    ("moving rightwards", "moving leftwards"),
    ("Left of the drain", "Right of the drain"),              # case kept: Title
    ("the LEFT one", "the RIGHT one"),                        # case kept: upper
    ("second from the left, not the right", "second from the right, not the left"),
    ("left and left again", "right and right again"),         # every occurrence
    ("the red square", "the red square"),                     # nothing to swap
    ("the copyright notice", "the copyright notice"),         # 'right' inside a word
    ("the rightful owner", "the rightful owner"),
])
def test_mirror_text_swaps_every_side_word(text, mirrored):
    assert mirror_text(text) == mirrored


@pytest.mark.parametrize("text", [
    "the clock hand turning clockwise",          # rotation sense flips; no safe rewrite
    "the counterclockwise arrow",
    "the sign that says STOP",                   # mirrored writing reads differently
    "the word written on the left door",
    "the number 7 on the shirt",                 # digits are not mirror-symmetric
    "the house west of the road",                # compass words: not image directions
    "the bag left on the chair",                 # 'left' the verb: swapping would lie
    "what is left over on the plate",
])
def test_expressions_that_cannot_be_flipped_safely_are_not(text):
    assert mirror_text(text) is None


def _image():
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (100, 50), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    draw.rectangle([10, 10, 30, 30], fill=(255, 0, 0))
    draw.rectangle([0, 0, 4, 49], fill=(0, 255, 0))  # a green stripe on the left edge only
    return img


def test_augment_flips_image_boxes_and_text_together():
    flipped = 0
    for seed in range(40):
        img, boxes, text = augment(_image(), [[10, 10, 30, 30]], "the leftmost red square",
                                   random.Random(seed))
        if text == "the rightmost red square":
            flipped += 1
            # the red square moved to the other side, inside its box
            x1, y1, x2, y2 = boxes[0]
            assert x2 - x1 == 20 and img.getpixel((int(x1) + 10, int(y1) + 10)) == (255, 0, 0)
        else:
            assert text == "the leftmost red square"
    assert 5 < flipped < 35


def test_augment_never_flips_an_unsafe_expression():
    for seed in range(40):
        img, boxes, text = augment(_image(), [[10, 10, 30, 30]], "the sign that says left",
                                   random.Random(seed))
        assert text == "the sign that says left"
        x1, y1 = (int(v) for v in boxes[0][:2])
        assert img.getpixel((x1 + 10, y1 + 10)) == (255, 0, 0)  # the box is on the square
        # never mirrored: the green stripe is still 8 px left of the square (possibly shifted
        # by a zoom-out, which moves both)
        assert img.getpixel((x1 - 8, y1 + 10)) == (0, 255, 0)
