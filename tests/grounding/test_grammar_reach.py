"""Every family's documented answers stay reachable, token by token, under the answer grammar
as vLLM compiles it: the vLLM installed here (its own xgrammar backend class), and vLLM 0.33's
handling, which the CUDA wheel of that version brings.

vLLM 0.33 (``vllm/v1/structured_output/backend_xgrammar.py``) compiles regex, JSON, EBNF and
choice requests against a vocabulary with every special token removed, and only Lark grammars
and structural tags against the full one. A regex that spells Qwen2-VL's ``<|box_start|>``
can then no longer produce that token: every answer comes out empty or spelled character by
character. The engines therefore send the answer grammar as Lark (`as_lark`), which both
versions compile against the full vocabulary.

Tokenizers: the bundled tiny model's (the real Qwen special-token layout: ``<|box_start|>``,
``<|object_ref_start|>`` ... special). For the other families their box markers are added to
it as special tokens, the worst case for a grammar (InternVL2's tokenizer marks ``<ref>`` and
``<box>`` special; Florence-2's ``<loc_N>`` and PaliGemma's ``<locNNNN>`` are ordinary or added
vocabulary in theirs as far as their published files show: not checked offline).

``make gpu-check`` runs this file on the GPU node's vLLM too.
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
from grammar_cases import BROKEN, DOCUMENTED
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grounding.families import FAMILIES
from grounding.families._grammar import as_lark
from grounding.families.generic import Generic
from grounding.paths import DEFAULT_MODEL

GENERICS = {f"generic-{c}": Generic(coords=c)
            for c in ("pixels", "resized_pixels", "norm1000", "norm1")}
ALL = {**FAMILIES, **GENERICS}

# Box markers each family's own tokenizer has as added tokens (see the module docstring).
MARKERS = {
    "internvl2": ["<ref>", "</ref>", "<box>", "</box>"],
    "florence2": [f"<loc_{i}>" for i in range(1000)],
    "paligemma": [f"<loc{i:04d}>" for i in range(1024)],
}


@pytest.fixture(scope="module")
def tokenizers():
    from transformers import AddedToken, AutoTokenizer

    out = {}
    for name in ALL:
        tok = AutoTokenizer.from_pretrained(str(DEFAULT_MODEL))
        if name in MARKERS:
            tok.add_tokens([AddedToken(m, special=True, normalized=False)
                            for m in MARKERS[name]], special_tokens=True)
        out[name] = tok
    return out


def _vllm_033_compiler(tokenizer, request_type: str):
    """The xgrammar compiler vLLM 0.33.0 picks for a request type, built as it builds it
    (`XgrammarBackend.__post_init__` and `_filter_special_tokens`, vLLM 0.33.0)."""
    import xgrammar as xgr

    full = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
    if request_type in ("lark", "structural_tag"):
        return xgr.GrammarCompiler(full)
    special = {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    vocab = [""] * full.vocab_size
    for token, i in tokenizer.get_vocab().items():
        if i < len(vocab) and i not in special:
            vocab[i] = token
    return xgr.GrammarCompiler(xgr.TokenizerInfo.from_vocab_and_metadata(vocab,
                                                                         full.dump_metadata()))


def _matcher_vllm_033(tokenizer, so):
    """A grammar matcher for a request (`StructuredOutputsParams`) as vLLM 0.33 compiles it."""
    import xgrammar as xgr
    from vllm.v1.structured_output.request import get_structured_output_key

    kind, spec = get_structured_output_key(so)
    if kind.name == "REGEX":
        ctx = _vllm_033_compiler(tokenizer, "regex").compile_regex(spec)
    elif kind.name == "GRAMMAR":
        lark = "::=" not in spec
        comp = _vllm_033_compiler(tokenizer, "lark" if lark else "ebnf")
        ctx = comp.compile_lark(spec) if lark else comp.compile_grammar(spec)
    else:
        raise AssertionError(f"the engines never send {kind}")
    return _Matcher(xgr.GrammarMatcher(ctx))


def _matcher_installed(tokenizer, so):
    """A grammar matcher for a request as the vLLM installed here compiles it: its own
    validation and its own xgrammar backend class (on a GPU node, the CUDA build's)."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.structured_output.backend_xgrammar import (
        XgrammarBackend,
        validate_xgrammar_grammar,
    )
    from vllm.v1.structured_output.request import get_structured_output_key

    validate_xgrammar_grammar(SamplingParams(structured_outputs=so))  # what a request passes
    config = SimpleNamespace(
        structured_outputs_config=SimpleNamespace(disable_any_whitespace=False),
        model_config=None, speculative_config=None)
    backend = XgrammarBackend(config, tokenizer=tokenizer, vocab_size=len(tokenizer))
    kind, spec = get_structured_output_key(so)
    return _Matcher(backend.compile_grammar(kind, spec), vllm_grammar=True)


