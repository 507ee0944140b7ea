"""A retrain as an MLflow run: what trained the adapter, how it trained, what the gate said.

With ``--mlflow-tracking-uri`` (or ``MLFLOW_TRACKING_URI``) every ``groundlabel retrain``, and
every ``groundlabel schedule`` tick that trains, is one run in the experiment
``--mlflow-experiment`` (or ``MLFLOW_EXPERIMENT_NAME``, else ``groundlabel-retrain``):

- **parameters**: the recipe (`train.config.recipe_of`), the quantization asked for and the one
  used with its reason, the world size, the base model, the store, its version, the row counts;
- **inputs**: the training list and the held-out split as MLflow datasets (contexts
  ``training`` and ``heldout``) whose source is the reviewed-label store's Delta table at the
  snapshot version (``DeltaTable(store, version=...)`` holds exactly those labels);
- **metrics**: ``loss`` and ``lr`` at every optimizer step, the training summary
  (``train/...``) and the gate's figures (``gate/...``: n, both Acc@0.5 scores, the discordant
  counts, the p-values, passed);
- **tags**: the adapter's registry name and URI (``groundlabel.adapter``,
  ``groundlabel.registry``, ``groundlabel.adapter_uri``), the decision, promoted or not, the
  registry event, the gate's verdict and reasons, what triggered the run;
- **artifacts**: ``train_metrics.json`` and ``gate.json`` (the whole verdict).

The registry's record of the adapter names the run back (``mlflow_run_id``,
``mlflow_tracking_uri``, ``mlflow_experiment_id`` in its meta).

Failures. The server is checked, and the run created, when the retrain starts, before any
label is read or any step trained: an unreachable server stops the retrain at once with a
`TrackingError` (a scheduler tick is skipped and logged; the next tick tries again), so no
training is ever thrown away for want of a tracking server. Once training started, a tracking
call that fails is logged as a warning and listed in the result's ``mlflow.errors``: the
adapter is still registered, gated and promoted as without tracking. An HTTP server is probed
(seconds) before each part is sent (data, curve, result, end): once it stops answering nothing
more is sent, so a server gone mid-retrain costs seconds, not the client's retries (minutes)
at every call.

Without a tracking URI nothing here runs and mlflow is never imported.
"""

from __future__ import annotations

import json
import logging
import os
import time
from urllib.parse import urlsplit, urlunsplit

from train.config import recipe_of

log = logging.getLogger("groundlabel.tracking")

DEFAULT_EXPERIMENT = "groundlabel-retrain"


class TrackingError(RuntimeError):
    """The MLflow tracking server cannot be used: raised before anything was trained."""


