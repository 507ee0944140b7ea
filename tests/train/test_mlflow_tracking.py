"""Retraining tracked in MLflow: a scheduled retrain shows up in a real MLflow server with its
data version, parameters, loss curve and gate verdict; the registry and the run name each other.

Real everything: ``mlflow server`` (.venv-mlflow, `make mlflow`) on loopback with a SQLite store,
written by groundlabel's own client (mlflow-skinny in .venv), read back through the server's REST
API; a real Ray Train LoRA run on the bundled tiny model and the real vLLM gate. Without
.venv-mlflow the tests skip, unless GROUNDLABEL_REQUIRE_MLFLOW is set (CI).

    .venv/bin/pytest -q tests/train/test_mlflow_tracking.py
    # the README's screenshots (docs/img/mlflow-run.png, docs/img/mlflow-loss.png):
    GROUNDLABEL_MLFLOW_SCREENSHOTS=docs/img .venv/bin/pytest -q \\
        tests/train/test_mlflow_tracking.py -k chromium
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from mlflow_server import mlflow_available, start_mlflow
from support import free_port

from grounding.registry import AdapterRegistry

# MLflow's client and server send usage telemetry to MLflow's hosts unless told not to; tests
# reach nothing but loopback (the server's own environment says the same, mlflow_server.py).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

REPO = Path(__file__).resolve().parents[2]
EXPERIMENT = "groundlabel-test"

# The smallest real training: ~30 single-object shifted-domain items, plain LoRA, 2 epochs of
# batches of 4 (about 16 steps), and a gate that may decide on few held-out items.
SMALL = {"epochs": 2, "batch_size": 4, "quantize": "none", "cpus_per_worker": 1,
         "max_minutes": 3, "holdout_frac": 0.25, "min_heldout": 5}


def _store(tmp: Path, n: int) -> str:
    """A reviewed-label store (version 1) of ``n`` single-object shifted-domain labels."""
    from grounding.synth import SynthConfig, write_dataset
    from pipelines.review import ImportConfig, import_labels

    data = write_dataset(tmp / "synth", n, "shifted", seed=11,
                         cfg=SynthConfig(min_objects=1, max_objects=1))
    store = str(tmp / "store")
    import_labels(ImportConfig(input=str(data), from_fmt="seed", store=store, reviewer="test"))
    return store


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory):
    if not mlflow_available():
        msg = "no MLflow server venv (.venv-mlflow): run `make mlflow`"
        if os.environ.get("GROUNDLABEL_REQUIRE_MLFLOW"):
            pytest.fail(msg + " (GROUNDLABEL_REQUIRE_MLFLOW is set)")
        pytest.skip(msg)
    with start_mlflow(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


def _api(url: str, path: str, **params) -> dict:
    r = requests.get(f"{url}/api/2.0/mlflow/{path}", params=params, timeout=30)
    assert r.status_code == 200, (path, r.status_code, r.text[:500])
    return r.json()


def _runs(url: str) -> list[dict]:
    exp = _api(url, "experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    r = requests.post(f"{url}/api/2.0/mlflow/runs/search", timeout=30,
                      json={"experiment_ids": [exp["experiment_id"]], "max_results": 100})
    assert r.status_code == 200, r.text[:500]
    return r.json().get("runs", [])


def _kv(entries: list[dict] | None) -> dict:
    return {e["key"]: e["value"] for e in entries or []}


def _history(url: str, run_id: str, key: str) -> list[tuple[int, float]]:
    got = _api(url, "metrics/get-history", run_id=run_id, metric_key=key, max_results=25000)
    return sorted((int(m.get("step", 0)), m["value"]) for m in got.get("metrics", []))


@pytest.fixture(scope="module")
def scheduled(tmp_path_factory, ray_local, mlflow_url):
    """``groundlabel schedule --once`` finds enough new labels and trains, tracked in MLflow."""
    from train.schedule import ScheduleConfig, run

    tmp = tmp_path_factory.mktemp("tracked")
    store = _store(tmp, 40)
    reg = str(tmp / "registry")
    logs: list[str] = []
    t0 = time.time()
    cfg = ScheduleConfig(store=store, registry=reg, once=True, min_new_labels=10,
                         storage_path=str(tmp / "ray-train"), mlflow_tracking_uri=mlflow_url,
                         mlflow_experiment=EXPERIMENT, **SMALL)
    (tick,) = run(cfg, logs.append)
    assert tick["action"] == "retrained", tick
    print(f"\ntracked scheduled retrain: {time.time() - t0:.0f} s")
    return {"tick": tick, "res": tick["result"], "store": store, "registry": reg,
            "url": mlflow_url, "tmp": tmp, "cfg": cfg}


@pytest.mark.slow
def test_scheduled_retrain_is_an_mlflow_run(scheduled):
    url, res = scheduled["url"], scheduled["res"]
    run_id = res["mlflow"]["run_id"]
    assert res["mlflow"]["tracking_uri"] == url and res["mlflow"]["errors"] == []
    (run,) = [r for r in _runs(url) if r["info"]["run_id"] == run_id]
    assert run["info"]["status"] == "FINISHED"
    params, tags = _kv(run["data"].get("params")), _kv(run["data"].get("tags"))
    metrics = _kv(run["data"].get("metrics"))
    tm, gate = res["train_metrics"], res["gate"]

    # parameters: the recipe, the quantization and why, the world size, the data
    assert params["rank"] == "16" and float(params["lr"]) == 2e-3
    assert params["epochs"] == "2.0" and params["batch_size"] == "4"
    assert params["quantize"] == "none" and params["quantization"] == "none"
    assert params["quantization_reason"] == "quantize=none"
    assert params["num_workers"] == "1" and params["world_size"] == "1"
    assert params["store"] == scheduled["store"] and params["snapshot_version"] == "1"
    assert res["train_items"] > 0 and params["train_items"] == str(res["train_items"])
    assert res["heldout_items"] > 0 and params["heldout_items"] == str(res["heldout_items"])

    # the data: the store's Delta table at the snapshot version, training list and held-out
    inputs = {_kv(i.get("tags"))["mlflow.data.context"]: i["dataset"]
              for i in run["inputs"]["dataset_inputs"]}
    assert set(inputs) == {"training", "heldout"}
    for context, n in (("training", res["train_items"]), ("heldout", res["heldout_items"])):
        ds = inputs[context]
        assert ds["source_type"] == "delta_table" and ds["name"] == f"reviewed-labels@v1/{context}"
        source = json.loads(ds["source"])
        assert source["path"] == scheduled["store"] and source["delta_table_version"] == 1
        assert json.loads(ds["profile"])["num_rows"] == n and ds["digest"]

    # the loss curve and the learning rate at every optimizer step
    loss, lr = _history(url, run_id, "loss"), _history(url, run_id, "lr")
    steps = tm["step"]
    assert steps >= 10 and [s for s, _ in loss] == [s for s, _ in lr] == list(range(1, steps + 1))
    assert all(0 < v < 100 for _, v in loss)
    assert all(0 < v <= 2e-3 for _, v in lr) and lr[-1][1] < max(v for _, v in lr)  # decays
    assert loss[0][1] == pytest.approx(tm["first_loss"], rel=1e-4)
    assert "history" not in tm  # the curve goes to MLflow, not into the registry's meta

    # the gate's figures and its verdict
    h = gate["heldout"]
    assert metrics["gate/heldout/n"] == h["n"] > 0
    assert metrics["gate/heldout/candidate"] == h["candidate"]
    assert metrics["gate/heldout/production"] == h["production"]
    assert metrics["gate/heldout/candidate_only"] == h["candidate_only"]
    assert metrics["gate/heldout/production_only"] == h["production_only"]
    assert metrics["gate/heldout/p_better"] == pytest.approx(h["p_better"])
    assert metrics["gate/passed"] == float(gate["passed"])
    assert metrics["train/step"] == steps
    assert tags["groundlabel.verdict"] == ("passed" if gate["passed"] else "refused")
    assert tags["groundlabel.reasons"] == ("; ".join(gate["reasons"]) or "none")

    # the run names the adapter, its place in the registry, the decision; and what started it
    name = res["adapter"]
    assert tags["groundlabel.adapter"] == name
    assert tags["groundlabel.adapter_uri"] == f"{scheduled['registry']}/adapters/{name}"
    assert tags["groundlabel.decision"] == res["decision"]
    assert tags["groundlabel.promoted"] == str(res["decision"] == "promoted").lower()
    assert tags["groundlabel.event"] == str(res["event"])
    assert tags["groundlabel.trigger"] == "schedule" and tags["groundlabel.cron"] == "once"
    assert tags["groundlabel.new_labels"] == "40" and tags["groundlabel.since_version"] == "0"
    assert tags["mlflow.runName"] == params["run_name"] and params["run_name"].startswith("retrain-")

    # artifacts: train_metrics.json (and the whole verdict), through the server
    files = {f["path"] for f in _api(url, "artifacts/list", run_id=run_id).get("files", [])}
    assert {"train_metrics.json", "gate.json"} <= files, files
    r = requests.get(f"{url}/get-artifact", params={"path": "train_metrics.json",
                                                    "run_uuid": run_id}, timeout=30)
    assert r.status_code == 200 and json.loads(r.text)["step"] == steps

    # the registry's record of the adapter names the run
    meta = AdapterRegistry(scheduled["registry"]).show(name)
    assert meta["mlflow_run_id"] == run_id and meta["mlflow_tracking_uri"] == url
    assert meta["mlflow_experiment_id"] == run["info"]["experiment_id"]
    print(f"\nrun {run_id}: {steps} steps, loss {loss[0][1]:.3f} -> {loss[-1][1]:.3f}; "
          f"{gate['summary']}; {res['decision']}")


@pytest.mark.slow
def test_retrain_reads_the_tracking_uri_from_the_environment(scheduled, monkeypatch, tmp_path):
    """MLFLOW_TRACKING_URI alone is enough: ``retrain --candidate`` (gated, not trained) is a
    second run, tagged as a retrain, with the gate's figures and no loss curve."""
    from train.retrain import RetrainConfig, retrain

    url = scheduled["url"]
    reg = AdapterRegistry(scheduled["registry"])
    candidate = reg.download(scheduled["res"]["adapter"], tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    res = retrain(RetrainConfig(store=scheduled["store"], registry=scheduled["registry"],
                                candidate=str(candidate), holdout_frac=0.25, min_heldout=5))
    run_id = res["mlflow"]["run_id"]
    assert run_id != scheduled["res"]["mlflow"]["run_id"]
    (run,) = [r for r in _runs(url) if r["info"]["run_id"] == run_id]
    tags, params = _kv(run["data"]["tags"]), _kv(run["data"]["params"])
    assert tags["groundlabel.trigger"] == "retrain" and tags["groundlabel.adapter"] == res["adapter"]
    assert params["trained"] == "False" and params["candidate"] == str(candidate)
    assert _history(url, run_id, "loss") == []
    assert _kv(run["data"]["metrics"])["gate/heldout/n"] == res["gate"]["heldout"]["n"]
    assert reg.show(res["adapter"])["mlflow_run_id"] == run_id


@pytest.mark.slow
def test_without_a_tracking_uri_mlflow_is_never_imported(scheduled, tmp_path):
    """A whole retrain (gate, register) in a fresh interpreter with no tracking URI: mlflow never
    imported, nothing of MLflow in the result or the registry."""
    reg = str(tmp_path / "registry")
    candidate = AdapterRegistry(scheduled["registry"]).download(scheduled["res"]["adapter"],
                                                                tmp_path / "cand")
    code = f"""
import json, sys
from train.retrain import RetrainConfig, retrain
res = retrain(RetrainConfig(store={scheduled['store']!r}, registry={reg!r},
                            candidate={str(candidate)!r}, holdout_frac=0.25, min_heldout=5,
                            ray_num_cpus=2))
print("RESULT " + json.dumps({{"keys": sorted(res), "adapter": res["adapter"],
    "mlflow": sorted(m for m in sys.modules if m == "mlflow" or m.startswith("mlflow."))}}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    (line,) = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    out = json.loads(line[len("RESULT "):])
    assert out["mlflow"] == [] and "mlflow" not in out["keys"]
    meta = AdapterRegistry(reg).show(out["adapter"])
    assert not [k for k in meta if k.startswith("mlflow")]


@pytest.mark.slow
def test_a_server_gone_mid_run_costs_seconds_and_loses_nothing(mlflow_url, tmp_path):
    """The run is created, then its server stops: the rest of what a retrain sends (the loss
    curve, the result, the end) is skipped after one quick probe, listed in ``errors``, and
    never raises: the retrain goes on to register and promote as without tracking."""
    from train.config import RetrainConfig
    from train.tracking import Tracking

    items = [{"item_id": f"i{i}", "image": f"/img/{i}.png", "text": "the red square",
              "boxes": [[1, 2, 3, 4]]} for i in range(4)]
    with start_mlflow(tmp_path / "doomed") as url:
        t = Tracking.start(RetrainConfig(store="/s", registry="/r", mlflow_tracking_uri=url,
                                         mlflow_experiment=EXPERIMENT))
        t.data("/s", 1, items, items[:1], "retrain-doomed", {})
    t0 = time.time()
    with t:  # ends the run, or here: would
        t.steps([[1, 2.0, 1e-3, 0.1], [2, 1.5, 9e-4, 0.2]])
        t.finish({"adapter": "gl-x", "decision": "promoted", "event": 1,
                  "train_metrics": {"step": 2}, "gate": {"passed": True, "reasons": []}}, "/r")
    assert time.time() - t0 < 30
    assert t.lost and len(t.errors) == 1 and "unreachable" in t.errors[0], t.errors
    assert t.meta()["mlflow_run_id"] == t.run_id  # the registry still names the run


def test_an_unreachable_tracking_server_stops_the_retrain_before_training(tmp_path):
    """``--mlflow-tracking-uri`` naming a closed port: one clear error at once (exit 2, no
    traceback), nothing read, trained or registered; a scheduler tick skips and says why."""
    from train.schedule import ScheduleConfig, check

    store = _store(tmp_path, 12)
    reg, ray_train = tmp_path / "registry", tmp_path / "ray-train"
    bad = f"http://127.0.0.1:{free_port()}"
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "groundlabel", "retrain", "--store", store,
                        "--registry", str(reg), "--storage-path", str(ray_train),
                        "--mlflow-tracking-uri", bad],
                       capture_output=True, text=True, timeout=120, cwd=REPO,
                       env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")})
    took = time.time() - t0
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    (err,) = [x for x in p.stderr.splitlines() if x.startswith("groundlabel retrain: error:")]
    assert err.startswith("groundlabel retrain: error: MLflow tracking server " + bad), err
    assert "unreachable" in err and "nothing was trained" in err
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    assert took < 60, took
    assert not ray_train.exists() and AdapterRegistry(str(reg)).list() == []

    logs: list[str] = []
    tick = check(ScheduleConfig(store=store, registry=str(reg), min_new_labels=1,
                                storage_path=str(ray_train), mlflow_tracking_uri=bad),
                 logs.append)
    assert tick["action"].startswith("skip: MLflow tracking server " + bad), tick
    assert "unreachable" in json.loads(logs[0])["action"] and not ray_train.exists()


@pytest.mark.slow
def test_run_page_in_headless_chromium(scheduled, tmp_path, monkeypatch):
    """The run as a person sees it in the MLflow UI: its page names the adapter and shows the
    data, the gate and the parameters; its metrics tab draws the loss and learning-rate curves.
    The screenshots are the README's (with GROUNDLABEL_MLFLOW_SCREENSHOTS=docs/img)."""
    chromium, chromedriver = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
    if not chromium.exists():
        msg = f"{chromium} not installed (make browser)"
        if os.environ.get("GROUNDLABEL_REQUIRE_BROWSER"):
            pytest.fail(msg + " and GROUNDLABEL_REQUIRE_BROWSER is set")
        pytest.skip(msg)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never download anything
    url, res = scheduled["url"], scheduled["res"]
    page = f"{url}/#/experiments/{res['mlflow']['experiment_id']}/runs/{res['mlflow']['run_id']}"
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(chromium)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,1400"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(chromedriver)), options=opts)
    shots = []

    def text(d) -> str:
        return d.find_element("tag name", "body").text

    def shot(name: str) -> None:
        time.sleep(2)  # let the charts settle
        path = tmp_path / name
        assert driver.save_screenshot(str(path)) and path.stat().st_size > 20_000
        shots.append(path)

    try:
        driver.set_page_load_timeout(60)
        driver.get(f"{url}/")
        # the classic run page: the "model training" side of the UI, the assistant panel shut
        driver.execute_script(
            "localStorage.setItem('mlflow.workflowType_v1', '\"machine_learning\"');"
            "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
            "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');")
        driver.get(page)
        driver.refresh()
        WebDriverWait(driver, 90).until(
            lambda d: res["adapter"] in text(d) and "reviewed-labels@v1/training" in text(d))
        body = text(driver)
        assert "Finished" in body and res["decision"] in body, body
        for needle in ("groundlabel.decision", "gate/heldout/p_better", "quantization_reason",
                       "snapshot_version"):
            assert needle in body, needle
        shot("mlflow-run.png")

        driver.get(page + "/model-metrics")
        WebDriverWait(driver, 90).until(lambda d: "Search metric charts" in d.page_source)
        driver.set_window_size(1400, 820)
        driver.find_element("css selector", "input[placeholder='Search metric charts']") \
            .send_keys("^(loss|lr)$")
        WebDriverWait(driver, 30).until(lambda d: "(loss)" in text(d) and "(lr)" in text(d))
        shot("mlflow-loss.png")
    finally:
        driver.quit()
    if os.environ.get("GROUNDLABEL_MLFLOW_SCREENSHOTS"):
        import shutil

        for path in shots:
            shutil.copy(path, Path(os.environ["GROUNDLABEL_MLFLOW_SCREENSHOTS"]) / path.name)
