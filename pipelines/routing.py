"""Review only where it pays: calibrations from reviews, auto-accept with a guarantee, audits.

    groundlabel review calibrate reviewed/ --registry adapters/       # fit, per model+adapter+prompt
    groundlabel label --input data/ --output runs/job2 --registry adapters/   # + calibrated_score
    groundlabel review export runs/job2 --tasks review/tasks.json \\
        --auto-accept-precision 0.95 --registry adapters/ --store reviewed/
    groundlabel report runs/job2 --registry adapters/ --store reviewed/       # ECE, audit alarm

`calibrate` fits a `grounding.calibration.Calibration` for every model + adapter + prompt version
with enough human reviews in the store (the newest human decision per item) and stores it in the
registry. `route` splits a job's predictions: those whose calibrated score clears the threshold
chosen for the target (`grounding.calibration.choose_threshold`) are committed to the store as
``auto`` decisions; an audit share of them, and every other row, go to people. `audit` measures
the realised precision of auto-accepted rows that people later reviewed.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict

from pydantic import BaseModel, Field

from grounding.calibration import HOLDOUT, MIN_FIT, Bound, Method
from grounding.settings import RegistryURI, Settings, StoreURI, StoreVersion
from grounding.storage import StorageOptions


class CalibrateConfig(Settings):
    """``groundlabel review calibrate``: calibrations from the store's reviews, into the
    registry."""

    store: StoreURI = Field(json_schema_extra={"positional": True})
    registry: RegistryURI
    version: StoreVersion = None
    method: Method = Field("isotonic", description="isotonic (monotone steps; needs more "
                           "reviews) or platt (logistic; two parameters).")
    holdout: float = Field(HOLDOUT, gt=0, lt=1, description="Share of each key's reviewed "
                           "items held out (by a hash of item_id) for ECE and thresholds.")
    min_fit: int = Field(MIN_FIT, ge=5, description="Fewest reviews in the fitting part.")
    storage: StorageOptions = Field(default_factory=StorageOptions, description="Object storage.")


class Routing(BaseModel):
    """Auto-accept: which rows skip people, at what precision, and how many are audited."""

    auto_accept_precision: float | None = Field(
        None, gt=0, lt=1, description="Auto-accept rows whose calibrated score clears the "
        "threshold at which held-out precision is at least this, at --confidence (e.g. 0.95). "
        "Default: everything goes to people.")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Confidence level of the lower "
                              "bound on precision.")
    bound: Bound = Field("clopper-pearson", description="Lower bound: clopper-pearson (exact) "
                         "or wilson.")
    audit_share: float = Field(0.02, ge=0, le=1, description="Share of the auto-accepted rows "
                               "also sent to people, so realised precision stays measured "
                               "(at least one when any is auto-accepted and this is > 0).")
    registry: str | None = Field(None, description="Adapter registry holding the calibrations "
                                 "(`groundlabel review calibrate`); also gives Label Studio the "
                                 "calibrated score.")
    store: str | None = Field(None, description="Reviewed-label store the `auto` decisions are "
                              "committed to (needed with --auto-accept-precision).")


def _usable(store, version=None) -> dict:
    """``{Key: [Outcome]}`` of the store's newest human decision per item."""
    from grounding.calibration import outcomes
    from grounding.store import HUMAN

    groups: dict = defaultdict(list)
    for o in outcomes(store.snapshot(version, HUMAN).to_pylist()):
        groups[o.key].append(o)
    return groups


def calibrate(cfg: CalibrateConfig) -> dict:
    """Fit and store a calibration for every key with enough reviews; say what the others
    need."""
    from grounding.calibration import TooFewReviews, fit
    from grounding.registry import AdapterRegistry
    from grounding.store import ReviewStore, StoreError

    store = ReviewStore(cfg.store, cfg.storage)
    v = cfg.version or store.latest()
    if not v:
        raise StoreError(f"{cfg.store} has no reviews yet")
    registry = AdapterRegistry(cfg.registry, cfg.storage)
    out = []
    for key, data in sorted(_usable(store, v).items(), key=lambda kv: kv[0].show()):
        row = {"model": key.model, "adapter": key.adapter, "prompt_version": key.prompt_version,
               "reviews": len(data)}
        try:
            cal = fit(data, cfg.method, cfg.holdout, cfg.min_fit, cfg.store, v)
        except TooFewReviews as e:
            out.append(row | {"calibration": None, "needed": e.needed, "why": str(e)})
            continue
        q = cal.quality()
        out.append(row | {"calibration": cal.id, "path": registry.save_calibration(cal),
                          "n_fit": cal.n_fit, "n_holdout": cal.n_holdout,
                          "ece_raw": q["ece_raw"], "ece_calibrated": q["ece_calibrated"]})
    if not out:
        raise StoreError(f"{cfg.store} version {v} has no reviewed predictions with a score "
                         "and lineage (model, prompt version) to calibrate on")
    return {"store": cfg.store, "version": v, "keys": out}


def _rank(item_id: str, salt: str) -> str:
    return hashlib.sha256(f"audit\x00{salt}\x00{item_id}".encode()).hexdigest()