class _Matcher:
    """One interface over xgrammar's matcher and vLLM's grammar object."""

    def __init__(self, m, vllm_grammar: bool = False):
        self.m, self.vllm = m, vllm_grammar

    def accept(self, token: int) -> bool:
        return self.m.accept_tokens("r", [token]) if self.vllm else self.m.accept_token(token)

    def terminated(self) -> bool:
        return self.m.is_terminated()


HANDLINGS = {"installed": _matcher_installed, "vllm-0.33": _matcher_vllm_033}


def _request(regex: str):
    """The structured-output request the vLLM engine sends for an answer grammar."""
    from grounding.engines.vllm_engine import structured_outputs

    return structured_outputs(regex)


def _walk(matcher, tokenizer, text: str) -> str | None:
    """Feed the model's tokens of ``text`` and then its end token; None when all are taken,
    else the first refused token."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    for i in ids:
        if not matcher.accept(i):
            return tokenizer.decode([i], skip_special_tokens=False)
    if not matcher.accept(tokenizer.convert_tokens_to_ids("<|im_end|>")) \
            or not matcher.terminated():
        return "<end of answer>"
    return None


@pytest.mark.parametrize("handling", sorted(HANDLINGS))
@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_documented_answers_are_reachable(tokenizers, name, handling):
    family, tok = ALL[name], tokenizers[name]
    for text in [*DOCUMENTED[name], ""]:  # "" : no such object, as the grammar allows
        if text == "" and re.fullmatch(family.grammar, "") is None:
            continue
        matcher = HANDLINGS[handling](tok, _request(family.grammar))
        refused = _walk(matcher, tok, text)
        assert refused is None, (f"{name} under {handling}: {text!r} cannot be generated, "
                                 f"{refused!r} is masked")


def test_a_regex_request_loses_qwen2_vl_boxes_on_vllm_0_33(tokenizers):
    """Why the engines send Lark: the same grammar as a regex request, under 0.33, masks the
    special tokens every Qwen2-VL box is made of (the issue's finding, reproduced)."""
    from vllm.sampling_params import StructuredOutputsParams

    fam, tok = FAMILIES["qwen2_vl"], tokenizers["qwen2_vl"]
    regex = StructuredOutputsParams(regex=fam.grammar)
    refused = _walk(_matcher_vllm_033(tok, regex), tok, DOCUMENTED["qwen2_vl"][0])
    assert refused == "<|object_ref_start|>"
    refused = _walk(_matcher_vllm_033(tok, regex), tok, DOCUMENTED["qwen2_vl"][1])
    assert refused == "<|box_start|>"


def test_the_engine_pins_the_xgrammar_backend():
    """Only xgrammar compiles our Lark with special tokens the way these tests check; vLLM's
    auto mode would fall back to another backend on a grammar xgrammar refused."""
    from grounding.engines.base import EngineConfig
    from grounding.engines.vllm_engine import llm_kwargs

    kw = llm_kwargs(EngineConfig().resolved(), on_cpu=True)
    assert kw["structured_outputs_config"] == {"backend": "xgrammar"}


# ---- the Lark form means the same as the regex ---------------------------------------------
def _lark_accepts(family, text: str) -> bool:
    import xgrammar as xgr
    from xgrammar.testing import _is_grammar_accept_string

    return _is_grammar_accept_string(xgr.Grammar.from_lark(as_lark(family.grammar)), text)


@pytest.mark.parametrize("name", sorted(ALL))
def test_lark_form_accepts_and_refuses_as_the_regex(name):
    family = ALL[name]
    for text in DOCUMENTED.get(name, []):
        assert _lark_accepts(family, text), (name, text)
    for text in BROKEN.get(name, []):
        assert not _lark_accepts(family, text), (name, text)
    assert json.dumps(as_lark(family.grammar))  # plain text, sent as is


@pytest.mark.parametrize("name", sorted(ALL))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_lark_form_accepts_every_string_of_the_regex(name, data):
    family = ALL[name]
    text = data.draw(st.from_regex(family.grammar, fullmatch=True))
    assert _lark_accepts(family, text), (name, text)
