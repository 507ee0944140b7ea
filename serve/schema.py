"""The endpoint's request and response bodies (they make its OpenAPI schema)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class GroundRequest(BaseModel):
    """One question: where is ``text`` in ``image``?"""

    model_config = {"extra": "forbid"}
    image: str = Field(description="Base64 image bytes, a data: URI, or a URI under one of the "
                       "server's allowed prefixes.")
    text: str = Field(description="The referring expression.")
    adapter: str | None = Field(None, description="Adapter name (default: production).")
    family: str | None = Field(None, description="Model family; must match the served model.")


class BoxOut(BaseModel):
    x1: float
    y1: float
    x2: float
    y2: float
    score: float | None = None


class GroundResponse(BaseModel):
    """Boxes in pixels of the ORIGINAL image (xyxy), best first."""

    boxes: list[BoxOut]
    status: str = Field(description="ok, clipped, truncated, empty or unparseable")
    image_size: list[int] = Field(description="[width, height] of the original image")
    model: str
    adapter: str | None = Field(description="Adapter that answered (None: the base model)")
    raw_text: str
    latency_ms: float
    replica: str | None = Field(None, description="The replica that answered (host:pid).")
