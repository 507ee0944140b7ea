"""Draw predicted and true boxes on an image (pixels of that image, xyxy)."""

from __future__ import annotations

from grounding.boxes import Box

PRED = (230, 30, 30)   # red: the model's box
GOLD = (20, 170, 60)   # green: the true / reviewed box (or a first reviewer's)
OTHER = (30, 90, 220)  # blue: a second reviewer's box


def draw_boxes(image, pred: list[Box], gold: list[Box] | None = None, text: str | None = None,
               scale: int = 2, score: float | None = None, other: list[Box] | None = None):
    """A copy of ``image`` upscaled by ``scale`` with gold (green), ``other`` (blue) and
    predicted (red) boxes.

    Each predicted box is labelled with its own score; the caption under the image shows the
    expression and, if ``score`` is given, the answer's score (``the red square  score 0.42``).
    The copy is a new RGB image: no metadata (EXIF/GPS) of the source is carried over.
    """
    from PIL import Image, ImageDraw

    w, h = image.size
    canvas = image.convert("RGB").resize((w * scale, h * scale), Image.NEAREST)
    out = Image.new("RGB", (w * scale, h * scale + 28), (255, 255, 255))
    out.paste(canvas, (0, 0))
    d = ImageDraw.Draw(out)
    for b in gold or []:
        d.rectangle([b.x1 * scale, b.y1 * scale, b.x2 * scale, b.y2 * scale], outline=GOLD, width=3)
    for b in other or []:
        d.rectangle([b.x1 * scale, b.y1 * scale, b.x2 * scale, b.y2 * scale], outline=OTHER,
                    width=3)
    for b in pred:
        d.rectangle([b.x1 * scale, b.y1 * scale, b.x2 * scale, b.y2 * scale], outline=PRED, width=2)
        if b.score is not None:
            d.text((b.x1 * scale + 3, b.y1 * scale + 2), f"{b.score:.2f}", fill=PRED)
    caption = (text or "")[:60]
    if score is not None:
        caption = f"{caption}  score {score:.2f}".strip()
    if caption:
        d.text((4, h * scale + 8), caption, fill=(0, 0, 0))
    return out
