"""The one settings layer: storage, Ray and engine groups declared once, composed by every
verb, flat on the command line and in YAML; one filesystem(), one Ray connect."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from pydantic import ValidationError

from grounding.storage import StorageOptions, filesystem
from groundlabel.cli import VERBS, build_parser, resolve
from groundlabel.flags import model_from_args
from pipelines.config import LabelJobConfig

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["groundlabel", "grounding", "pipelines", "serve", "train"]

# Every verb that touches storage, with the least it needs on the command line.
STORAGE_VERBS = {
    "label": ["--input", "in/", "--output", "out/"],
    "eval": ["--pred", "out/"],
    "report": ["out/"],
    "export": ["store/", "--to", "coco", "--out", "x.json"],
    "import": ["x.jsonl", "--from", "seed", "--store", "store/"],
    "review export": ["out/", "--tasks", "t.json"],
    "review import": ["x.json", "--store", "store/"],
    "review push": ["out/", "--url", "http://ls"],
    "review pull": ["--url", "http://ls", "--project", "1", "--store", "store/"],
    "review calibrate": ["st/", "--registry", "reg/"],
    "review log": ["store/"],
    "review agreement": ["s3://bucket/reviewed"],
    "store migrate": ["old/", "new/"],
    "serve": [],
    "retrain": ["--store", "store/", "--registry", "reg/"],
    "schedule": ["--store", "store/", "--registry", "reg/"],
    "merge": ["--out", "merged/", "--registry", "reg/"],
    "export-model": ["--out", "onnx/", "--registry", "reg/"],
    "adapters list": ["--registry", "reg/"],
    "adapters show": ["--registry", "reg/"],
    "adapters promote": ["--registry", "reg/", "gl-x"],
    "adapters rollback": ["--registry", "reg/"],
    "adapters history": ["--registry", "reg/"],
    "adapters migrate": ["old/", "new/"],
}


def _cfg(verb: str, *argv: str):
    args = build_parser().parse_args([*verb.split(), *argv])
    return model_from_args(resolve(VERBS[verb].config), args, None, VERBS[verb].fixed)


@pytest.mark.parametrize("verb", sorted(STORAGE_VERBS))
def test_s3_region_and_endpoint_reach_every_verb_that_touches_storage(verb):
    cfg = _cfg(verb, *STORAGE_VERBS[verb], "--s3-region", "eu-west-3",
               "--s3-endpoint-url", "http://127.0.0.1:9")
    assert cfg.storage == StorageOptions(s3_region="eu-west-3",
                                         s3_endpoint_url="http://127.0.0.1:9")


def test_the_storage_verbs_are_exactly_those_whose_config_has_storage():
    with_storage = {name for name, v in VERBS.items()
                    if "storage" in getattr(resolve(v.config), "groups", dict)()}
    assert with_storage == set(STORAGE_VERBS)


def test_filesystem_gives_s3fs_the_region_and_endpoint():
    fs, path = filesystem("s3://bucket/key", StorageOptions(s3_region="eu-west-3",
                                                            s3_endpoint_url="http://127.0.0.1:9"))
    assert path == "bucket/key"
    assert fs.client_kwargs == {"region_name": "eu-west-3", "endpoint_url": "http://127.0.0.1:9"}
    assert StorageOptions(s3_region="x").fsspec_kwargs("/local/path") == {}


def test_label_stages_carry_the_jobs_storage(tmp_path, synth_shard):
    from pipelines.label import plan, stages

    cfg = LabelJobConfig(input=str(synth_shard), output=str(tmp_path / "out"),
                         s3_region="eu-west-3")
    p = plan(cfg)
    carried = [s.settings["storage"] for s in stages(cfg, p) if "storage" in s.settings]
    assert len(carried) == 4  # read, fetch_images, infer and parse_boxes (the registry)
    assert all(s.s3_region == "eu-west-3" for s in carried)
    assert p.output.storage.s3_region == "eu-west-3"


def test_retrain_workers_get_the_storage_settings():
    from train.retrain import RetrainConfig

    cfg = RetrainConfig(store="s", registry="r", s3_region="eu-west-3")
    # what TorchTrainer hands each worker (train_loop_config["cfg"])
    assert RetrainConfig(**cfg.model_dump()).storage.s3_region == "eu-west-3"


def test_yaml_flat_nested_and_flags_load_into_the_same_object(tmp_path):
    flat = LabelJobConfig.model_validate({"input": "i", "output": "o", "s3_region": "a",
                                          "model": "m", "ray_address": "h:1"})
    nested = LabelJobConfig.model_validate({"input": "i", "output": "o",
                                            "storage": {"s3_region": "a"},
                                            "inference": {"model": "m"},
                                            "ray": {"ray_address": "h:1"}})
    assert flat == nested
    assert (flat.storage.s3_region, flat.inference.model, flat.ray.ray_address) == ("a", "m", "h:1")
    spec = tmp_path / "job.yaml"
    spec.write_text("input: i\noutput: o\ns3_region: from-yaml\nstorage: {s3_anon: true}\n")
    cfg = model_from_args(LabelJobConfig, build_parser().parse_args(
        ["label", "--s3-endpoint-url", "http://e"]), str(spec))
    assert cfg.storage == StorageOptions(s3_region="from-yaml", s3_anon=True,
                                         s3_endpoint_url="http://e")


def test_unknown_settings_are_refused_by_name(tmp_path):
    with pytest.raises(ValidationError, match="s3_regoin"):
        LabelJobConfig(input="i", output="o", s3_regoin="eu-west-3")
    spec = tmp_path / "job.yaml"
    spec.write_text("input: i\noutput: o\nbatch_sise: 8\n")
    with pytest.raises(SystemExit, match="--batch-sise: Extra inputs are not permitted"):
        model_from_args(LabelJobConfig, build_parser().parse_args(["label"]), str(spec))


def test_group_field_errors_name_the_flag():
    with pytest.raises(SystemExit, match="--ray-num-cpus"):
        _cfg("label", "--input", "i", "--output", "o", "--ray-num-cpus", "0")


def _calls(attr_chain: str):
    """``(file, line)`` of every call to ``attr_chain`` (e.g. ``ray.init``) in our packages."""
    found = []
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and ast.unparse(node.func) == attr_chain:
                    found.append((str(path.relative_to(ROOT)), node.lineno, node))
    return found


def test_one_ray_connect():
    assert {f for f, _, _ in _calls("ray.init")} == {"grounding/settings.py"}


def test_storage_settings_are_never_rebuilt_by_hand():
    # Built from flags/YAML once per verb; nobody constructs them field by field elsewhere.
    by_hand = [(f, ln) for f, ln, node in _calls("StorageOptions") if node.args or node.keywords]
    assert by_hand == []


def test_s3_flags_are_declared_once():
    declared = []
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                        and node.target.id.startswith(("s3_", "ray_address")):
                    declared.append((str(path.relative_to(ROOT)), node.target.id))
    assert sorted(declared) == [("grounding/settings.py", "ray_address"),
                                ("grounding/storage.py", "s3_anon"),
                                ("grounding/storage.py", "s3_endpoint_url"),
                                ("grounding/storage.py", "s3_region")]


def test_every_flag_has_a_description():
    for name, verb in VERBS.items():
        model = resolve(verb.config)
        fields = model.flat_fields() if hasattr(model, "flat_fields") else model.model_fields
        for field, f in fields.items():
            assert f.description, f"{name}: --{field.replace('_', '-')} has no description"


def test_connect_attaches_to_ray_address_else_starts_a_private_ray(tmp_path):
    """`connect` picks RAY_ADDRESS over a local start (the address is only resolved here; the
    slow tests in tests/cluster/test_ray_address.py attach a retrain and a serve for real)."""
    import os

    from grounding.settings import RaySettings

    old = os.environ.pop("RAY_ADDRESS", None)
    try:
        assert RaySettings().address() is None
        os.environ["RAY_ADDRESS"] = "10.1.2.3:6379"
        assert RaySettings().address() == "10.1.2.3:6379"
        assert RaySettings(ray_address="h:1").address() == "h:1"  # the flag wins
    finally:
        os.environ.pop("RAY_ADDRESS", None)
        if old is not None:
            os.environ["RAY_ADDRESS"] = old
