"""The edge runner's grammar masks (grounding/edge/grammar.py) are xgrammar's masks: the same
allowed tokens at every step of documented answers, on the tiny model's vocabulary; documented
answers are accepted and broken ones are not."""

from __future__ import annotations

import numpy as np
import pytest
from grammar_cases import BROKEN, DOCUMENTED

from grounding.edge.grammar import TokenGrammar
from grounding.families import FAMILIES


def _grammar(family: str) -> TokenGrammar:
    return TokenGrammar(FAMILIES[family].grammar, [bytes([b]) for b in range(256)], set(), set())


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl2",
                                    "florence2", "paligemma"])
def test_documented_accepted_broken_refused(family):
    g = _grammar(family)
    for text in DOCUMENTED[family]:
        assert g.accepting(g.walk(g.start, text.encode())), text
    for text in BROKEN.get(family, []):
        assert not g.accepting(g.walk(g.start, text.encode())), text


def test_multibyte_labels():
    g = _grammar("qwen3_vl")
    ok = '[{"bbox_2d": [1, 2, 3, 4], "label": "café 猫"}]'
    assert g.accepting(g.walk(g.start, ok.encode()))
    # a label cut inside a multi-byte character is a live prefix, not a dead one
    assert g.walk(g.start, ok.encode()[:-5])


@pytest.mark.slow
def test_masks_equal_xgrammar_on_the_tiny_vocabulary(tiny_model):
    import numpy as np
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from grounding.families._grammar import as_lark

    tok = AutoTokenizer.from_pretrained(tiny_model)
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=1412)
    fam = FAMILIES["qwen3_vl"]
    mine = TokenGrammar(fam.grammar, [bytes(t) for t in info.decoded_vocab],
                        set(info.special_token_ids), set(info.stop_token_ids))
    compiled = xgr.GrammarCompiler(info).compile_lark(as_lark(fam.grammar))
    for text in DOCUMENTED["qwen3_vl"] + ['[{"bbox_2d": [10, 20, 300, 400], "label": "red"}]']:
        ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
        matcher = xgr.GrammarMatcher(compiled)
        state = mine.start
        for tid in ids:
            bm = xgr.allocate_token_bitmask(1, 1412)
            matcher.fill_next_token_bitmask(bm)
            bits = bm[0].numpy().view(np.uint32)
            theirs = np.array([(bits[i // 32] >> (i % 32)) & 1 for i in range(1412)], bool)
            np.testing.assert_array_equal(mine.mask(state)[:1412], theirs, err_msg=text)
            assert matcher.accept_token(tid)
            state = mine.advance(state, tid)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "internvl2"])
def test_prefix_walk_masks_equal_walking_every_token(family):
    """`TokenGrammar.mask` (sorted prefix walk, skipping dead prefixes) equals walking every
    token, in every state along two documented answers, on a vocabulary of all single bytes
    plus 4,000 random byte strings (shared prefixes, 0xff runs, multi-byte UTF-8, specials)."""
    import random

    rng = random.Random(0)
    alphabet = [*b'[]{}",: 0123456789_abcdeflox', 0xFF, 0xC3, 0xA9, 0xE7, 0x8C, 0xAB]
    tokens = [bytes([b]) for b in range(256)]
    for _ in range(4_000):
        tokens.append(bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 7))))
    tokens += [b"", b"<|im_end|>", b"<|box_start|>", b"\xff\xff", b"\xff\xff\xff"]
    special = {len(tokens) - 3, len(tokens) - 4}
    stop = {len(tokens) - 4}
    g = TokenGrammar(FAMILIES[family].grammar, tokens, special, stop)
    for text in DOCUMENTED[family][:2]:
        for k in range(len(text.encode()) + 1):
            state = g.walk(g.start, text.encode()[:k])
            if not state:
                break
            np.testing.assert_array_equal(g.mask(state), g.mask_by_walking_each_token(state),
                                          err_msg=f"{text!r}[:{k}]")
