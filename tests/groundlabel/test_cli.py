"""The command line: fast help, the parse verb, configs with flag-named errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from groundlabel.flags import model_from_args


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "groundlabel", *args], capture_output=True,
                          text=True, timeout=120)


def test_help_imports_no_heavy_packages():
    code = ("import sys; from groundlabel.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'vllm', 'ray', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_help_lists_verbs():
    out = _run("--help")
    assert out.returncode == 0
    for verb in ("demo", "parse", "eval-synth", "synth", "tiny"):
        assert verb in out.stdout


def test_parse_prints_original_pixel_boxes():
    out = _run("parse", "--family", "qwen3_vl", "--image-size", "640", "480",
               '```json\n[{"bbox_2d": [100, 200, 500, 600], "label": "cat"}]\n```')
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["status"] == "ok"
    assert d["boxes"][0] == {"x1": 64.0, "y1": 96.0, "x2": 320.0, "y2": 288.0, "label": "cat"}


def test_parse_qwen2_5_uses_the_resize():
    # 1000x500 with default pixels -> resized 1008x504: x_orig = x_res * 1000 / 1008
    out = _run("parse", "--family", "qwen2_5_vl", "--image-size", "1000", "500",
               '{"bbox_2d": [0, 0, 1008, 504]}')
    d = json.loads(out.stdout)
    assert d["boxes"][0]["x2"] == pytest.approx(1000) and d["boxes"][0]["y2"] == pytest.approx(500)


def test_parse_garbage_is_a_status_and_exit_1():
    out = _run("parse", "--family", "qwen3_vl", "--image-size", "10", "10", "no box here")
    assert out.returncode == 1 and json.loads(out.stdout)["status"] == "unparseable"


def test_unknown_family_is_a_clear_error():
    out = _run("parse", "--family", "nope", "--image-size", "10", "10", "x")
    assert out.returncode != 0 and "known:" in out.stderr


def test_config_errors_name_the_flag(tmp_path):
    import argparse

    from grounding.engines import EngineConfig

    ns = argparse.Namespace(model="m", min_pixels=1000, max_pixels=10)
    with pytest.raises(SystemExit, match="--max-pixels"):
        model_from_args(EngineConfig, ns)
    ns = argparse.Namespace(model="m", max_new_tokens="many")
    with pytest.raises(SystemExit, match="--max-new-tokens"):
        model_from_args(EngineConfig, ns)


def test_yaml_config_and_flags_fill_the_same_model(tmp_path):
    import argparse

    from pipelines.demo import DemoConfig

    cfg = tmp_path / "demo.yaml"
    cfg.write_text("n: 3\ndomain: shifted\nout: from-yaml\n")
    d = model_from_args(DemoConfig, argparse.Namespace(out="from-flag"), str(cfg))
    assert (d.n, d.domain, d.out) == (3, "shifted", "from-flag")


def test_every_config_field_has_a_description():
    from grounding.engines import EngineConfig
    from grounding.tinymodel import TinyModelConfig
    from pipelines.demo import DemoConfig
    from train.base import BaseTrainConfig
    from train.evaluate import SynthEvalConfig

    for model in (DemoConfig, BaseTrainConfig, SynthEvalConfig, EngineConfig, TinyModelConfig):
        for name, f in model.model_fields.items():
            assert f.description, f"{model.__name__}.{name} has no description"


def _documented_commands() -> list[str]:
    """Every `groundlabel ...` line in the README and cluster/README bash blocks."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    text = (root / "README.md").read_text() + (root / "cluster" / "README.md").read_text()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            m = re.match(r"(?:\.venv/bin/)?groundlabel (.*)", line.split(" #")[0].strip())
            if m and m.group(1) != "--help":
                cmds.append(re.sub(r"\[[^\]]*\]", "", m.group(1)))  # [optional] parts dropped
    return cmds


def test_every_documented_command_parses_into_its_config():
    import shlex

    from groundlabel.cli import VERBS, build_parser, resolve

    cmds = _documented_commands()
    assert len(cmds) >= 20
    for cmd in cmds:
        args = build_parser().parse_args(shlex.split(cmd))
        verb = VERBS[args._verb]
        model_from_args(resolve(verb.config), args, None, verb.fixed)  # validates
