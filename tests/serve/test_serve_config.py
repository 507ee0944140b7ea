"""The checked-in cluster configs of serving and scheduled retraining carry valid settings."""

from __future__ import annotations

from pathlib import Path

import pytest
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


# ---- auth cannot be off by accident ------------------------------------------------------------
@pytest.mark.parametrize("keys, host, insecure, refused", [
    ("k1,k2", "0.0.0.0", False, False),      # keys set: any host
    ("", "127.0.0.1", False, False),         # no keys, loopback only: the dev default
    ("", "localhost", False, False),         # the loopback name
    ("", "::1", False, False),               # IPv6 loopback
    ("", "0.0.0.0", False, True),            # no keys, every interface: refused
    ("", "::", False, True),                 # IPv6 any
    ("", "10.0.0.5", False, True),           # a LAN address
    (" , ,", "0.0.0.0", False, True),        # blanks and commas are no keys
    ("", "0.0.0.0", True, False),            # --insecure-no-auth: allowed (warned)
])
def test_auth_refusal(monkeypatch, keys, host, insecure, refused):
    monkeypatch.setenv("GL_AUTH_TEST", keys)
    cfg = ServeConfig(api_keys_env="GL_AUTH_TEST", insecure_no_auth=insecure)
    why = cfg.auth_refusal(host)
    assert (why is not None) == refused
    if refused:
        assert "GL_AUTH_TEST" in why and "--insecure-no-auth" in why


def test_serve_refuses_to_start_without_keys_on_a_public_host(monkeypatch):
    from serve.run import start

    monkeypatch.delenv("GL_AUTH_TEST", raising=False)
    with pytest.raises(SystemExit, match="GL_AUTH_TEST.*--insecure-no-auth"):
        start(ServeConfig(api_keys_env="GL_AUTH_TEST", host="0.0.0.0"), blocking=False)


def test_cluster_configs_take_keys_from_a_secret_and_never_disable_auth():
    doc = yaml.safe_load((CLUSTER / "rayservice.yaml").read_text())
    (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    assert not ServeConfig(**app["args"]).insecure_no_auth
    for group in [doc["spec"]["rayClusterConfig"]["headGroupSpec"],
                  *doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]]:
        (ctr,) = group["template"]["spec"]["containers"]
        assert {"secretRef": {"name": "groundlabel-api-keys"}} in ctr["envFrom"]
    cfg = yaml.safe_load((CLUSTER / "serve-config.yaml").read_text())
    assert not ServeConfig(**cfg["applications"][0]["args"]).insecure_no_auth
