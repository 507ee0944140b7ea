"""The colour probe (train/probe.py) reads the right tokens: on the same token choice, the
input pixels' mean colour separates the synthetic colours almost perfectly, so what the vision
features lose is theirs."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_probe_reads_each_objects_tokens():
    """~18 s: loads the bundled model and encodes 60 images."""
    from train.probe import ProbeConfig, colour_probe

    out = colour_probe(ProbeConfig(model="models/tiny-qwen3-vl", n=30))
    assert out["objects_fit"] > 50 and out["objects_scored"] > 50
    px, vf = out["input_pixels"], out["vision_features"]
    # a wrong token <-> box mapping averages background into every object: pixels fall to chance
    assert px["all_colours"]["accuracy"] >= 0.9
    assert px["shifted_among_themselves"]["accuracy"] >= 0.9
    for part in ("all_colours", "shifted_among_themselves", "base_among_themselves"):
        assert 0.0 <= vf[part]["accuracy"] <= 1.0 and vf[part]["objects"] > 10
