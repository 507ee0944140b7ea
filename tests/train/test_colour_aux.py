"""`tiny train --colour-aux`: an image-only colour loss makes the vision tower separate every
colour of the synthetic world, the shifted palette included, while no training text names a
shifted colour (issue 32: the shift becomes new words for what the model can already see)."""

from __future__ import annotations

import pytest

MODEL = "models/tiny-qwen3-vl"


def _train(out, aux: float):
    from train.base import BaseTrainConfig, train

    train(BaseTrainConfig(model=MODEL, out=str(out), steps=80, batch_size=2, lr=5e-4,
                          warmup_steps=5, eval_every=1000, eval_n=2, final_eval_n=2,
                          threads=1, single_frac=0, colour_aux=aux, colour_aux_images=8))


@pytest.mark.slow
def test_colour_loss_separates_every_colour(tmp_path):
    """~1.5 min: two 80-step runs from the bundled model, with and without the colour loss, then
    the colour probe (train/probe.py) on both."""
    from train.probe import ProbeConfig, colour_probe

    _train(tmp_path / "plain", 0.0)
    _train(tmp_path / "aux", 1.0)
    plain = colour_probe(ProbeConfig(model=str(tmp_path / "plain"), n=80))["vision_features"]
    aux = colour_probe(ProbeConfig(model=str(tmp_path / "aux"), n=80))["vision_features"]
    print("plain", plain, "aux", aux)
    assert aux["all_colours"]["accuracy"] >= plain["all_colours"]["accuracy"] + 0.1
    assert aux["all_colours"]["accuracy"] >= 0.75


def test_no_training_text_names_a_shifted_colour():
    """The language stream is the base domain; the colour loss draws shifted-palette images
    without their text, on a seed no validation or test set uses."""
    from grounding.synth import PALETTES, SynthConfig
    from train.base import AUX_SEED_OFFSET, BaseTrainConfig, _ColourHead, _Loop, _next_samples

    cfg = BaseTrainConfig(model=MODEL, out="o", batch_size=8, colour_aux=1.0)
    st = _Loop(t0=0.0)
    texts = [x.text for _ in range(20) for x in _next_samples(cfg, st, SynthConfig())]
    words = set(" ".join(texts).split())
    assert not words & set(PALETTES["shifted"]), words & set(PALETTES["shifted"])
    head = _ColourHead.__new__(_ColourHead)
    head.cfg = cfg
    imgs = [x for s in range(5) for x in head.samples(s)]
    assert {x.domain for x in imgs} == {"base", "shifted"}
    assert cfg.seed + AUX_SEED_OFFSET not in {cfg.val_seed, cfg.test_seed}
    # the shifted half really is the shifted palette (its text is never trained on) ...
    shifted = [x for x in imgs if x.domain == "shifted"]
    assert all(set(x.text.split()) & set(PALETTES["shifted"]) for x in shifted)
    # ... and a step draws the same images every time, so a resumed run sees what it would have
    again = [x for s in range(5) for x in head.samples(s)]
    assert [x.image.tobytes() for x in again] == [x.image.tobytes() for x in imgs]
