"""Under ``RAY_ADDRESS`` (what ``ray job submit`` sets for its entrypoint) or ``--ray-address``,
a scheduled retrain, a merge and an endpoint run ON that cluster, not on a private local Ray:
the cluster is a real ``ray start`` head process of its own, and the test asks the cluster
itself what ran there. (A retrain sent through the Jobs API to two nodes: test_multinode.py.)

Before the one `RaySettings.connect`, both started ``ray.init(address="local")`` and so never
reached the cluster's (GPU) workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from support import free_port, port_open, ray_node, ray_state, stop_nodes, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-node Ray cluster (its own processes, ports and temp dir); yields its address,
    dashboard URL and the environment a process needs to be sent to it."""
    import shutil
    import tempfile

    tmp = tmp_path_factory.mktemp("cluster")
    # Ray's session sockets must fit AF_UNIX's 107 bytes: a short temp dir, not pytest's
    ray_tmp = tempfile.mkdtemp(prefix="glray-", dir="/tmp")
    gcs, dash = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Token authentication, as a real cluster has (and so that a token file another test left
    # in ~/.ray cannot make the head and its clients disagree); every client gets the token.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(16).hex(), OMP_NUM_THREADS="1",
               RAY_agent_register_timeout_ms="180000")
    head = ray_node(["--head", f"--port={gcs}", "--num-cpus=4", "--include-dashboard=true",
                     f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
                     f"--ray-client-server-port={free_port()}", f"--temp-dir={ray_tmp}"],
                    env, tmp / "head.log")
    try:
        wait_for(lambda: port_open(gcs) and port_open(dash), "the head", [head])
        dashboard = f"http://127.0.0.1:{dash}"
        wait_for(lambda: ray_state("nodes", dashboard, env), "the head's state API", [head])
        yield {"address": f"127.0.0.1:{gcs}", "port": str(gcs), "dashboard": dashboard,
               "env": dict(env, RAY_ADDRESS=f"127.0.0.1:{gcs}")}
    finally:
        stop_nodes([head])
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _actor_classes(cluster) -> list[str]:
    return [a["class_name"] or "" for a in ray_state("actors", cluster["dashboard"], cluster["env"])]


def test_schedule_with_ray_address_trains_on_that_cluster(cluster, tmp_path):
    """`schedule --once --ray-address ADDR` (the flag, RAY_ADDRESS unset) retrains there."""
    from grounding.synth import write_dataset
    from pipelines.review import ImportConfig, import_labels

    # 40 images: the held-out side is a hash of each image's path (under pytest's tmp dir, so
    # it changes per run); with 16, no image was held out in about 1 run in 35 (0.8 ** 16)
    data = write_dataset(tmp_path / "synth", 40, "shifted", seed=11)
    store, reg = str(tmp_path / "store"), str(tmp_path / "reg")
    import_labels(ImportConfig(input=str(data), from_fmt="seed", store=store))
    cmd = [sys.executable, "-m", "groundlabel", "schedule", "--once", "--min-new-labels", "1",
           "--store", store, "--registry", reg, "--ray-address", cluster["address"],
           "--max-items", "4", "--epochs", "1", "--batch-size", "2", "--cpus-per-worker", "1",
           "--storage-path", str(tmp_path / "ray-train"), "--no-promote"]
    env = {k: v for k, v in cluster["env"].items() if k != "RAY_ADDRESS"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    tick = json.loads([x for x in res.stdout.splitlines() if x.startswith("{")][-1])
    assert tick["action"] == "retrained", tick
    # the GCS this retrain was connected to: the cluster's port (it reports its node's IP)
    cluster_gcs = tick["result"]["train_metrics"]["ray_cluster"]
    assert cluster_gcs.rsplit(":", 1)[1] == cluster["port"]
    # The cluster itself saw the Ray Train workers (they are gone from a private Ray).
    assert any("TrainWorker" in c for c in _actor_classes(cluster)), _actor_classes(cluster)


def test_merge_under_ray_address_runs_as_a_task_on_that_cluster(cluster, tmp_path,
                                                                 random_adapter):
    out = tmp_path / "merged"
    res = subprocess.run([sys.executable, "-m", "groundlabel", "merge", "--adapter",
                          str(random_adapter), "--out", str(out), "--dtype", "float32"],
                         env=cluster["env"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    tasks = ray_state("tasks", cluster["dashboard"], cluster["env"])
    merges = [t for t in tasks if t["name"] == "groundlabel-merge"]
    assert merges and merges[-1]["state"] == "FINISHED", [t["name"] for t in tasks]


def test_serve_under_ray_address_deploys_on_that_cluster(cluster, tmp_path):
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "groundlabel", "serve", "--port", str(port)],
                            env=cluster["env"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_for(healthy, "the endpoint", [proc], timeout=600)
        # /readyz can answer just before `serve.run` returns and the CLI prints its line
        # (seen once in a fresh-clone CI run): wait for the line too
        wait_for(lambda: "on the Ray cluster at " in (tmp_path / "serve.log").read_text(),
                 "the serve line", [proc], timeout=60)
        classes = _actor_classes(cluster)
        assert any("ServeController" in c for c in classes), classes
        assert any("GroundingService" in c for c in classes), classes
        assert f":{cluster['port']}" in (tmp_path / "serve.log").read_text().split(
            "on the Ray cluster at ", 1)[1].split()[0]
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # serve.shutdown() on the cluster
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        time.sleep(1)
