"""`groundlabel export-model` and the ONNX runner (issue 31): the bundled tiny Qwen3-VL, plain
and with a registry adapter merged, answers token for token as the transformers engine does;
the runner needs neither torch nor vLLM nor Ray; bad input is refused before any work."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from grounding.edge import ExportError
from grounding.paths import REPO_ROOT


@pytest.fixture(scope="module")
def exported(tiny_onnx):
    return tiny_onnx


def _agree(folder, model, samples, adapter=None) -> list[tuple[str, str]]:
    """(transformers text, ONNX text) per sample, one image per call in both."""
    from grounding.edge.runner import OnnxGrounder
    from grounding.engines import EngineConfig
    from grounding.engines.grounder import Grounder, GroundingRequest
    from grounding.engines.hf_engine import HFEngine

    hf = Grounder(HFEngine(EngineConfig(model=str(model), engine="transformers")))
    if adapter is not None:
        hf.engine.add_adapter("a", adapter)
    onnx = OnnxGrounder(folder)
    return [(hf.ground([GroundingRequest(s.image, s.text, "a" if adapter else None)])[0]
             .raw_text, onnx.ground(s.image, s.text).raw_text) for s in samples]


@pytest.mark.slow
def test_export_folder_and_manifest(exported, tiny_model):
    m = json.loads((exported / "manifest.json").read_text())
    assert m["family"] == "qwen3_vl" and m["prompt_version"].startswith("qwen3_vl:")
    assert m["exporter"] == "torch.onnx.export(dynamo=True)"
    assert m["source"] == {"model": str(tiny_model.resolve()), "merged": False}
    from grounding.edge import groundlabel_version

    assert m["groundlabel_version"] == groundlabel_version()
    for name in ("vision.onnx", "embed.onnx", "decoder.onnx", "tokenizer.json",
                 "grammar_vocab.json", "processor_config.json"):
        assert name in m["files"] and (exported / name).is_file()
    assert exported.stat().st_mode & 0o055 == 0o055  # others may read it (not mkdtemp's 0700)


@pytest.mark.slow
def test_tokens_equal_transformers_engine(exported, tiny_model):
    from grounding.synth import iter_samples

    samples = [*iter_samples(4, "base", 1000), *iter_samples(4, "robust", 1000)]
    pairs = _agree(exported, tiny_model, samples)
    assert [o for _, o in pairs] == [h for h, _ in pairs]
    assert all(h.startswith("[") for h, _ in pairs)


@pytest.mark.slow
def test_registry_adapter_merged_answers_like_base_plus_adapter(tiny_model, random_adapter,
                                                                tmp_path):
    from grounding.registry import AdapterRegistry
    from grounding.synth import iter_samples
    from train.onnx_export import ExportConfig, export_model

    reg = AdapterRegistry(str(tmp_path / "adapters"))
    name = reg.register(random_adapter, {})
    reg.promote(name)
    out = tmp_path / "onnx"
    m = export_model(ExportConfig(out=str(out), model=str(tiny_model),
                                  registry=str(tmp_path / "adapters"), name="production"))
    assert m["source"]["adapter"] == name and m["source"]["merged"] is True
    pairs = _agree(out, tiny_model, list(iter_samples(4, "base", 5)), adapter=random_adapter)
    assert [o for _, o in pairs] == [h for h, _ in pairs]


@pytest.mark.slow
def test_runner_imports_neither_torch_nor_vllm_nor_ray(exported):
    from grounding.synth import make_sample

    img = exported.parent / "x.png"
    make_sample(0, "base", 1000).image.save(img)
    code = textwrap.dedent(f"""
        import json, sys
        from PIL import Image
        from grounding.edge.runner import OnnxGrounder
        r = OnnxGrounder({str(exported)!r}).ground(Image.open({str(img)!r}), "the red circle")
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in
                       ("torch", "vllm", "ray", "transformers", "xgrammar"))
        print(json.dumps({{"heavy": heavy, "status": r.status, "boxes": len(r.boxes)}}))
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=REPO_ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["heavy"] == []
    assert res["status"] in ("ok", "clipped")


@pytest.mark.slow
def test_cli_ground(exported):
    from grounding.synth import make_sample

    img = exported.parent / "cli.png"
    s = make_sample(1, "base", 1000)
    s.image.save(img)
    p = subprocess.run([sys.executable, "-m", "groundlabel", "ground", "--onnx", str(exported),
                        str(img), s.text], capture_output=True, text=True, cwd=REPO_ROOT,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["image_size"] == list(s.image.size)
    assert out["boxes"] and all(0 <= b["x1"] <= b["x2"] <= s.image.width for b in out["boxes"])


@pytest.mark.slow
def test_folder_from_another_version_is_refused(exported, tmp_path):
    from grounding.edge import groundlabel_version
    from grounding.edge.runner import ExportVersionError, OnnxGrounder

    other = tmp_path / "old"
    shutil.copytree(exported, other)
    m = json.loads((other / "manifest.json").read_text())
    m["groundlabel_version"] = "0.0.9"
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ExportVersionError) as e:
        OnnxGrounder(other)
    assert "0.0.9" in str(e.value) and groundlabel_version() in str(e.value)


def test_unsupported_checkpoint_is_refused_before_any_work(tmp_path):
    from train.onnx_export import ExportConfig, export_model

    ckpt = tmp_path / "llava"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(
        {"architectures": ["LlavaForConditionalGeneration"]}))
    with pytest.raises(ExportError, match="LlavaForConditionalGeneration.*not supported"):
        export_model(ExportConfig(out=str(tmp_path / "out"), model=str(ckpt)))
    assert not (tmp_path / "out").exists()


def test_adapter_of_another_base_is_refused_before_any_work(tiny_model, tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    from train.onnx_export import ExportConfig, export_model

    adapter = tmp_path / "other-base"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}))
    key = "base_model.model.model.language_model.layers.0.self_attn.q_proj"
    save_file({f"{key}.lora_A.weight": np.zeros((4, 3584), np.float32),  # a 7B's hidden size
               f"{key}.lora_B.weight": np.zeros((3584, 4), np.float32)},
              str(adapter / "adapter_model.safetensors"))
    with pytest.raises(ExportError, match="3584"):
        export_model(ExportConfig(out=str(tmp_path / "out"), model=str(tiny_model),
                                  adapter=str(adapter)))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_int8_export_is_smaller_and_answers(exported, tiny_model, tmp_path):
    """`--quantize int8`: onnxruntime's dynamic quantization of the three graphs; the folder
    says so, its decoder is under 40 % of the float32 one, and the runner still answers in the
    family's grammar (how often it differs from float32 is measured in bench/RESULTS.md)."""
    from grounding.edge.runner import OnnxGrounder
    from grounding.synth import iter_samples
    from train.onnx_export import ExportConfig, export_model

    out = tmp_path / "int8"
    m = export_model(ExportConfig(out=str(out), model=str(tiny_model), quantize="int8"))
    assert m["quantization"] == "int8 dynamic (onnxruntime)"
    f32 = json.loads((exported / "manifest.json").read_text())
    assert f32["quantization"] is None
    assert m["files"]["decoder.onnx"]["bytes"] < 0.4 * f32["files"]["decoder.onnx"]["bytes"]
    g = OnnxGrounder(out)
    for s in iter_samples(4, "base", 1000):
        r = g.ground(s.image, s.text)
        assert r.raw_text.startswith("[") and r.status in ("ok", "clipped", "empty")
