"""`groundlabel export-model` of a Qwen2.5-VL (issue 31): a small random-weight model of the
published architecture (`grounding.random_checkpoint`: 2 vision blocks, one windowed and one
full-attention, 2 text layers, a 2,048-id vocabulary) exports, its vision graph reproduces
the windowed attention that transformers splits by ``cu_window_seqlens``, and the ONNX runner's
tokens equal the transformers engine's."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory):
    """(checkpoint, export folder) of a shrunk random Qwen2.5-VL-7B."""
    from grounding.random_checkpoint import build
    from train.onnx_export import ExportConfig, export_model

    root = tmp_path_factory.mktemp("qwen25")
    build("qwen2.5-vl-7b", root / "ckpt", device="cpu", shrink=True, vocab_size=2048)
    export_model(ExportConfig(out=str(root / "onnx"), model=str(root / "ckpt")))
    return root / "ckpt", root / "onnx"


@pytest.mark.slow
def test_manifest_and_inputs(qwen25):
    import onnxruntime as ort

    _, folder = qwen25
    m = json.loads((folder / "manifest.json").read_text())
    assert m["family"] == "qwen2_5_vl" and m["vision"]["deepstack"] == 0
    assert m["processor"]["window_size"] == 112 and m["processor"]["num_grid_per_side"] is None
    vision = ort.InferenceSession(str(folder / "vision.onnx"))
    assert [i.name for i in vision.get_inputs()] == [
        "pixel_values", "rot_pos_ids", "window_index", "window_segments", "reverse_index"]
    decoder = ort.InferenceSession(str(folder / "decoder.onnx"))
    assert "deepstack" not in {i.name for i in decoder.get_inputs()}


@pytest.mark.slow
def test_vision_graph_equals_transformers_windowed_attention(qwen25):
    """On one image of 3 x 4 windows, the last row and column partial (20 x 28 patches, no
    resize): the ONNX vision output equals transformers' vision tower (which splits the
    windowed blocks by cu_window_seqlens) within float error; attending across windows instead
    would not."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForImageTextToText

    from grounding.edge import preprocess as pre

    ckpt, folder = qwen25
    m = json.loads((folder / "manifest.json").read_text())
    spec = pre.ProcessorSettings(**m["processor"])
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (20 * 14, 28 * 14, 3), dtype=np.uint8)  # 20 x 28 patches
    vi = pre.vision_inputs(arr, spec)
    assert len(set(vi.window_segments.tolist())) == 3 * 4  # windows of 8 x 8 patches (112 px)
    sess = ort.InferenceSession(str(folder / "vision.onnx"))
    feed = {i.name: getattr(vi, i.name) for i in sess.get_inputs()}
    got = sess.run(None, feed)[0]

    model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model.model.visual(torch.from_numpy(vi.pixel_values),
                                  grid_thw=torch.tensor([vi.grid])).pooler_output.numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # the window mask matters: one segment for all patches is another answer
    unmasked = sess.run(None, {**feed, "window_segments": np.zeros_like(vi.window_segments)})[0]
    assert np.abs(unmasked - want).max() > 100 * np.abs(got - want).max()


@pytest.mark.slow
def test_tokens_equal_transformers_engine(qwen25):
    from grounding.edge.runner import OnnxGrounder
    from grounding.engines import EngineConfig
    from grounding.engines.grounder import Grounder, GroundingRequest
    from grounding.engines.hf_engine import HFEngine
    from grounding.synth import iter_samples

    ckpt, folder = qwen25
    hf = Grounder(HFEngine(EngineConfig(model=str(ckpt), engine="transformers")))
    onnx = OnnxGrounder(folder)
    samples = [*iter_samples(3, "base", 1000), *iter_samples(3, "robust", 1000)]
    pairs = [(hf.ground([GroundingRequest(s.image, s.text)])[0].raw_text,
              onnx.ground(s.image, s.text).raw_text) for s in samples]
    assert [o for _, o in pairs] == [h for h, _ in pairs]
    assert all(h.startswith("```json") for h, _ in pairs)  # the family's grammar held
