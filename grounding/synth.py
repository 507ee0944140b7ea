"""Synthetic grounding data: coloured shapes at free positions, with referring expressions.

Every sample is one image, one referring expression and one gold box. Boxes are xyxy in float
pixels of the generated (original) image. Generation is fully deterministic: sample ``i`` of a
set is drawn from ``random.Random(seed * 1_000_003 + i)`` (never ``hash(str)``, which changes per
process), so an evaluation set is the same set in every process and on every machine.

Three domains:

* ``base``: red / green / blue / yellow squares, circles and triangles on a light grey
  background, 128-224 px, 2-3 objects (`SynthConfig()`). The classic held-out set.
* ``robust``: the base colours and shapes under ordinary variation (`VARIED`): plain
  backgrounds of any colour, gradients and noise; sides 96-448 px with aspect ratios up to 3:1;
  1-4 objects. The tiny base model is trained on a mix of both (`train.base`), and this set
  checks that it holds up off the classic layout.
* ``shifted``: the same shapes in purple / orange / cyan / pink, colours the base model never
  saw. Within one shifted image all objects share a shape, so only the colour word tells them
  apart: a model that cannot read the new colour words is at chance. This is the domain that
  retraining on reviewed labels must lift.

Expressions name colour and shape ("the blue triangle"), add a size when two objects share both
("the small blue triangle"), and sometimes a relation to another object ("the red square left of
the green circle"). Distractors never share the target's full description.

Example::

    groundlabel synth --out data/synth --n 200 --domain shifted --seed 7
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Domain = Literal["base", "shifted", "robust"]
DOMAINS: tuple[str, ...] = ("base", "shifted", "robust")

PALETTES: dict[str, dict[str, tuple[int, int, int]]] = {
    "base": {
        "red": (220, 40, 40),
        "green": (40, 170, 60),
        "blue": (40, 80, 220),
        "yellow": (235, 200, 30),
    },
    "shifted": {
        "purple": (140, 50, 180),
        "orange": (245, 130, 20),
        "cyan": (30, 200, 210),
        "pink": (245, 120, 190),
    },
}
PALETTES["robust"] = PALETTES["base"]
SHAPES = ("square", "circle", "triangle")
Background = Literal["grey", "varied"]


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the generator. Sizes are in pixels of the generated image."""

    min_side: int = 128  # image width/height drawn uniformly in [min_side, max_side]
    max_side: int = 224
    min_objects: int = 2  # at least one distractor: picking an object at random is ~40% right
    max_objects: int = 3
    min_frac: float = 0.22  # object side as a fraction of the image's shorter side
    max_frac: float = 0.42
    relation_prob: float = 0.15  # how often a relation is added to an expression
    duplicate_prob: float = 0.1  # how often a distractor copies the target's colour and shape
    max_aspect: float = 1.0 / 0.57  # w/h or h/w at most (1.75: the old independent draw's limit)
    background: Background = "grey"  # grey: light grey 200-245; varied: any colour, gradient, noise
    same_shape: bool = False  # every object of an image has one shape (as in ``shifted``): only
    # the colour word tells the target apart. Off in every evaluation set; a training knob.


VARIED = SynthConfig(min_side=96, max_side=448, min_objects=1, max_objects=4, max_aspect=3.0,
                     background="varied")
"""The ``robust`` domain's generator: ordinary variation around the classic layout."""

_MIN_CONTRAST = 110.0  # RGB distance background <-> object colour: a shape must stay visible


@dataclass
class Obj:
    shape: str
    color: str
    box: tuple[float, float, float, float]  # xyxy, pixels of the image

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2

    @property
    def cy(self) -> float:
        return (self.box[1] + self.box[3]) / 2

    @property
    def side(self) -> float:
        return self.box[2] - self.box[0]


@dataclass
class Sample:
    """One synthetic example. ``bbox`` is xyxy in float pixels of ``image``."""

    image: object  # PIL.Image.Image
    text: str
    bbox: list[float]
    objects: list[Obj] = field(default_factory=list)
    domain: str = "base"
    index: int = 0

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def _rng(seed: int, index: int) -> random.Random:
    return random.Random(seed * 1_000_003 + index)


