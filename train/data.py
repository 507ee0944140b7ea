"""Training examples: a labeled item -> (image the model sees, prompt, answer text), tokenised.

Training goes through exactly the conversions inference uses (ms-swift #4027 is what happens
otherwise: boxes shift when training resizes differently from serving):

* the image is decoded to RGB and resized with the checkpoint's `ResizeSpec` (Qwen
  ``smart_resize``), as the batch job's fetch stage does, so the processor's own resize is a no-op;
* the answer is ``family.render(boxes, ORIGINAL size, resize)``: pixels of the original image
  -> the family's coordinates (0-1000 for Qwen3-VL / Qwen2-VL, resized pixels for Qwen2.5-VL);
* the prompt is the engine's chat prompt around ``family.prompt(text)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from grounding.storage import StorageOptions


@dataclass
class Example:
    image: object  # PIL RGB, already resized for the model
    prompt: str    # chat-formatted prompt (image placeholder included)
    answer: str    # target text, end-of-turn token included


# Every left/right word a horizontal flip must swap, as (left form, right form). Matched as whole
# words, case-insensitively, so "copyright" and "rightful" stay as they are.
_SIDE_WORDS = [("left", "right"), ("leftmost", "rightmost"), ("left-most", "right-most"),
               ("left-hand", "right-hand"), ("lefthand", "righthand"),
               ("left-handed", "right-handed"), ("lefthanded", "righthanded"),
               ("leftward", "rightward"), ("leftwards", "rightwards")]
_MIRROR = {a: b for a, b in _SIDE_WORDS} | {b: a for a, b in _SIDE_WORDS}
# Longest first, so "left-handed" is one match and not "left" + "-handed".
_SIDE = re.compile(r"(?<![\w-])(" + "|".join(sorted(map(re.escape, _MIRROR), key=len,
                                                        reverse=True)) + r")(?![\w-])", re.I)
# Expressions a mirror changes in ways no word swap can express: the sense of a rotation,
# writing and digits (mirrored glyphs read differently), compass directions (not image
# directions), and "left" the verb ("the bag left on the chair" is no side at all).
_UNSAFE = re.compile(
    r"\b(clockwise|counter-?clockwise|anti-?clockwise|east|west|eastern|western|"
    r"text|says|say|reads|read|written|writing|letters?|words?|numbers?|digits?|"
    r"left (on|behind|over|out|by|in|at|there|here|alone)|leftovers?)\b", re.I)


def _same_case(word: str, like: str) -> str:
    if like.isupper():
        return word.upper()
    return word[0].upper() + word[1:] if like[0].isupper() else word


def mirror_text(text: str) -> str | None:
    """The expression as it reads for the horizontally mirrored image: every left/right word
    swapped (case kept), or None when the expression cannot be flipped safely (see `_UNSAFE`);
    unchanged when it names no side."""
    if _UNSAFE.search(text):
        return None
    return _SIDE.sub(lambda m: _same_case(_MIRROR[m.group(1).lower()], m.group(1)), text)


def augment(img, boxes: list[list[float]], text: str, rng) -> tuple:
    """Label-preserving augmentation of an ORIGINAL image and its pixel boxes (xyxy):

    * horizontal flip (p=0.5), with every left/right word swapped in the expression
      (`mirror_text`); an expression that cannot be flipped safely is never flipped;
    * zoom-out (p=0.5): the image on a canvas up to 1.5x larger, filled with its median border
      colour, at a random offset (objects move; their look does not change).
    """
    from PIL import Image, ImageOps

    w, h = img.size
    mirrored = mirror_text(text)
    # The coin is tossed either way, so the zoom-out's draws do not depend on the text.
    if rng.random() < 0.5 and mirrored is not None:
        img = ImageOps.mirror(img)
        boxes = [[w - b[2], b[1], w - b[0], b[3]] for b in boxes]
        text = mirrored
    if rng.random() < 0.5:
        s = 1 + 0.5 * rng.random()
        nw, nh = int(w * s), int(h * s)
        border = [img.getpixel((x, y)) for x in (0, w - 1) for y in (0, h - 1)]
        fill = tuple(sorted(c[i] for c in border)[len(border) // 2] for i in range(3))
        canvas = Image.new("RGB", (nw, nh), fill)
        ox, oy = rng.randint(0, nw - w), rng.randint(0, nh - h)
        canvas.paste(img, (ox, oy))
        img = canvas
        boxes = [[b[0] + ox, b[1] + oy, b[2] + ox, b[3] + oy] for b in boxes]
    return img, boxes, text


def load_item_image(item: dict, storage: StorageOptions | None = None):
    """The item's ORIGINAL image, RGB (raises ImageError)."""
    from grounding.images import decode, read_bytes

    return decode(read_bytes(item["image"], storage))


def make_example(item: dict, engine, family, resize, eos: str = "<|im_end|>",
                 storage: StorageOptions | None = None, coord_step: int = 1, image=None,
                 rng=None) -> Example:
    """An `Example` from a labeled item (`grounding.labels`); raises ImageError / ValueError.

    ``rng`` (a ``random.Random``) turns on `augment`; ``image`` skips loading it again.
    Each box carries the expression as its label, as Qwen answers do. ``coord_step`` rounds
    0-1000 coordinates to the grid a checkpoint was trained on (the bundled tiny model: 10);
    1 keeps them exact.
    """
    from PIL import Image

    from grounding.boxes import Box

    img = image if image is not None else load_item_image(item, storage)
    boxes_px, text = item["boxes"], item["text"]
    if rng is not None:
        img, boxes_px, text = augment(img, boxes_px, text, rng)
    size = img.size
    rw, rh = resize.resized_size(size)
    if (rw, rh) != size:
        img = img.resize((rw, rh), Image.BICUBIC)
    boxes = [Box.from_list(b, label=text) for b in boxes_px]
    if coord_step > 1 and family.coords == "norm1000":
        from grounding.boxes import from_norm1000, to_norm1000

        boxes = [from_norm1000([round(v / coord_step) * coord_step for v in to_norm1000(b, size)],
                               size, label=b.label) for b in boxes]
    answer = family.render(boxes, size, resize if family.needs_resize else None)
    return Example(img, engine.chat_prompt(family.prompt(text)), answer + eos)


_LABEL_VALUE = re.compile(r'"label":\s*"((?:[^"\\]|\\.)*)"')


def encode(processor, examples: list[Example], mask_label_text: bool = False):
    """Tokenised batch; ``labels`` are -100 everywhere but on the answer tokens (left padding).

    ``mask_label_text`` also drops the loss on the text inside ``"label": "..."`` (Qwen answers
    echo the expression there): the answer's format and coordinates are learned, but a new
    word's spelling (for an untrained token, ~20 nats each) does not swamp the gradient.
    """
    import torch

    tok = processor.tokenizer
    enc = processor(text=[e.prompt + e.answer for e in examples],
                    images=[e.image for e in examples], padding=True, return_tensors="pt")
    labels = torch.full_like(enc["input_ids"], -100)
    for i, e in enumerate(examples):
        a = tok(e.answer, add_special_tokens=False, return_offsets_mapping=True)
        n = len(a["input_ids"])
        labels[i, -n:] = enc["input_ids"][i, -n:]
        if mask_label_text:
            spans = [m.span(1) for m in _LABEL_VALUE.finditer(e.answer)]
            for k, (s, t) in enumerate(a["offset_mapping"]):
                if any(s < b and t > a_ for a_, b in spans):
                    labels[i, len(labels[i]) - n + k] = -100
    enc["labels"] = labels
    return enc
