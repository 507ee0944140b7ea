"""The checked-in cluster configs of serving and scheduled retraining carry valid settings."""

from __future__ import annotations

from pathlib import Path

import yaml

from serve.config import ServeConfig

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


def test_serve_run_config_args_are_a_valid_serve_config():
    doc = yaml.safe_load((CLUSTER / "serve-config.yaml").read_text())
    (app,) = doc["applications"]
    assert app["import_path"] == "serve.app:build_app"
    cfg = ServeConfig(**app["args"])
    assert cfg.registry.startswith("s3://") and cfg.allowed_uri_prefixes


def test_rayservice_embeds_the_same_app():
    doc = yaml.safe_load((CLUSTER / "rayservice.yaml").read_text())
    assert doc["kind"] == "RayService"
    (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    ServeConfig(**app["args"])
    assert app["import_path"] == "serve.app:build_app"


def test_retrain_cronjob_runs_a_valid_schedule_check():
    from groundlabel.cli import build_parser

    doc = yaml.safe_load((CLUSTER / "retrain-cronjob.yaml").read_text())
    cmd = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    argv = cmd[cmd.index("--") + 4:]  # after "-- python -m groundlabel"
    assert cmd[cmd.index("--") + 1:cmd.index("--") + 4] == ["python", "-m", "groundlabel"]
    args = build_parser().parse_args(argv)
    assert args.verb == "schedule" and args.once is True
    assert doc["spec"]["concurrencyPolicy"] == "Forbid"
