"""A real two-node Ray cluster on this machine: a head and a worker as separate `ray start`
processes, each with its own resources, and the custom resources `inference` and `train` on the
worker only. Jobs go in through the Ray Jobs API (`ray job submit`), as on a real cluster: a
labeling job asking its engines for `inference`, and a retrain asking its training workers for
`train` and its gate for `inference`. The tests check where the work ran and that the output is
complete, then tear both nodes down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import free_port, port_open, ray_node, ray_state, stop_nodes, wait_for

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """Head (2 CPUs) + worker (2 CPUs, `inference` and `train`); yields how to reach them."""
    tmp = tmp_path_factory.mktemp("two-nodes")
    gcs, dash = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(16).hex(), OMP_NUM_THREADS="1",
               # a busy 2-core machine starts a node's agents slowly: give them time
               RAY_agent_register_timeout_ms="180000")
    head = ray_node(["--head", f"--port={gcs}", "--num-cpus=2", "--resources={\"head\": 1}",
                     "--include-dashboard=true", f"--dashboard-port={dash}",
                     "--dashboard-host=127.0.0.1", f"--ray-client-server-port={free_port()}"],
                    env, tmp / "head.log")
    procs = [head]
    try:
        wait_for(lambda: port_open(gcs) and port_open(dash), "the head", procs)
        worker = ray_node([f"--address=127.0.0.1:{gcs}", "--num-cpus=2",
                           "--resources={\"inference\": 1, \"train\": 1}"], env,
                          tmp / "worker.log")
        procs.append(worker)
        addr = f"http://127.0.0.1:{dash}"

        def nodes():
            return [n for n in ray_state("nodes", addr, env) if n["state"] == "ALIVE"]

        wait_for(lambda: len(nodes()) == 2, "two alive nodes", procs)
        by_res = {("inference" in n["resources_total"]): n["node_id"] for n in nodes()}
        yield {"address": addr, "env": env, "worker": by_res[True], "head": by_res[False],
               "state": lambda kind: ray_state(kind, addr, env), "procs": procs}
    finally:
        stop_nodes(procs)


def _submit(cluster, argv: list[str]) -> subprocess.CompletedProcess:
    """`ray job submit` of ``python -m groundlabel ARGV`` to the cluster; waits for the end."""
    cmd = [RAY, "job", "submit", "--address", cluster["address"], "--", sys.executable, "-m",
           "groundlabel", *argv]
    for _ in range(30):
        res = subprocess.run(cmd, env=cluster["env"], capture_output=True, text=True,
                             timeout=900)
        if "No available agent" not in res.stdout + res.stderr:
            break  # (the job agent starts after the dashboard; nothing was submitted)
        time.sleep(2)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    return res


def test_label_job_runs_on_both_nodes(two_nodes, synth_shard, tmp_path):
    state, worker_id, head_id = two_nodes["state"], two_nodes["worker"], two_nodes["head"]
    out = tmp_path / "out"
    _submit(two_nodes, ["label", "--input", str(synth_shard), "--output", str(out),
                        "--actor-resources", '{"inference": 1}', "--cpus-per-actor", "1",
                        "--fetch-batch-size", "2", "--batch-size", "4", "--commit-rows",
                        "4", "--no-progress"])
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows"] == summary["unique_rows"] == 12 and summary["labeled"] == 12

    # Where the work ran: the engines on the `inference` node, the driver on the head, and
    # the job's Ray Data tasks (read, fetch/decode, parse, write) on the nodes with CPUs.
    actors = state("actors")
    infer = [a for a in actors if "Infer" in (a["class_name"] or "")]
    assert infer and {a["node_id"] for a in infer} == {worker_id}, infer
    sup = [a for a in actors if "JobSupervisor" in (a["class_name"] or "")]
    assert {a["node_id"] for a in sup} == {head_id}  # the job's driver side
    tasks = [t for t in state("tasks") if any(
        s in (t["name"] or "") for s in ("ReadShards", "FetchImages", "ParseBoxes", "Write"))]
    task_nodes = {t["node_id"] for t in tasks if t["node_id"]}
    assert task_nodes and task_nodes <= {head_id, worker_id}, task_nodes
    where = {("head" if n == head_id else "worker"): sum(t["node_id"] == n for t in tasks)
             for n in task_nodes}
    print("\nRay Data tasks per node:", where, "| engines: worker")
    # both nodes did the job's work: engines on the worker, data tasks on the head
    assert head_id in task_nodes, where


def test_retrain_trains_on_the_node_offering_the_training_resource(two_nodes, tmp_path):
    """`retrain` through the Jobs API: its Ray Train workers ask for `train` and its gate (the
    vLLM engine) for `inference`, so both run on the worker node, never on the head that also
    has free CPUs and runs the job's driver; the adapter is registered with its gate record."""
    from grounding.registry import AdapterRegistry
    from grounding.synth import write_dataset
    from pipelines.review import ImportConfig, import_labels

    # 40 images: the held-out side hashes each image's path (pytest's tmp dir changes per
    # run); with 16, nothing was held out in about 1 run in 35 (0.8 ** 16)
    data = write_dataset(tmp_path / "synth", 40, "shifted", seed=11)
    store, reg = str(tmp_path / "store"), str(tmp_path / "reg")
    import_labels(ImportConfig(input=str(data), from_fmt="seed", store=store))
    _submit(two_nodes, ["retrain", "--store", store, "--registry", reg, "--max-items", "4",
                        "--epochs", "1", "--batch-size", "2", "--cpus-per-worker", "1",
                        "--worker-resources", '{"train": 1}', "--gate-resources",
                        '{"inference": 1}', "--no-promote",
                        "--storage-path", str(tmp_path / "ray-train")])
    actors = two_nodes["state"]("actors")
    workers = [a for a in actors if "TrainWorker" in (a["class_name"] or "")
               or "RayTrainWorker" in (a["class_name"] or "")]
    assert workers, sorted({a["class_name"] for a in actors})
    assert {a["node_id"] for a in workers} == {two_nodes["worker"]}, workers
    gates = [t for t in two_nodes["state"]("tasks") if t["name"] == "groundlabel-gate"]
    assert gates and {t["node_id"] for t in gates} == {two_nodes["worker"]}, gates
    (adapter,) = AdapterRegistry(reg).list()
    assert adapter["train_items"] == 4 and adapter["gate"]["candidate"]["n"] > 0