def redact(uri: str) -> str:
    """``uri`` without a password in its user part (it is recorded in the registry)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def _flat(prefix: str, value, out: dict) -> dict:
    """Numbers (and booleans as 0/1) of a nested dict as ``prefix/key/...`` metrics."""
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}/{k}".replace("@", "_at_"), v, out)
    elif isinstance(value, bool):
        out[prefix] = float(value)
    elif isinstance(value, int | float) and value == value:  # not NaN
        out[prefix] = float(value)
    return out


class Tracking:
    """One retrain's MLflow run, or nothing (``enabled`` False: every method returns at once).

    ``with Tracking.start(cfg) as t:`` creates the run (checking the server first) and ends it
    FINISHED, or FAILED with the error when the block raises.
    """

    def __init__(self, uri: str | None = None, client=None, run_id: str | None = None,
                 experiment_id: str | None = None):
        self.uri, self.client, self.run_id, self.experiment_id = uri, client, run_id, experiment_id
        self.errors: list[str] = []
        self.lost = False  # the server stopped answering: nothing more is sent
        self._http_uri: str | None = None  # probed before each step of the retrain

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    # -- the run ------------------------------------------------------------------------------
    @classmethod
    def start(cls, cfg, trigger: dict | None = None) -> Tracking:
        """The run of a retrain with ``cfg`` (a `RetrainConfig`); a disabled one without a
        tracking URI. Raises `TrackingError` when the server cannot be reached or refuses."""
        uri = cfg.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            return cls()
        experiment = (cfg.mlflow_experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")
                      or DEFAULT_EXPERIMENT)
        where = f"MLflow tracking server {redact(uri)} (--mlflow-tracking-uri / MLFLOW_TRACKING_URI)"
        if urlsplit(uri).scheme in ("http", "https"):
            _check_server(uri, where)
        try:
            from mlflow import MlflowClient
            from mlflow.exceptions import MlflowException

            client = MlflowClient(tracking_uri=uri)
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                try:
                    exp_id = client.create_experiment(experiment)
                except MlflowException:  # created meanwhile by another retrain
                    exp_id = client.get_experiment_by_name(experiment).experiment_id
            else:
                exp_id = exp.experiment_id
            tags = {"groundlabel.verb": "retrain", "groundlabel.store": cfg.store,
                    "groundlabel.registry": cfg.registry}
            tags |= {f"groundlabel.{k}": str(v)
                     for k, v in ({"trigger": "retrain"} | (trigger or {})).items()}
            run = client.create_run(exp_id, tags=tags, run_name=cfg.run_name)
        except Exception as e:  # noqa: BLE001 - whatever it is, nothing was trained: say so
            raise TrackingError(f"{where}: cannot create a run in experiment {experiment!r} "
                                f"({e!r:.500}); nothing was trained") from e
        t = cls(redact(uri), client, run.info.run_id, exp_id)
        if urlsplit(uri).scheme in ("http", "https"):
            t._http_uri = uri
        log.warning("MLflow run %s in experiment %s at %s", t.run_id, experiment, t.uri)
        t._params(_config_params(cfg))
        return t

    def __enter__(self) -> Tracking:
        return self

    def __exit__(self, kind, err, tb) -> None:
        if not self._alive("end of run"):
            return
        if err is not None:
            self._call(self.client.set_tag, self.run_id, "groundlabel.error", f"{err!r:.4000}")
        self._call(self.client.set_terminated, self.run_id, "FAILED" if err else "FINISHED")

    def meta(self) -> dict:
        """What the registry records of the run (empty without tracking)."""
        if not self.enabled:
            return {}
        return {"mlflow_run_id": self.run_id, "mlflow_tracking_uri": self.uri,
                "mlflow_experiment_id": self.experiment_id}

    def summary(self) -> dict:
        """The run, for the retrain's result (empty without tracking)."""
        if not self.enabled:
            return {}
        return {"mlflow": {"run_id": self.run_id, "tracking_uri": self.uri,
                           "experiment_id": self.experiment_id, "errors": self.errors}}

    # -- what a retrain records ---------------------------------------------------------------
    def data(self, store: str, version: int, train_items: list[dict], held: list[dict],
             run_name: str, replay: dict) -> None:
        """Before training: the snapshot (store URI and version), the row counts, the training
        list and the held-out split as dataset inputs."""
        if not self._alive("data"):
            return
        self._params({"store": store, "snapshot_version": version,
                      "train_items": len(train_items), "heldout_items": len(held),
                      "run_name": run_name, "replay.since_version": replay.get("since_version"),
                      "replay.earlier_entries": replay.get("earlier_entries")})
        self._tags({"mlflow.runName": run_name, "groundlabel.snapshot_version": version})
        self._call(self._inputs, store, version, {"training": train_items, "heldout": held})

    def steps(self, history: list, start_ms: int | None = None) -> None:
        """``loss`` and ``lr`` at every optimizer step: ``history`` rows are
        ``[step, loss, lr, train seconds]`` (`train.worker`)."""
        if not history or not self._alive("steps"):
            return
        from mlflow.entities import Metric

        t0 = start_ms or int(time.time() * 1000)
        rows = []
        for step, loss, lr, train_s in history:
            ts = t0 + int(1000 * train_s)
            rows += [Metric("loss", float(loss), ts, int(step)),
                     Metric("lr", float(lr), ts, int(step))]
        for i in range(0, len(rows), 1000):  # MLflow's limit per batch
            self._call(self.client.log_batch, self.run_id, metrics=rows[i:i + 1000])

    def finish(self, result: dict, registry: str) -> None:
        """After the decision: the training summary, the gate's figures and verdict, the
        adapter's name and place in the registry, and the artifacts."""
        if not self._alive("result"):
            return
        tm = result.get("train_metrics") or {}
        self._params({"quantization": tm.get("quantization"),
                      "quantization_reason": tm.get("quantization_reason"),
                      "world_size": tm.get("world_size"), "trained": tm.get("trained", True)})
        gate = result.get("gate") or {}
        metrics = _flat("train", {k: v for k, v in tm.items() if k != "ray_cluster"}, {})
        for part in ("heldout", "new", "old", "regression"):
            cmp = gate.get(part) or {}
            _flat(f"gate/{part}", {k: cmp.get(k) for k in (
                "n", "unreadable", "candidate", "production", "diff", "candidate_only",
                "production_only", "p_better", "p_worse")}, metrics)
        metrics["gate/passed"] = float(bool(gate.get("passed")))
        self._metrics(metrics)
        name = result.get("adapter")
        decision = result.get("decision")
        self._tags({"groundlabel.adapter": name, "groundlabel.registry": registry,
                    "groundlabel.adapter_uri": f"{registry.rstrip('/')}/adapters/{name}",
                    "groundlabel.decision": decision,
                    "groundlabel.promoted": str(decision == "promoted").lower(),
                    "groundlabel.event": result.get("event"),
                    "groundlabel.production": result.get("production"),
                    "groundlabel.verdict": "passed" if gate.get("passed") else "refused",
                    "groundlabel.reasons": "; ".join(gate.get("reasons") or []) or "none",
                    "groundlabel.gate": gate.get("summary")})
        for what, path in ((tm, "train_metrics.json"), (gate, "gate.json")):
            self._call(self.client.log_text, self.run_id,
                       json.dumps(what, indent=2, default=str), path)

    # -- plumbing -----------------------------------------------------------------------------
    def _alive(self, what: str) -> bool:
        """Whether to send ``what``: not without a run, nor once the server stopped answering
        (every call would first wait out the client's retries, minutes, before failing)."""
        if not self.enabled or self.lost:
            return False
        if self._http_uri and (problem := _probe(self._http_uri)) is not None:
            self.lost = True
            msg = f"{what}: the server {problem}; nothing more is sent to this run"
            log.warning("MLflow run %s at %s: %s", self.run_id, self.uri, msg)
            self.errors.append(msg)
            return False
        return True

    def _call(self, fn, *args, **kw):
        """A tracking call that must not fail the retrain: an error is logged and kept."""
        try:
            return fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 - tracking is secondary to the adapter
            msg = f"{getattr(fn, '__name__', fn)}: {e!r:.300}"
            log.warning("MLflow run %s at %s: %s", self.run_id, self.uri, msg)
            self.errors.append(msg)
            return None

    def _params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items() if v is not None]
        for i in range(0, len(items), 100):  # MLflow's limit per batch
            self._call(self.client.log_batch, self.run_id, params=items[i:i + 100])

    def _tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:8000]) for k, v in tags.items() if v is not None]
        self._call(self.client.log_batch, self.run_id, tags=items)

    def _metrics(self, metrics: dict) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, v, ts, 0) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self._call(self.client.log_batch, self.run_id, metrics=items[i:i + 1000])

    def _inputs(self, store: str, version: int, parts: dict[str, list[dict]]) -> None:
        import mlflow.data
        import pandas as pd
        from mlflow.data.delta_dataset_source import DeltaDatasetSource
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        source = DeltaDatasetSource(path=store, delta_table_version=version)
        inputs = []
        for context, items in parts.items():
            df = pd.DataFrame({"item_id": [it["item_id"] for it in items],
                               "image": [it["image"] for it in items],
                               "text": [it["text"] for it in items],
                               "boxes": [json.dumps(it.get("boxes")) for it in items]})
            ds = mlflow.data.from_pandas(df, source=source,
                                         name=f"reviewed-labels@v{version}/{context}")
            inputs.append(DatasetInput(ds._to_mlflow_entity(),
                                       [InputTag(MLFLOW_DATASET_CONTEXT, context)]))
        self.client.log_inputs(self.run_id, datasets=inputs)