def _place(rng: random.Random, w: int, h: int, n: int, cfg: SynthConfig) -> list[tuple]:
    """Non-overlapping square footprints (with a small gap) at free positions."""
    placed: list[tuple[float, float, float, float]] = []
    short = min(w, h)
    for _ in range(n):
        for _attempt in range(60):
            side = rng.uniform(cfg.min_frac, cfg.max_frac) * short
            x1 = rng.uniform(2, w - side - 2)
            y1 = rng.uniform(2, h - side - 2)
            cand = (x1, y1, x1 + side, y1 + side)
            gap = 4
            if all(
                cand[2] + gap <= p[0] or p[2] + gap <= cand[0] or
                cand[3] + gap <= p[1] or p[3] + gap <= cand[1]
                for p in placed
            ):
                placed.append(cand)
                break
    return placed


def _describe(target: Obj, others: list[Obj], rng: random.Random, cfg: SynthConfig) -> str:
    same = [o for o in others if o.shape == target.shape and o.color == target.color]
    desc = f"{target.color} {target.shape}"
    if same:
        # Two objects share colour and shape: the size tells them apart (sizes differ by >= 25%).
        bigger = all(target.side > o.side for o in same)
        desc = ("large " if bigger else "small ") + desc
    text = f"the {desc}"
    if others and rng.random() < cfg.relation_prob:
        ref = rng.choice(others)
        dx, dy = target.cx - ref.cx, target.cy - ref.cy
        if abs(dx) >= abs(dy):
            rel = "left of" if dx < 0 else "right of"
        else:
            rel = "above" if dy < 0 else "below"
        text += f" {rel} the {ref.color} {ref.shape}"
    return text


