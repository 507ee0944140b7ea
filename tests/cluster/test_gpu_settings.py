"""Every manifest that runs the model passes GPU settings that fit the card it runs on.

The engine's defaults are the CPU's (the tiny model: float32, max_model_len 1024, 0.85 of the
card), so every label, serve and retrain command line under cluster/ (and the Makefile's
submit paths) must say `--dtype bfloat16`, `--max-model-len`, `--max-pixels`, its GPU fraction
and `--gpu-memory-utilization`, and the numbers must be consistent for the named checkpoint on
the named card (cluster/README.md, "What a node runs", shows the arithmetic):

* max_model_len >= visual tokens of max_pixels + 100 (prompt text, markers, template) +
  max_new_tokens;
* weights + vLLM's profiled reserve + the KV cache of the rows in flight, each at the longest
  prompt and answer, fit gpu_memory_utilization x the card's memory (so does one max-length
  sequence, the least an engine needs);
* gpu_memory_utilization <= the GPU fraction the engine's actor or replica asks Ray for (vLLM's
  share is of the whole card: two engines on one card must not ask for more than it has).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

import pytest
import yaml
from envs import ROOT
from test_manifests import CLUSTER, _cli, _entrypoint, make_command


@dataclass(frozen=True)
class Checkpoint:
    """Published facts of a checkpoint (its config.json and model card)."""

    params: float          # all parameters, vision tower included
    layers: int
    kv_heads: int
    head_dim: int
    pixels_per_token: int  # (patch x spatial merge)^2

    @property
    def weight_bytes(self) -> float:  # bf16
        return self.params * 2

    @property
    def kv_bytes_per_token(self) -> int:  # K and V, bf16
        return 2 * self.layers * self.kv_heads * self.head_dim * 2


# Qwen2.5-VL-7B-Instruct: 8.29B parameters; text: 28 layers, 28 heads, 4 KV heads, head_dim 128;
# vision: patch 14, spatial merge 2 (one token per 28x28 px).
CHECKPOINTS = {"Qwen2.5-VL-7B-Instruct": Checkpoint(8.29e9, 28, 4, 128, 28 * 28)}
# Cards by the name the manifests select them with (GPU feature discovery's
# nvidia.com/gpu.product label, or the AWS instance type): memory in bytes (the spec sheet's),
# and what vLLM's profiling run reserves besides weights and KV (one step of
# max_num_batched_tokens activations, the vision encoder's profile, the sampler, CUDA graphs):
# docs/scaling.md §2 takes ~4 GB on H100 (16,384 batched tokens); an L4 profiles 8,192, so
# 3 GB. Assumptions (A), not measured here (no GPU).
L4, BIG = (24e9, 3e9), (80e9, 4e9)
CARDS = {"NVIDIA-L4": L4, "g6.2xlarge": L4, "L4 24 GB": L4, "NVIDIA-A100-SXM4-80GB": BIG,
         "NVIDIA-H100-80GB-HBM3": BIG, "A100/H100 80 GB": BIG}
PROMPT_TEXT = 100  # markers, chat template, instruction, expression


def _checkpoint(model: str) -> Checkpoint:
    name = model.rstrip("/").rsplit("/", 1)[-1]
    assert name in CHECKPOINTS, f"{model}: name a checkpoint whose numbers are known"
    return CHECKPOINTS[name]


def _fits(where: str, inf, gpu_fraction: float, rows_in_flight: int, card: str) -> None:
    """The consistency checks of the module docstring, for one engine."""
    ck = _checkpoint(inf.model)
    assert inf.dtype == "bfloat16", f"{where}: --dtype {inf.dtype}"
    assert inf.max_pixels, f"{where}: --max-pixels bounds the visual tokens and memory per image"
    visual = inf.max_pixels // ck.pixels_per_token
    longest = visual + PROMPT_TEXT + inf.max_new_tokens
    assert inf.max_model_len >= longest, \
        f"{where}: --max-model-len {inf.max_model_len} < {visual} visual + {PROMPT_TEXT} + " \
        f"{inf.max_new_tokens} answer tokens"
    assert 0 < inf.gpu_memory_utilization <= gpu_fraction, \
        f"{where}: --gpu-memory-utilization {inf.gpu_memory_utilization} > GPU fraction " \
        f"{gpu_fraction}"
    memory, reserve = CARDS[card]
    budget = inf.gpu_memory_utilization * memory
    one = ck.weight_bytes + ck.kv_bytes_per_token * inf.max_model_len
    assert one <= budget, f"{where}: weights + one sequence {one / 1e9:.1f} GB > {budget / 1e9:.1f}"
    need = ck.weight_bytes + reserve + rows_in_flight * longest * ck.kv_bytes_per_token
    assert need <= budget, \
        f"{where}: weights + reserve + KV of {rows_in_flight} rows in flight = " \
        f"{need / 1e9:.1f} GB > {inf.gpu_memory_utilization} x {card} = {budget / 1e9:.1f} GB"


def _explicit(where: str, argv: list[str], flags: tuple[str, ...]) -> None:
    missing = [f for f in flags if f not in argv]
    assert not missing, f"{where}: the GPU settings must be explicit, missing {missing}"


ENGINE_FLAGS = ("--model", "--dtype", "--max-model-len", "--max-pixels",
                "--gpu-memory-utilization")


def _gpu_group_card(doc: dict) -> str:
    (gpu,) = [g for g in doc["workerGroupSpecs"] if g["groupName"] == "gpu"]
    card = gpu["template"]["spec"].get("nodeSelector", {}).get("nvidia.com/gpu.product")
    assert card in CARDS, f"the GPU group selects a known card (nodeSelector), got {card!r}"
    return card


def cluster_card() -> str:
    """The card of the RayCluster `groundlabel` (the RayJob, the RayCronJob and the CronJob run
    on it), which must be the cluster launcher's too (`make submit-*` goes to either)."""
    card = _gpu_group_card(yaml.safe_load((CLUSTER / "raycluster.yaml").read_text())["spec"])
    launcher = yaml.safe_load((CLUSTER / "cluster-launcher.yaml").read_text())
    itype = launcher["available_node_types"]["gpu"]["node_config"]["InstanceType"]
    assert CARDS[itype] == CARDS[card], (itype, card)
    return card


