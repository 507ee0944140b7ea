"""Every error code a row can carry, in one table: what it means and whether it is transient.

Readers (`grounding.formats`), image loading (`grounding.images`), the grounder and the label
job's stages emit these codes; `tests/grounding/test_errors.py` checks that no code is emitted
that this table lacks.

*Transient* codes name a failure that may not happen again (a network or throttling error while
fetching an image, an engine failure on a batch): a rerun of the job retries those rows by
default, replacing the old row. *Permanent* codes name a fault of the row itself (corrupt image,
empty text, ...): rerunning gives the same answer, so the row is kept as it is.
"""

from __future__ import annotations

from typing import NamedTuple


class ErrorCode(NamedTuple):
    meaning: str
    transient: bool


ERRORS: dict[str, ErrorCode] = {
    # the input row (grounding.formats)
    "bad_json": ErrorCode("the input line is not JSON", False),
    "bad_row": ErrorCode("the input line is not a JSON object", False),
    "no_image": ErrorCode("the row names no image", False),
    "empty_text": ErrorCode("the referring expression is empty", False),
    "no_text": ErrorCode("the ms-swift row has no referring expression (no refs)", False),
    "bad_bbox": ErrorCode("the row's true box is not 4 numbers", False),
    # the image (grounding.images, the fetch stage)
    "missing": ErrorCode("the image file/object does not exist", False),
    "fetch_failed": ErrorCode("the image could not be read (network, throttling, permissions)",
                              True),
    "empty_image": ErrorCode("the image has zero bytes", False),
    "zero_size": ErrorCode("the image has a zero width or height", False),
    "too_large": ErrorCode("too many bytes, a decompression bomb, or an aspect ratio the model "
                           "cannot take", False),
    "corrupt": ErrorCode("no decoder accepts the bytes", False),
    "unsupported_format": ErrorCode("a known image format that is not accepted (SVG, EPS, PSD, "
                                    "PDF, ...; accepted: PNG, JPEG, WebP, GIF, TIFF, BMP)", False),
    "bad_image_ref": ErrorCode("the image reference is of an unsupported kind: a URI refused by "
                               "grounding.uris, or a path that is no regular file", False),
    # the model (grounder, infer stage)
    "unknown_adapter": ErrorCode("the row names an adapter the job does not have", False),
    "bad_text": ErrorCode("the family refused the expression", False),
    "engine_error": ErrorCode("the engine failed on this row's batch", True),
}

ERROR_CODES: dict[str, str] = {code: e.meaning for code, e in ERRORS.items()}
TRANSIENT: frozenset[str] = frozenset(c for c, e in ERRORS.items() if e.transient)
