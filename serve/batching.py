"""One engine call for a batch of requests, and one call per request when the batch fails, so
that a request the engine refuses fails alone and the others of its batch are answered.

Run::

    python -c "from serve.batching import isolate_failures; print(isolate_failures(lambda xs: [x * 2 for x in xs], [1, 2]))"
"""

from __future__ import annotations

import logging

from serve.guards import ApiError

log = logging.getLogger("groundlabel.serve")

# What the engine raises for a bad INPUT: vLLM's client errors (VLLMClientError, e.g. a prompt
# over max_model_len; matched by name so that this layer needs no vLLM), and ValueError /
# TypeError (an image its processor refuses, the transformers engine). Anything else is the
# engine's own fault.
_INPUT_ERRORS = (ValueError, TypeError)
_INPUT_ERROR_NAMES = {"VLLMClientError"}


def input_caused(e: BaseException) -> bool:
    """True when ``e`` says the request itself is bad, not the engine."""
    return isinstance(e, _INPUT_ERRORS) or any(c.__name__ in _INPUT_ERROR_NAMES
                                               for c in type(e).__mro__)


def _refusal(e: Exception) -> ApiError:
    # The client gets a stable code and the exception's kind, never the engine's text (which
    # names internals); the log keeps the text.
    log.warning("engine refused a request: %s: %s", type(e).__name__, str(e)[:500])
    if input_caused(e):
        return ApiError(422, "engine_rejected", f"the model could not take this request "
                        f"({type(e).__name__}); check its image and text")
    return ApiError(503, "engine_error", "the engine failed on this request; retry later")


def isolate_failures(generate, inputs: list) -> tuple[list, bool]:
    """``generate(inputs)``; if that raises, ``generate([x])`` for each input. Returns the
    results in order (a result, or an `ApiError` for a request that failed alone) and whether
    the batch was retried one by one."""
    try:
        return list(generate(inputs)), False
    except Exception as e:  # noqa: BLE001 - any batch failure: find the culprit
        if len(inputs) == 1:
            return [_refusal(e)], False
        log.warning("a batch of %d failed (%s): retrying one by one", len(inputs),
                    type(e).__name__)
    out = []
    for x in inputs:
        try:
            out.extend(generate([x]))
        except Exception as e:  # noqa: BLE001 - this request's own failure
            out.append(_refusal(e))
    return out, True