def _label(where: str, argv: list[str], card: str) -> None:
    _explicit(where, argv, (*ENGINE_FLAGS, "--gpus-per-actor", "--batch-size",
                            "--batches-in-flight"))
    args, cfg = _cli(argv)
    assert args.verb == "label"
    _fits(where, cfg.inference, cfg.gpus_per_actor, cfg.batch_size * cfg.batches_in_flight, card)


def _retrain(where: str, argv: list[str], card: str) -> None:
    """The retrain's gate runs one engine on one whole GPU (`--use-gpu`), eval_batch_size rows
    per call; its pixels are the training's too."""
    _explicit(where, argv, (*ENGINE_FLAGS, "--use-gpu"))
    args, cfg = _cli(argv)
    assert args.verb in ("retrain", "schedule") and cfg.use_gpu
    _fits(where, cfg.inference, 1.0, cfg.eval_batch_size, card)


def test_rayjob_label_fits_the_clusters_card():
    doc = yaml.safe_load((CLUSTER / "rayjob-label.yaml").read_text())
    _label("rayjob-label.yaml", _entrypoint(doc["spec"]["entrypoint"]), cluster_card())


def test_raycronjob_retrain_fits_the_clusters_card():
    doc = yaml.safe_load((CLUSTER / "raycronjob-retrain.yaml").read_text())
    _retrain("raycronjob-retrain.yaml", _entrypoint(doc["spec"]["jobTemplate"]["entrypoint"]),
             cluster_card())


def test_retrain_cronjob_fits_the_clusters_card():
    doc = yaml.safe_load((CLUSTER / "retrain-cronjob.yaml").read_text())
    cmd = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    _retrain("retrain-cronjob.yaml", cmd[cmd.index("--") + 1:][3:], cluster_card())