def make_sample(index: int, domain: Domain = "base", seed: int = 0,
                cfg: SynthConfig | None = None) -> Sample:
    """Draw sample ``index`` of the set ``(domain, seed)``; the same arguments give the same sample."""
    from PIL import ImageDraw

    if cfg is None:
        cfg = VARIED if domain == "robust" else SynthConfig()
    rng = _rng(seed + _DOMAIN_OFFSET[domain], index)
    palette = PALETTES[domain]
    w, h = _size(rng, cfg)
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    feet = _place(rng, w, h, n, cfg)
    colors = list(palette)
    objs: list[Obj] = []
    # In the shifted domain all objects of an image share one shape, so only the (new) colour
    # word identifies the target.
    shared_shape = rng.choice(SHAPES)
    one_shape = domain == "shifted" or cfg.same_shape
    used: set[tuple[str, str]] = set()
    for foot in feet:
        for _ in range(20):
            shape = shared_shape if one_shape else rng.choice(SHAPES)
            color = rng.choice(colors)
            if (shape, color) not in used:
                break
        used.add((shape, color))
        # Every shape fills its square footprint (a triangle's apex at the top centre, its base
        # at the bottom), so the footprint is the tight gold box.
        objs.append(Obj(shape, color, foot))
    if not one_shape and len(objs) >= 2 and rng.random() < cfg.duplicate_prob:
        a, b = objs[0], objs[1]
        if max(a.side, b.side) >= 1.25 * min(a.side, b.side):  # sizes tell them apart
            objs[1] = Obj(a.shape, a.color, b.box)
    target_i = rng.randrange(len(objs))
    target = objs[target_i]
    others = objs[:target_i] + objs[target_i + 1:]
    text = _describe(target, others, rng, cfg)

    img = _background(rng, w, h, cfg, [palette[o.color] for o in objs])
    draw = ImageDraw.Draw(img)
    for o in objs:
        fill = palette[o.color]
        x1, y1, x2, y2 = o.box
        if o.shape == "square":
            draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=fill)
        elif o.shape == "circle":
            draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=fill)
        else:
            draw.polygon([((x1 + x2) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=fill)
    return Sample(image=img, text=text, bbox=[float(v) for v in target.box], objects=objs,
                  domain=domain, index=index)


_DOMAIN_OFFSET = {"base": 0, "shifted": 7919, "robust": 104729}


def _size(rng: random.Random, cfg: SynthConfig) -> tuple[int, int]:
    """Image width and height: both in [min_side, max_side], aspect ratio at most max_aspect."""
    if cfg.background == "grey":  # the classic sets: two independent draws (kept bit-identical)
        return rng.randint(cfg.min_side, cfg.max_side), rng.randint(cfg.min_side, cfg.max_side)
    long = rng.randint(cfg.min_side, cfg.max_side)
    aspect = math.exp(rng.uniform(0.0, math.log(cfg.max_aspect)))  # log-uniform: 1:1 to 3:1
    short = max(cfg.min_side, round(long / aspect))
    return (long, short) if rng.random() < 0.5 else (short, long)


def _far(color: tuple[float, ...], others: list[tuple[int, int, int]]) -> bool:
    return all(math.dist(color, o) >= _MIN_CONTRAST for o in others)


def _background(rng: random.Random, w: int, h: int, cfg: SynthConfig,
                fills: list[tuple[int, int, int]]):
    """The empty canvas. ``varied``: a plain colour, a linear gradient or a noisy plain colour,
    every colour on it at least `_MIN_CONTRAST` from each object's fill."""
    from PIL import Image

    if cfg.background == "grey":
        return Image.new("RGB", (w, h), tuple(int(v) for v in (rng.randint(200, 245),) * 3))

    def colour() -> tuple[int, int, int]:
        for _ in range(200):
            c = (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))
            if _far(c, fills):
                return c
        return (128, 128, 128) if _far((128, 128, 128), fills) else (255, 255, 255)

    kind = rng.choice(("plain", "gradient", "noise"))
    a = colour()
    if kind == "plain":
        return Image.new("RGB", (w, h), a)
    import numpy as np

    if kind == "gradient":
        b = a
        for _ in range(50):  # the whole line a -> b must keep its distance from every fill
            b = colour()
            if all(_far(tuple(x + t * (y - x) for x, y in zip(a, b, strict=True)), fills)
                   for t in (0.25, 0.5, 0.75)):
                break
        else:
            b = a
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = xx * math.cos(angle) + yy * math.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        arr = np.asarray(a, np.float32) + t[..., None] * (np.asarray(b, np.float32) -
                                                          np.asarray(a, np.float32))
    else:
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(6, 20), (h, w, 3))
        arr = np.asarray(a, np.float32) + noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def iter_samples(n: int, domain: Domain = "base", seed: int = 0,
                 cfg: SynthConfig | None = None, start: int = 0) -> Iterator[Sample]:
    for i in range(start, start + n):
        yield make_sample(i, domain, seed, cfg)


def write_dataset(out_dir: str | Path, n: int, domain: Domain = "base", seed: int = 0,
                  cfg: SynthConfig | None = None) -> Path:
    """Write ``n`` samples as PNG files plus a seed JSONL (``{"id","image","text","bbox"}``).

    Image paths in the JSONL are absolute, so the file can be read from anywhere. Returns the
    path of ``data.jsonl``.
    """
    out = Path(out_dir).resolve()
    (out / "images").mkdir(parents=True, exist_ok=True)
    path = out / "data.jsonl"
    with path.open("w") as f:
        for s in iter_samples(n, domain, seed, cfg):
            img_path = out / "images" / f"{domain}-{seed}-{s.index:06d}.png"
            s.image.save(img_path)
            row = {"id": f"{domain}-{seed}-{s.index:06d}", "image": str(img_path),
                   "text": s.text, "bbox": [round(v, 3) for v in s.bbox]}
            f.write(json.dumps(row) + "\n")
    return path


def chance_accuracy(samples: list[Sample]) -> float:
    """Acc@0.5 of picking one of an image's objects uniformly at random (a floor to compare to)."""
    from grounding.boxes import Box

    hits = 0.0
    for s in samples:
        gold = Box.from_list(s.bbox)
        hits += sum(Box.from_list(o.box).iou(gold) >= 0.5 for o in s.objects) / len(s.objects)
    return hits / max(1, len(samples))


__all__ = ["DOMAINS", "PALETTES", "SHAPES", "VARIED", "SynthConfig", "Sample", "make_sample", "iter_samples",
           "write_dataset", "chance_accuracy"]
