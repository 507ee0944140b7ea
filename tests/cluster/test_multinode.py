"""A real two-node Ray cluster on this machine: a head and a worker as separate `ray start`
processes, each with its own resources, and the custom resource `inference` on the worker only.
A labeling job goes in through the Ray Jobs API (`ray job submit`) asking its engines for
`inference`; the test checks where the work ran and that the output is complete, then tears
both nodes down."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import free_port

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


def _node(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    # --block keeps each node's processes in its own process group, so the test stops exactly
    # this cluster (`ray stop` would stop every Ray on the machine).
    own_ports = [f"--dashboard-agent-listen-port={free_port()}",
                 f"--dashboard-agent-grpc-port={free_port()}",
                 f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *own_ports, *args],
                            env=env, start_new_session=True, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def _wait(pred, what: str, procs, timeout: float = 180):
    deadline = time.time() + timeout
    while not pred():
        assert all(p.poll() is None for p in procs), f"a node exited while waiting for {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def test_label_job_runs_on_both_nodes(synth_shard, tmp_path):
    gcs, dash = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(16).hex(), OMP_NUM_THREADS="1",
               # a busy 2-core machine starts a node's agents slowly: give them time
               RAY_agent_register_timeout_ms="180000")
    head = _node(["--head", f"--port={gcs}", "--num-cpus=2", "--resources={\"head\": 1}",
                  "--include-dashboard=true", f"--dashboard-port={dash}",
                  "--dashboard-host=127.0.0.1", f"--ray-client-server-port={free_port()}"],
                 env, tmp_path / "head.log")
    procs = [head]
    try:
        def up(port):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False

        _wait(lambda: up(gcs) and up(dash), "the head", procs)
        worker = _node([f"--address=127.0.0.1:{gcs}", "--num-cpus=2",
                        "--resources={\"inference\": 1}"], env, tmp_path / "worker.log")
        procs.append(worker)

        addr = f"http://127.0.0.1:{dash}"

        def state(kind: str) -> list[dict]:
            # In a subprocess: the token and address are this cluster's, not the session's Ray.
            code = ("import json, sys; from ray.util import state; "
                    f"print(json.dumps([dict(x.__dict__) for x in state.list_{kind}("
                    f"address={addr!r}, limit=10000, detail=True)], default=str))")
            r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                               text=True, timeout=120)
            return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else []

        def nodes():
            return [n for n in state("nodes") if n["state"] == "ALIVE"]

        _wait(lambda: len(nodes()) == 2, "two alive nodes", procs)
        by_res = {("inference" in n["resources_total"]): n["node_id"] for n in nodes()}
        worker_id, head_id = by_res[True], by_res[False]

        out = tmp_path / "out"
        cmd = [RAY, "job", "submit", "--address", addr, "--", sys.executable, "-m",
               "groundlabel.cli", "label", "--input", str(synth_shard), "--output", str(out),
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
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
