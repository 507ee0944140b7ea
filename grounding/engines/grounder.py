"""Referring expressions in, boxes in original-image pixels out, with any engine.

``Grounder`` owns the three steps every entry point shares (demo, batch jobs, serving, eval):
build the family's prompt inside the model's chat template, generate with the engine, parse the
text with the family into `Box` objects in ORIGINAL-image pixels (xyxy, floats).

Box scores come from the engine's token log-probs: the geometric-mean probability of the tokens
that carry the box's digits (the coordinates), so an answer whose numbers the model was unsure
of ranks low for review. Answers without digit tokens fall back to all tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from grounding.boxes import Box
from grounding.engines.base import Engine, EngineInput, Generation, UnknownAdapterError
from grounding.resize import ResizeSpec


@dataclass
class GroundingRequest:
    """One image (PIL, any mode: converted to RGB here) and one referring expression."""

    image: object
    text: str
    adapter: str | None = None


@dataclass
class GroundingResult:
    """Boxes (original-image pixels, xyxy) for one request, or a coded error."""

    boxes: list[Box] = field(default_factory=list)
    status: str = "ok"  # ParseResult.status, or "error"
    error_code: str | None = None
    error: str | None = None
    raw_text: str = ""
    score: float | None = None
    num_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.error_code is None and bool(self.boxes)


def answer_score(gen: Generation) -> float | None:
    """Geometric-mean probability of the digit-bearing tokens (all tokens if none)."""
    pairs = [(t, lp) for t, lp in zip(gen.tokens, gen.logprobs, strict=False) if math.isfinite(lp)]
    if not pairs:
        return None
    digits = [lp for t, lp in pairs if any(c.isdigit() for c in t)]
    lps = digits or [lp for _, lp in pairs]
    return math.exp(sum(lps) / len(lps))


class BoxReader:
    """Generated text -> scored boxes in ORIGINAL-image pixels, for one family and resize spec.

    Needs no engine, so a batch job can parse in its own CPU stage.
    """

    def __init__(self, family, resize: ResizeSpec):
        """``family``: a `grounding.families.Family`, or a registered family's name."""
        from grounding.families import get_family

        self.family = get_family(family) if isinstance(family, str) else family
        self.resize = resize

    def read(self, gen: Generation, original_size: tuple[int, int]) -> GroundingResult:
        """``original_size`` is the image as the user gave it, even when the engine saw a
        resized copy: the family converts from its own coordinates (0-1000, or resized pixels
        through the same `smart_resize` spec) to the original pixels."""
        resize = self.resize if self.family.needs_resize else None
        parsed = self.family.parse(gen.text, original_size, resize)
        score = answer_score(gen)
        boxes = [b.model_copy(update={"score": score}) for b in parsed.boxes]
        return GroundingResult(boxes=boxes, status=parsed.status, raw_text=gen.text,
                               score=score, num_tokens=len(gen.token_ids))


class Grounder:
    """Prompt -> engine -> parse, for one model family and its resize settings."""

    def __init__(self, engine: Engine, family=None):
        """``family`` (a `Family` or a name) overrides the engine settings' family."""
        from grounding.checkpoint import resize_spec

        self.engine = engine
        cfg = engine.cfg
        self.reader = BoxReader(family or cfg.resolve_family(),
                                resize_spec(cfg.model, cfg.min_pixels, cfg.max_pixels))
        self.family = self.reader.family
        # The answer grammar when decoding is constrained (`EngineConfig.constrained`).
        self.grammar = self.family.grammar if cfg.constrained else None

    def prompt(self, text: str) -> str:
        instruction = self.family.prompt(text)
        return self.engine.chat_prompt(instruction) if self.family.chat else instruction

    def prepare(self, req: GroundingRequest) -> EngineInput | GroundingResult:
        """The engine input for a request, or a coded error result (bad text, unknown adapter)."""
        try:
            if req.adapter is not None:
                self.engine._adapter_path(req.adapter)
            image = req.image if req.image.mode == "RGB" else req.image.convert("RGB")
            return EngineInput(self.prompt(req.text), image, req.adapter, self.grammar)
        except UnknownAdapterError as e:
            return GroundingResult(status="error", error_code="unknown_adapter", error=str(e))
        except ValueError as e:
            return GroundingResult(status="error", error_code="bad_text", error=str(e))

    def finish(self, gen: Generation, original_size: tuple[int, int]) -> GroundingResult:
        """Parse generated text into scored boxes in pixels of the ORIGINAL image."""
        return self.reader.read(gen, original_size)

    def ground(self, requests: list[GroundingRequest]) -> list[GroundingResult]:
        """Ground each request; a bad request becomes a coded error, never an exception."""
        prepared = [self.prepare(r) for r in requests]
        todo = [(i, p) for i, p in enumerate(prepared) if isinstance(p, EngineInput)]
        gens = self.engine.generate([p for _, p in todo])
        for (i, _), gen in zip(todo, gens, strict=True):
            prepared[i] = self.finish(gen, requests[i].image.size)
        return prepared  # type: ignore[return-value]
