"""`groundlabel merge`: the merged checkpoint answers like base + adapter, in transformers and
in vLLM."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from grounding.engines import EngineConfig, load_engine
from grounding.engines.grounder import Grounder, GroundingRequest
from grounding.synth import iter_samples


@pytest.fixture(scope="module")
def merged(tiny_model, random_adapter, tmp_path_factory):
    from train.merge import MergeConfig, merge

    out = tmp_path_factory.mktemp("merged") / "ckpt"
    merge(MergeConfig(out=str(out), adapter=str(random_adapter), model=str(tiny_model),
                      dtype="float32"))
    return out


def _answers(engine, adapter=None, n=12):
    g = Grounder(engine)
    return [r.raw_text for r in g.ground([GroundingRequest(s.image, s.text, adapter)
                                          for s in iter_samples(n, "base", 5)])]


def test_merged_checkpoint_matches_base_plus_adapter(merged, hf_engine, random_adapter):
    if "rand" not in hf_engine.adapters:
        hf_engine.add_adapter("rand", str(random_adapter))
    want = _answers(hf_engine, "rand")
    assert want != _answers(hf_engine)  # the adapter really changes the answers
    eng = load_engine(EngineConfig(model=str(merged), engine="transformers"))
    try:
        assert _answers(eng) == want
    finally:
        eng.close()
    assert (merged / "config.json").exists() and not (merged / "adapter_config.json").exists()


@pytest.mark.slow
def test_merged_checkpoint_loads_in_vllm(merged, random_adapter):
    """Through the CLI, in fresh processes: vLLM on the merged folder vs vLLM base + adapter."""
    def run(*args):
        out = subprocess.run([sys.executable, "-m", "groundlabel", "eval-synth", "--n", "24",
                              *args], check=True, capture_output=True, text=True, timeout=600)
        return json.loads(out.stdout)

    a = run("--model", str(merged))
    b = run("--adapter", str(random_adapter))
    assert a["acc@0.5"] == b["acc@0.5"] and a["mean_iou"] == pytest.approx(b["mean_iou"], abs=0.02)
