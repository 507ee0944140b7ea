"""Answers each family's sources document, and broken ones: shared by the grammar tests
(tests/grounding/test_grammar.py, tests/grounding/test_grammar_reach.py)."""

from __future__ import annotations

# The answers each family's sources document (see the family modules' docstrings).
DOCUMENTED = {
    "qwen2_vl": ["<|object_ref_start|>a dog<|object_ref_end|><|box_start|>(221,423),(569,886)"
                 "<|box_end|>", "<|box_start|>(0,0),(1000,1000)<|box_end|>"],
    "qwen2_5_vl": ['```json\n[\n\t{"bbox_2d": [146, 137, 615, 415], "label": "bowl of carrots"},'
                   '\n\t{"bbox_2d": [0, 0, 504, 252], "label": "plate"}\n]\n```'],
    "qwen3_vl": ['[{"bbox_2d": [139, 768, 315, 954], "label": "cat"}]',
                 '[{"bbox_2d": [0, 0, 1000, 1000]}, {"bbox_2d": [1, 2, 3, 4], "label": "a b"}]'],
    "internvl2": ["<ref>dog</ref><box>[[221, 423, 569, 886]]</box>",
                  "<ref>cats</ref><box>[[1, 2, 3, 4], [5, 6, 7, 8]]</box>"],
    "florence2": ["dog<loc_221><loc_423><loc_569><loc_886>",
                  "a<loc_0><loc_0><loc_999><loc_999>b<loc_1><loc_2><loc_3><loc_4>"],
    "paligemma": ["<loc0423><loc0221><loc0886><loc0569> dog",
                  "<loc0000><loc0000><loc1023><loc1023> a ; <loc0001><loc0002><loc0003><loc0004>"],
    "generic-norm1000": ["[221, 423, 569, 886]", "[0, 0, 1000, 1000], [1, 2, 3, 4]"],
    "generic-pixels": ["[12, 40, 630, 479]"],
    "generic-resized_pixels": ["[12, 40, 630, 479]"],
    "generic-norm1": ["[0.1, 0.25, 0.5, 1]", "[0, 0.001, 0.999, 1.0]"],
}

# Broken answers: the garbled JSON, cut-off text, out-of-range numbers, prose, too many
# boxes, another family's format.
BROKEN = {
    "qwen3_vl": ['[{"bbox_2d": [2d": [ "d": "d"}]', '[{"bbox_2d": [1, 2, 3, 4]',
                 '[{"bbox_2d": [1, 2, 3, 1001]}]', '[{"bbox_2d": [1, 2, 3]}]',
                 '[{"bbox_2d": [01, 2, 3, 4]}]', "The cat is at the top left.",
                 '[{"bbox_2d": [1, 2, 3, 4], "label": "a\\"b"}]',
                 "[" + ", ".join(['{"bbox_2d": [1, 2, 3, 4]}'] * 9) + "]"],
    "qwen2_5_vl": ['[{"bbox_2d": [1, 2, 3, 4]}]', '```json\n[\n\t{"bbox_2d": [1, 2, 3, 4]}\n]'],
    "qwen2_vl": ["<|box_start|>(1,2),(3,4)", "<|box_start|>(1,2),(3,1001)<|box_end|>",
                 "<|box_start|>(1, 2), (3, 4)<|box_end|>"],
    "internvl2": ["<ref>dog</ref><box>[[1, 2, 3]]</box>", "<box>[[1, 2, 3, 4]]"],
    "florence2": ["dog<loc_1><loc_2><loc_3>", "dog<loc_1000><loc_2><loc_3><loc_4>"],
    "paligemma": ["<loc1024><loc0000><loc0001><loc0002>", "<loc1><loc2><loc3><loc4> dog"],
    "generic-norm1000": ["[1, 2, 3]", "[1, 2, 3, 1001]", "[1.5, 2, 3, 4]", "box: [1, 2, 3, 4]"],
    "generic-norm1": ["[0.1, 0.2, 0.3, 1.5]", "[0.1234, 0.2, 0.3, 0.4]"],
}