def test_serve_deploy_of_the_cluster_config_answers(two_nodes, tiny_model, tmp_path):
    """`serve deploy` of cluster/serve-config.yaml (through the Ray CLI, to the dashboard)
    brings up the endpoint on the two-node cluster, and it answers a grounding request.

    Deployed is a copy with only what cannot work on this machine overridden, nothing else:
    the HTTP port (a free one, on loopback), ``proxy_location: HeadOnly`` (both nodes share
    one host, so proxies on every node would fight for the port), and the args ``model`` (the
    bundled tiny model), ``registry`` (none: no S3 here), ``num_gpus: 0`` and ``num_cpus: 1``
    (a 2-CPU node each), and the engine's GPU settings sized for a 7B model on an L4
    (``dtype``, ``max_model_len``, ``max_pixels``, ``gpu_memory_utilization``: the CPU
    defaults instead). The runtime_env installs nothing (the nodes' image does; here they run
    this checkout's environment)."""
    import base64
    import io

    import requests
    import yaml

    from grounding.synth import make_sample

    repo = Path(__file__).resolve().parents[2]
    cfg = yaml.safe_load((repo / "cluster" / "serve-config.yaml").read_text())
    port = free_port()
    cfg["proxy_location"] = "HeadOnly"
    cfg["http_options"] = dict(cfg["http_options"], host="127.0.0.1", port=port)
    (app,) = cfg["applications"]
    assert set(app["runtime_env"]) <= {"env_vars"}, app["runtime_env"]
    args = app["args"]
    args.update(model=str(tiny_model), num_gpus=0, num_cpus=1)
    for gpu_only in ("registry", "dtype", "max_model_len", "max_pixels", "gpu_memory_utilization"):
        args.pop(gpu_only)
    path = tmp_path / "serve-config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    serve_cli = str(Path(sys.executable).with_name("serve"))
    res = subprocess.run([serve_cli, "deploy", str(path), "--address", two_nodes["address"]],
                         env=two_nodes["env"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    try:
        url = f"http://127.0.0.1:{port}"

        def ready():
            try:
                return requests.get(f"{url}/readyz", timeout=5).status_code == 200
            except requests.RequestException:
                return False

        wait_for(ready, "the Serve app to be ready", two_nodes["procs"], timeout=900)
        s = make_sample(3, "base", 0)
        buf = io.BytesIO()
        s.image.save(buf, format="PNG")
        r = requests.post(f"{url}/v1/ground", timeout=300, json={
            "image": base64.b64encode(buf.getvalue()).decode(), "text": s.text})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["model"] == str(tiny_model) and out["image_size"] == list(s.image.size)
        assert out["status"] in ("ok", "clipped", "empty", "unparseable", "truncated")
        replicas = [a for a in two_nodes["state"]("actors")
                    if "GroundingService" in (a["class_name"] or "") and a["state"] == "ALIVE"]
        assert len(replicas) == args["num_replicas"], replicas
    finally:
        subprocess.run([serve_cli, "shutdown", "-y", "--address", two_nodes["address"]],
                       env=two_nodes["env"], capture_output=True, text=True, timeout=300)
