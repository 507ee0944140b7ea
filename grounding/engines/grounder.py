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


class Grounder:
    """Prompt -> engine -> parse, for one model family and its resize settings."""

    def __init__(self, engine: Engine, family: str | None = None):
        from grounding.checkpoint import detect_family, resize_spec
        from grounding.families import get_family

        self.engine = engine
        cfg = engine.cfg
        self.family = get_family(family or cfg.family or detect_family(cfg.model))
        self.resize = resize_spec(cfg.model, cfg.min_pixels, cfg.max_pixels)

    def prompt(self, text: str) -> str:
        instruction = self.family.prompt(text)
        return self.engine.chat_prompt(instruction) if self.family.chat else instruction

    def ground(self, requests: list[GroundingRequest]) -> list[GroundingResult]:
        """Ground each request; a bad request becomes a coded error, never an exception."""
        results: list[GroundingResult | None] = [None] * len(requests)
        todo: list[tuple[int, EngineInput]] = []
        for i, r in enumerate(requests):
            try:
                if r.adapter is not None:
                    self.engine._adapter_path(r.adapter)
                image = r.image if r.image.mode == "RGB" else r.image.convert("RGB")
                todo.append((i, EngineInput(self.prompt(r.text), image, r.adapter)))
            except UnknownAdapterError as e:
                results[i] = GroundingResult(status="error", error_code="unknown_adapter",
                                             error=str(e))
            except ValueError as e:
                results[i] = GroundingResult(status="error", error_code="bad_text", error=str(e))
        gens = self.engine.generate([e for _, e in todo])
        for (i, inp), gen in zip(todo, gens, strict=True):
            results[i] = self._parse(gen, inp.image.size)
        return results  # type: ignore[return-value]

    def _parse(self, gen: Generation, size: tuple[int, int]) -> GroundingResult:
        resize = self.resize if self.family.needs_resize else None
        parsed = self.family.parse(gen.text, size, resize)
        score = answer_score(gen)
        boxes = [b.model_copy(update={"score": score}) for b in parsed.boxes]
        return GroundingResult(boxes=boxes, status=parsed.status, raw_text=gen.text,
                               score=score, num_tokens=len(gen.token_ids))
