"""A real two-node Ray cluster on this machine: a head and a worker as separate `ray start`
processes, each with its own resources, and the custom resource `inference` on the worker only.
A labeling job goes in through the Ray Jobs API (`ray job submit`) asking its engines for
`inference`; the test checks where the work ran and that the output is complete, then tears
both nodes down."""

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


def test_label_job_runs_on_both_nodes(synth_shard, tmp_path):
    gcs, dash = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(16).hex(), OMP_NUM_THREADS="1",
               # a busy 2-core machine starts a node's agents slowly: give them time
               RAY_agent_register_timeout_ms="180000")
    head = ray_node(["--head", f"--port={gcs}", "--num-cpus=2", "--resources={\"head\": 1}",
                  "--include-dashboard=true", f"--dashboard-port={dash}",
                  "--dashboard-host=127.0.0.1", f"--ray-client-server-port={free_port()}"],
                 env, tmp_path / "head.log")
    procs = [head]
    try:
        wait_for(lambda: port_open(gcs) and port_open(dash), "the head", procs)
        worker = ray_node([f"--address=127.0.0.1:{gcs}", "--num-cpus=2",
                        "--resources={\"inference\": 1}"], env, tmp_path / "worker.log")
        procs.append(worker)

        addr = f"http://127.0.0.1:{dash}"

        def state(kind: str) -> list[dict]:
            return ray_state(kind, addr, env)

        def nodes():
            return [n for n in state("nodes") if n["state"] == "ALIVE"]

        wait_for(lambda: len(nodes()) == 2, "two alive nodes", procs)
        by_res = {("inference" in n["resources_total"]): n["node_id"] for n in nodes()}
        worker_id, head_id = by_res[True], by_res[False]

        out = tmp_path / "out"
        cmd = [RAY, "job", "submit", "--address", addr, "--", sys.executable, "-m",
               "groundlabel", "label", "--input", str(synth_shard), "--output", str(out),
               "--actor-resources", '{"inference": 1}', "--cpus-per-actor", "1",
               "--fetch-batch-size", "2", "--batch-size", "4", "--rows-per-part", "4",
               "--no-progress"]
        for _ in range(30):
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if "No available agent" not in res.stdout + res.stderr:
                break  # (the job agent starts after the dashboard; nothing was submitted)
            time.sleep(2)
        assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
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
    finally:
        stop_nodes(procs)