def _config_params(cfg) -> dict:
    """The parameters known before any label is read: the recipe and the run's shape."""
    return {**recipe_of(cfg), "base_model": cfg.inference.model, "num_workers": cfg.num_workers,
            "use_gpu": cfg.use_gpu, "holdout_frac": cfg.holdout_frac,
            "train_on_auto": cfg.train_on_auto, "candidate": cfg.candidate,
            "gate.min_heldout": cfg.min_heldout, "gate.confidence": cfg.confidence,
            "gate.margin": cfg.margin, "gate.max_forgetting": cfg.max_forgetting,
            "gate.regression_set": cfg.regression_set}


def _probe(uri: str, timeout: float = 5.0) -> str | None:
    """What is wrong with an HTTP tracking server (None: its ``/health`` answers), found in
    seconds, where the MLflow client would first wait out its retries (minutes)."""
    import requests

    url = uri.rstrip("/") + "/health"
    try:
        r = requests.get(url, timeout=timeout)
    except requests.RequestException as e:
        return f"is unreachable ({type(e).__name__}: {e})"
    if r.status_code != 200:
        return f"answered GET {redact(url)} with {r.status_code} {r.text[:200]!r}"
    return None


def _check_server(uri: str, where: str) -> None:
    if (problem := _probe(uri)) is not None:
        raise TrackingError(f"{where} {problem}; nothing was trained. Start it, fix the URI, "
                            f"or unset both to retrain without tracking")
