"""The cluster manifests parse and carry every field our code relies on.

KubeRay's CRD schemas are not published in a registry package this project can install
(PyPI, npm, Debian), so instead of a schema validation each manifest is read here and the
parts that matter are checked: kinds and API versions, the head service name other manifests
use, the `inference` resource the labeling job's actors ask for, object-store settings,
credentials only through Secrets, and every `groundlabel` command line parsed by our own CLI
(a flag that does not exist fails here, not on the cluster).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from groundlabel.cli import build_parser
from groundlabel.flags import model_from_args

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _cli(argv: list[str]):
    """Parse a `python -m groundlabel VERB ...` command with our parser and config model."""
    from pipelines.config import LabelJobConfig
    from train.schedule import ScheduleConfig

    args = build_parser().parse_args(argv)
    from train.config import RetrainConfig

    model = {"label": LabelJobConfig, "schedule": ScheduleConfig,
             "retrain": RetrainConfig}.get(args.verb)
    return args, (model_from_args(model, args) if model else None)


def _entrypoint(cmd: str) -> list[str]:
    parts = shlex.split(cmd)
    assert parts[:3] == ["python", "-m", "groundlabel"], parts[:3]
    return parts[3:]


def test_every_manifest_parses_and_commits_no_secret():
    files = sorted(CLUSTER.glob("*.yaml"))
    assert len(files) >= 8
    for f in files:
        text = f.read_text()
        for doc in yaml.safe_load_all(text):
            assert doc, f
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), f  # an AWS access key id
        assert not re.search(r"(?i)(secret_access_key|auth_token)\s*[:=]\s*\S{8,}", text), f


def test_raycluster_groups_resources_and_credentials():
    doc = _load("raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    assert doc["metadata"]["name"] == "groundlabel"  # -> groundlabel-head-svc
    head = doc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in doc["spec"]["workerGroupSpecs"]}
    gpu = groups["gpu"]
    # KubeRay passes it to `ray start --resources`, shell-quoted JSON in a string
    import json

    # engines (label job, the retrain's gate) and training workers land on the GPU nodes
    assert json.loads(json.loads(gpu["rayStartParams"]["resources"])) == {"inference": 1,
                                                                          "train": 1}
    c = gpu["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for g in [head, *groups.values()]:
        assert int(g["rayStartParams"]["object-store-memory"]) >= 4_000_000_000
        ctr = g["template"]["spec"]["containers"][0]
        assert {"secretRef": {"name": "groundlabel-s3"}} in ctr["envFrom"]
        assert ctr["image"].startswith("ghcr.io/groundlabel/groundlabel:")  # Ray 2.60.0 inside


def test_rayjob_label_runs_a_valid_label_command_on_the_inference_nodes():
    doc = _load("rayjob-label.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    assert doc["spec"]["clusterSelector"]["ray.io/cluster"] == "groundlabel"
    args, cfg = _cli(_entrypoint(doc["spec"]["entrypoint"]))
    assert args.verb == "label" and cfg.actor_resources == {"inference": 1.0}
    assert cfg.gpus_per_actor == 1 and cfg.input.startswith("s3://")
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    # code and packages come from the cluster's image (test_cluster_env.py)
    assert "pip" not in env and "working_dir" not in env


def test_raycronjob_retrain_is_a_valid_schedule_check():
    from train.cron import Cron

    doc = _load("raycronjob-retrain.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCronJob")
    Cron(doc["spec"]["schedule"])
    args, cfg = _cli(_entrypoint(doc["spec"]["jobTemplate"]["entrypoint"]))
    assert args.verb == "schedule" and cfg.once and cfg.use_gpu and cfg.quantize == "auto"
    _trains_and_gates_on_gpu_nodes(cfg)
    # bitsandbytes (QLoRA) comes with the image's lock, not a per-job pip list
    assert "pip" not in yaml.safe_load(doc["spec"]["jobTemplate"]["runtimeEnvYAML"])


def _trains_and_gates_on_gpu_nodes(cfg) -> None:
    """Training workers ask for `train`, the gate's engine for `inference` (both offered by
    the GPU nodes only), checkpoints go to shared storage (several nodes write them)."""
    assert cfg.worker_resources == {"train": 1.0} and cfg.gate_resources == {"inference": 1.0}
    assert cfg.use_gpu and cfg.storage_path.startswith("s3://")


def test_retrain_cronjob_submits_a_valid_schedule_check():
    doc = _load("retrain-cronjob.yaml")
    ctr = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    cmd = ctr["command"]
    argv = cmd[cmd.index("--") + 1:]
    args, cfg = _cli(_entrypoint(shlex.join(argv)))
    assert args.verb == "schedule" and cfg.once
    _trains_and_gates_on_gpu_nodes(cfg)


@pytest.mark.parametrize("name", ["serve-config.yaml", "rayservice.yaml"])
def test_serving_configs_point_at_the_app(name):
    from serve.config import ServeConfig

    doc = _load(name)
    apps = doc["applications"] if "applications" in doc else yaml.safe_load(
        doc["spec"]["serveConfigV2"])["applications"]
    (app,) = apps
    assert app["import_path"] == "serve.app:build_app"
    assert ServeConfig(**app["args"]).num_gpus == 1


def test_cluster_launcher_nodes():
    doc = _load("cluster-launcher.yaml")
    types = doc["available_node_types"]
    assert doc["head_node_type"] in types and types["gpu"]["resources"] == {"inference": 1, "train": 1}
    assert doc["docker"]["image"].startswith("ghcr.io/groundlabel/groundlabel:")


def test_makefile_submit_targets_name_valid_commands():
    text = (CLUSTER.parent / "Makefile").read_text()
    for target in ("submit-label", "submit-retrain", "deploy-serve"):
        assert re.search(rf"^{target}:", text, re.M), target
    _, cfg = _cli(make_command("submit-label", INPUT="s3://b/in/", OUTPUT="s3://b/out",
                               MODEL="/m", NUM_GPUS="8"))
    assert cfg.num_actors == 8 and cfg.actor_resources == {"inference": 1.0}
    args, cfg = _cli(make_command("submit-retrain", STORE="s3://b/r", REGISTRY="s3://b/a",
                                  MODEL="/m", NUM_GPUS="8"))
    assert args.verb == "retrain" and cfg.num_workers == 8
    _trains_and_gates_on_gpu_nodes(cfg)


def make_vars(text: str, **given: str) -> dict[str, str]:
    """The Makefile's `NAME ?= value` / `NAME := value` / `NAME = value` variables, expanded
    (``given`` wins, as on the command line)."""
    raw = dict(re.findall(r"^([A-Z_]+)\s*[?:]?=\s*(.*?)\s*$", text, re.M))
    raw.update(given)

    def expand(value: str, depth: int = 0) -> str:
        assert depth < 10, value
        return re.sub(r"\$\((\w+)\)", lambda m: expand(raw.get(m.group(1), ""), depth + 1), value)

    return {k: expand(v) for k, v in raw.items()}


def make_command(target: str, **given: str) -> list[str]:
    """The `groundlabel` argv a Makefile target runs (after `ray job submit ... --`)."""
    text = (CLUSTER.parent / "Makefile").read_text()
    values = make_vars(text, **given)
    block = text.split(f"\n{target}:")[1].split("\n\n")[0]
    cmd = " ".join(line.strip().rstrip("\\") for line in block.splitlines()[1:])
    cmd = re.sub(r"\$\((\w+)\)", lambda m: values.get(m.group(1), ""), cmd)
    return _entrypoint(cmd.split(" -- ", 1)[1])
