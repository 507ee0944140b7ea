"""``groundlabel schedule``: retrain on a cron schedule when enough new reviews arrived.

At every cron time (UTC) the scheduler counts the accepted and corrected items the store gained
since the snapshot the newest registered adapter was trained on, and retrains when there are at
least ``min_new_labels``. It keeps no state of its own: "since when" is read from the registry
(each adapter's ``snapshot_version``), so a restarted scheduler carries on where it was, and the
registry's training lease (held by every retrain while it trains) means two schedulers, or a
scheduler and a manual retrain, never train at once: the second one skips that tick. Whatever
happens, a retrain promotes only over the production its gate compared against.

**Repeated gates stay honest: alpha spending per production.** Every tick that retrains runs a
gate on the held-out set of a newer store version, which mostly holds the same images as the
last one. A fresh 5 % test each tick, as before, promoted a candidate that was never better in
20 % of 10-tick runs and 41 % of 30-tick runs (issue 29). Now the k-th gate against one
production tests at alpha_k = alpha / (k (k + 1)), alpha = 1 - ``--confidence`` (0.025, 0.0083,
0.0042, ...; these sum to alpha): by the union bound, over any number of ticks and however the
held-out sets overlap, the chance that any candidate no better than production is promoted over
it is at most alpha. A promotion (or a rollback) moves production and starts a new budget
against the new one. Why this scheme and not the others:

- *fresh data each test* (only items added since the last promotion) keeps each test valid
  alone, but 30 fresh 5 % tests still promote a no-better candidate 1 - 0.95^30 = 79 % of the
  time, and each test sees only a sliver of the held-out set;
- *alpha investing* earns alpha back on each promotion and controls the expected false-discovery
  share, not the chance of any false promotion, and its wealth must be carried exactly;
- *e-values* accumulate evidence about one hypothesis as data grows, but each tick gates a
  different candidate: there is no single process to accumulate.

Spending is valid under any dependence and needs one number remembered: k, the gates already
run against this production. The registry remembers it: each gated decision event (promote,
refuse, pass) carries ``metrics.sequential = {scheme, against, k, alpha, spent}``, and
`train.gate.spend` counts those since production last moved (`AdapterRegistry.events`, a
Delta-table log), so a restarted scheduler, or a manual ``retrain`` in between, continues the
count. The cost: a long-lived production is hard to beat late (alpha_10 = 0.00045,
alpha_30 = 0.000054), which the growing held-out set partly pays for (bench/RESULTS.md:
power at +5 points). ``--no-alpha-spending``: every gate at alpha, as before.

With ``--mlflow-tracking-uri`` (or ``MLFLOW_TRACKING_URI``) each tick that trains is an
MLflow run tagged ``groundlabel.trigger=schedule`` (`train.tracking`); a tick that cannot reach
the tracking server trains nothing and is skipped, logged, like one that finds another retrain
training.

Run::

    groundlabel schedule --cron "0 3 * * *" --min-new-labels 200 \\
        --store s3://b/reviewed --registry s3://b/adapters
    groundlabel schedule --once --store reviewed/ --registry adapters/   # one check now
"""

from __future__ import annotations

import datetime as dt
import json
import time

from pydantic import Field

from train.config import RetrainConfig


class ScheduleConfig(RetrainConfig):
    """Settings of ``groundlabel schedule`` (plus every ``retrain`` setting)."""

    cron: str = Field("0 3 * * *", description="When to check (UTC; 5 fields, or 6 with "
                      "seconds first).")
    min_new_labels: int = Field(100, ge=1, description="Retrain only when at least this many "
                                "accepted/corrected items arrived since the last adapter.")
    once: bool = Field(False, description="Check once now and exit (for an external cron).")
    max_runs: int | None = Field(None, ge=1, description="Exit after this many checks.")


def last_trained_version(registry) -> int:
    """Store version the newest registered adapter was trained on (0: none yet)."""
    versions = [m.get("snapshot_version") or 0 for m in registry.list()]
    return max(versions, default=0)


def new_labels(store, since_version: int) -> tuple[int, int]:
    """(items whose latest decision is accept/correct and came after ``since_version``,
    newest version)."""
    latest = store.latest()
    if latest <= since_version:
        return 0, latest
    snap = store.snapshot(latest, ("accept", "correct"))
    n = sum(v > since_version for v in snap.column("version").to_pylist())
    return n, latest


def check(cfg: ScheduleConfig, log=print) -> dict:
    """One tick: retrain if enough new labels (and nobody else is retraining)."""
    from grounding.registry import AdapterRegistry, RegistryError
    from grounding.store import ReviewStore
    from train.retrain import retrain
    from train.tracking import TrackingError

    opts = cfg.storage
    registry = AdapterRegistry(cfg.registry, opts)
    since = last_trained_version(registry)
    n, latest = new_labels(ReviewStore(cfg.store, opts), since)
    tick = {"at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "new_labels": n,
            "since_version": since, "store_version": latest}
    if n < cfg.min_new_labels:
        tick["action"] = f"skip: {n} new labels < {cfg.min_new_labels}"
    else:
        try:
            res = retrain(RetrainConfig.model_validate(
                cfg.model_dump(include=set(RetrainConfig.model_fields)) | {"version": latest}),
                # MLflow: the run's tags say a tick started it, and why
                trigger={"trigger": "schedule", "cron": "once" if cfg.once else cfg.cron,
                         "new_labels": n, "since_version": since})
            tick.update(action="retrained", result=res)
        except RegistryError as e:  # another retrain is training
            tick["action"] = f"skip: {e}"
        except TrackingError as e:  # MLflow unreachable: nothing trained, the next tick retries
            tick["action"] = f"skip: {e}"
    log(json.dumps(tick, default=str))
    return tick


def run(cfg: ScheduleConfig, log=print, now=lambda: dt.datetime.now(dt.UTC)) -> list[dict]:
    """Check at every cron time until ``max_runs`` checks (forever by default)."""
    from train.cron import Cron

    if cfg.once:
        return [check(cfg, log)]
    cron = Cron(cfg.cron)
    ticks: list[dict] = []
    while cfg.max_runs is None or len(ticks) < cfg.max_runs:
        nxt = cron.next_after(now())
        log(json.dumps({"next_check": nxt.isoformat()}))
        while (wait := (nxt - now()).total_seconds()) > 0:
            time.sleep(min(wait, 30.0))
        ticks.append(check(cfg, log))
    return ticks