def calibrate_items(items: list[dict], registry: str | None, opts) -> dict:
    """Put each item's calibrated score in ``item["calibrated"]`` (from the registry's newest
    calibration of its key; else the job's own ``calibrated_score``); returns ``{Key: cal}``."""
    cals: dict = {}
    if not registry:
        return cals
    from grounding.calibration import key_of
    from grounding.registry import AdapterRegistry

    reg = AdapterRegistry(registry, opts)
    for it in items:
        key = key_of(it)
        if key is None:
            continue
        if key not in cals:
            cals[key] = reg.calibration(key)
        if cals[key] is not None:
            it["calibrated"] = cals[key].one(it.get("score"))
            it["calibration"] = cals[key].id
    return cals


def route(items: list[dict], cfg: Routing, opts, job_id: str | None = None) -> dict:
    """Split ``items`` (labeled predictions of one job) for review; see the module docstring.

    Returns ``{"review": [...], "audit": [...], "auto": [...], "keys": [...], "version": V}``:
    ``review`` and ``audit`` items go to people, ``auto`` were committed to the store."""
    from grounding.calibration import choose_threshold, key_of, reviews_needed
    from grounding.store import ReviewStore, StoreError, decision_record

    cals = calibrate_items(items, cfg.registry, opts)
    target = cfg.auto_accept_precision
    if target is None:
        return {"review": items, "audit": [], "auto": [], "keys": [], "version": None}
    if not cfg.store or not cfg.registry:
        raise StoreError("--auto-accept-precision needs --registry (the calibrations) and "
                         "--store (where the auto decisions are recorded)")
    store = ReviewStore(cfg.store, opts)
    by_key: dict = defaultdict(list)
    for it in items:
        by_key[key_of(it)].append(it)
    usable = None
    keys, auto, audit, review = [], [], [], []
    for key, group in by_key.items():
        cal = cals.get(key) if key else None
        info = {"model": key.model if key else None, "adapter": key.adapter if key else None,
                "prompt_version": key.prompt_version if key else None, "rows": len(group)}
        if cal is None:
            if usable is None:
                usable = _usable(store)
            have = len(usable.get(key, [])) if key else 0
            need = reviews_needed(have, target, cfg.confidence, cfg.bound)
            why = ("the rows carry no model / prompt version" if key is None else
                   f"no calibration in {cfg.registry} for {key.show()}; the store has {have} "
                   f"usable review(s) of it, at least {need} more are needed, then run "
                   "`groundlabel review calibrate`")
            keys.append(info | {"threshold": None, "auto_accepted": 0, "needed": need,
                                "why": why})
            review += group
            continue
        thr = choose_threshold(cal, target, cfg.confidence, cfg.bound)
        if thr.threshold is None:
            keys.append(info | {"calibration": cal.id, "threshold": None, "auto_accepted": 0,
                                "needed": thr.needed, "why": thr.reason})
            review += group
            continue
        ok = [it for it in group if it.get("calibrated") is not None
              and it["calibrated"] >= thr.threshold - 1e-12]
        ids = {id(it) for it in ok}
        review += [it for it in group if id(it) not in ids]
        n_audit = math.ceil(cfg.audit_share * len(ok)) if ok else 0
        picked = sorted(ok, key=lambda it: _rank(it["item_id"], job_id or ""))[:n_audit]
        auto += ok
        audit += picked
        keys.append(info | {"calibration": cal.id, "threshold": thr.threshold,
                            "holdout_above": thr.n, "holdout_right": thr.hits,
                            "precision_lower_bound": thr.lower, "auto_accepted": len(ok),
                            "audited": len(picked)})
    version = None
    if auto:
        records = [decision_record(it, "auto", predicted=it, source="auto",
                                   calibrated_score=it["calibrated"], auto_precision=target,
                                   calibration=it["calibration"]) for it in auto]
        version = store.append(records, source="auto", note=f"job {job_id}: precision >= "
                               f"{target} at {cfg.confidence:.0%} ({cfg.bound})")
    return {"review": review, "audit": audit, "auto": auto, "keys": keys, "version": version}


def audit(store, version: int | None = None, confidence: float = 0.95,
          bound: Bound = "clopper-pearson") -> list[dict]:
    """Realised precision of auto-accepted rows that people reviewed afterwards, per target.

    A person's ``accept`` is right, ``correct`` is right when the boxes match
    (`grounding.calibration.boxes_match`), ``reject`` is left out (as in calibration). The
    alarm is raised when the realised precision is below the target."""
    from grounding.calibration import boxes_match, lower_bound, upper_bound

    hist = store.history(version).to_pylist()
    autos: dict[str, dict] = {}
    checked: dict[float, list[bool]] = defaultdict(list)
    for r in hist:  # commit order: a person's decision after the auto one audits it
        if r["decision"] == "auto":
            autos[r["item_id"]] = r
        elif r["item_id"] in autos and r["decision"] in ("accept", "correct"):
            a = autos.pop(r["item_id"])
            right = r["decision"] == "accept" or boxes_match(a["boxes"], r["boxes"])
            checked[a["auto_precision"]].append(right)
    targets = sorted({r["auto_precision"] for r in hist if r["decision"] == "auto"})
    out = []
    for t in targets:
        hits = checked.get(t, [])
        n, k = len(hits), sum(hits)
        p = k / n if n else None
        out.append({"target": t, "audited": n, "right": k, "precision": p,
                    "lower": lower_bound(k, n, confidence, bound) if n else None,
                    "upper": upper_bound(k, n, confidence, bound) if n else None,
                    "alarm": p is not None and p < t})
    return out