def _serve_app(name: str) -> tuple[dict, str]:
    doc = yaml.safe_load((CLUSTER / name).read_text())
    if "applications" in doc:  # serve-config.yaml: deployed onto the RayCluster / launcher's
        return doc["applications"][0]["args"], cluster_card()
    spec = doc["spec"]
    (app,) = yaml.safe_load(spec["serveConfigV2"])["applications"]
    return app["args"], _gpu_group_card(spec["rayClusterConfig"])


@pytest.mark.parametrize("name", ["rayservice.yaml", "serve-config.yaml"])
def test_serving_fits_its_card(name):
    from serve.config import ServeConfig

    args, card = _serve_app(name)
    missing = {"model", "dtype", "max_model_len", "max_pixels", "gpu_memory_utilization",
               "num_gpus", "max_batch_size"} - set(args)
    assert not missing, f"{name}: the GPU settings must be explicit, missing {sorted(missing)}"
    cfg = ServeConfig(**args)
    _fits(name, cfg.inference, cfg.num_gpus, cfg.max_batch_size, card)


def test_make_submit_label_fits_the_clusters_card():
    _label("make submit-label", make_command("submit-label"), cluster_card())


def test_make_submit_retrain_fits_the_clusters_card():
    _retrain("make submit-retrain", make_command("submit-retrain"), cluster_card())


def test_make_deploy_serve_deploys_the_checked_config():
    block = (ROOT / "Makefile").read_text().split("\ndeploy-serve:")[1].split("\n\n")[0]
    assert "serve deploy cluster/serve-config.yaml" in block


def readme_rows() -> list[tuple[str, str]]:
    """(card, label flags) of cluster/README.md's table of what a node runs."""
    text = (CLUSTER / "README.md").read_text()
    rows = re.findall(r"^\| (L4 24 GB|A100/H100 80 GB)[^|]*\|[^|]*\| `(groundlabel label [^`]+)`",
                      text, re.M)
    return rows


def test_the_readme_table_of_node_sizes_is_consistent():
    rows = readme_rows()
    assert {card for card, _ in rows} == {"L4 24 GB", "A100/H100 80 GB"}, rows
    for card, cmd in rows:
        argv = shlex.split(cmd)[1:] + ["--input", "s3://b/in/", "--output", "s3://b/out"]
        _label(f"README {card}", argv, card)


def test_the_readme_l4_row_is_what_the_manifests_run():
    (l4,) = [shlex.split(cmd) for card, cmd in readme_rows() if card == "L4 24 GB"]
    doc = yaml.safe_load((CLUSTER / "rayjob-label.yaml").read_text())
    job = _entrypoint(doc["spec"]["entrypoint"])
    for flag in ENGINE_FLAGS[1:] + ("--gpus-per-actor", "--batch-size", "--batches-in-flight"):
        assert l4[l4.index(flag) + 1] == job[job.index(flag) + 1], flag


def test_the_makefiles_80_gb_settings_fit_an_80_gb_card():
    """The overrides the Makefile and cluster/README.md give for 80 GB cards."""
    one = make_command("submit-label", GPU_MEM="0.90", BATCH_SIZE="32", BATCHES_IN_FLIGHT="8")
    _label("make submit-label (80 GB)", one, "A100/H100 80 GB")
    two = make_command("submit-label", NUM_ACTORS="16", GPUS_PER_ACTOR="0.5", GPU_MEM="0.45",
                       BATCH_SIZE="32", BATCHES_IN_FLIGHT="4")
    _label("make submit-label (80 GB, two engines per GPU)", two, "A100/H100 80 GB")
    with pytest.raises(AssertionError, match="GPU fraction"):  # 0.90 of a card on half of it
        _label("x", make_command("submit-label", GPUS_PER_ACTOR="0.5"), "A100/H100 80 GB")
    with pytest.raises(AssertionError, match="rows in flight"):  # 256 rows on an L4
        _label("x", one, "L4 24 GB")
