"""The batch path on the real vLLM engine: a batch with one request the engine refuses answers
the others, and the endpoint's token count is the engine's own."""

from __future__ import annotations

import pytest
from PIL import Image

pytestmark = pytest.mark.slow

# ~3 tokens a character: far over the tiny model's max_model_len (1024), yet within
# max_text_chars (1000), so only the token budget (or the engine) can refuse it.
LONG = "\U0001d518\u00e9\u4e2d" * 330


def _input(engine, text, size=(64, 64)):
    from grounding.engines.base import EngineInput
    from grounding.engines.grounder import Grounder

    return EngineInput(Grounder(engine).prompt(text), Image.new("RGB", size, (200, 30, 30)))


def test_a_poisoned_request_fails_alone_and_its_batch_is_answered(vllm_engine):
    from serve.batching import input_caused, isolate_failures
    from serve.guards import ApiError

    good = [_input(vllm_engine, "the red square"), _input(vllm_engine, "the square")]
    with pytest.raises(Exception) as e:  # the engine alone: the whole batch fails with one input
        vllm_engine.generate([good[0], _input(vllm_engine, LONG), good[1]])
    assert input_caused(e.value), repr(e.value)  # vLLM's VLLMValidationError
    alone = vllm_engine.generate(good)
    out, retried = isolate_failures(vllm_engine.generate,
                                    [good[0], _input(vllm_engine, LONG), good[1]])
    assert retried
    assert isinstance(out[1], ApiError) and (out[1].status, out[1].code) == (422,
                                                                             "engine_rejected")
    assert [o.text for o in (out[0], out[2])] == [g.text for g in alone]  # answered, unchanged


def test_a_batch_that_works_is_one_call(vllm_engine):
    from serve.batching import isolate_failures

    out, retried = isolate_failures(vllm_engine.generate, [_input(vllm_engine, "the square")])
    assert not retried and out[0].text


@pytest.mark.parametrize("size", [
    (64, 64),       # small: smart_resize keeps it (4 image tokens)
    (16, 16),       # tiny: upscaled to min_pixels
    (1000, 700),    # large: downscaled to max_pixels
    (6000, 32),     # a 187:1 strip, under MAX_RATIO
])
def test_token_budget_counts_what_vllm_counts(vllm_engine, tiny_model, size):
    from vllm import SamplingParams

    from grounding.checkpoint import resize_spec
    from serve.guards import TokenBudget

    spec = resize_spec(tiny_model)
    budget = TokenBudget(str(tiny_model), spec, 1024, 64)
    x = _input(vllm_engine, "the red square on the left", size)
    (out,) = vllm_engine.llm.generate([{"prompt": x.prompt, "multi_modal_data": {"image": x.image}}],
                                      SamplingParams(max_tokens=1), use_tqdm=False)
    assert budget.count(x.prompt, spec.resized_size(size)) == len(out.prompt_token_ids) + 64
