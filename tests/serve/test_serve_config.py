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
    """Keys: a Secret mounted as a file on every node (api_keys_file), never an environment
    variable nor a runtime_env; the proxy's request gate is installed on every node with the
    app's own limits; auth is never switched off."""
    from serve.gate import GateSettings

    doc = yaml.safe_load((CLUSTER / "rayservice.yaml").read_text())
    serve_doc = yaml.safe_load(doc["spec"]["serveConfigV2"])
    (app,) = serve_doc["applications"]
    cfg = ServeConfig(**app["args"])
    assert not cfg.insecure_no_auth and cfg.api_keys_file
    assert serve_doc["http_options"]["request_timeout_s"] == cfg.request_timeout_s
    assert "GROUNDLABEL_API_KEYS" not in app["runtime_env"].get("env_vars", {})
    for group in [doc["spec"]["rayClusterConfig"]["headGroupSpec"],
                  *doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]]:
        spec = group["template"]["spec"]
        (ctr,) = spec["containers"]
        assert {"secretRef": {"name": "groundlabel-api-keys"}} not in ctr["envFrom"]
        (vol,) = [v for v in spec["volumes"] if v.get("secret", {}).get("secretName")
                  == "groundlabel-api-keys"]
        (mount,) = [m for m in ctr["volumeMounts"] if m["name"] == vol["name"]]
        assert cfg.api_keys_file.startswith(mount["mountPath"] + "/") and mount["readOnly"]
        env = {e["name"]: e["value"] for e in ctr["env"]}
        assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "serve.gate:proxy_middlewares"
        gate = GateSettings.model_validate_json(env["GROUNDLABEL_GATE"])
        want = cfg.gate_settings()
        for field in ("api_keys_file", "max_body_bytes", "body_timeout_s", "request_timeout_s",
                      "max_requests_per_key", "max_json_values"):
            assert getattr(gate, field) == getattr(want, field), field
    deploy = yaml.safe_load((CLUSTER / "serve-config.yaml").read_text())
    cfg = ServeConfig(**deploy["applications"][0]["args"])
    assert not cfg.insecure_no_auth and cfg.api_keys_file
    assert deploy["http_options"]["request_timeout_s"] == cfg.request_timeout_s
