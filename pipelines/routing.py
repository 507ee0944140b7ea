"""Review only where it pays: calibrations from reviews, auto-accept with a guarantee, audits.

    groundlabel review calibrate reviewed/ --registry adapters/       # fit, per model+adapter+prompt
    groundlabel label --input data/ --output runs/job2 --registry adapters/   # + calibrated_score
    groundlabel review export runs/job2 --tasks review/tasks.json \\
        --auto-accept-precision 0.95 --registry adapters/ --store reviewed/
    groundlabel report runs/job2 --registry adapters/ --store reviewed/       # ECE, audit alarm

`calibrate` fits a `grounding.calibration.Calibration` for every model + adapter + prompt version
with enough human reviews in the store (the newest human decision per item) and stores it in the
registry. `route` splits a job's predictions: those whose RAW score clears the threshold
chosen for the target (`grounding.calibration.choose_threshold`, on every usable review in the
bound stream, images as the unit, the walk's grid from this job's own scores) are committed to
the store as ``auto`` decisions; an audit share of them, and every other row, go to people.

What is promised (``--auto-accept-precision P --confidence C``): with probability >= C, the
precision of rows drawn like the reviewed ones (same model + adapter + prompt version, same
kind of images) above the threshold is >= P (population precision). With ``--per-job``: the
realised precision of this job's auto-accepted rows is >= P with probability >= C, given
how many they are and how they spread over images (a finite-job margin is added; fewer rows
are auto-accepted, none in small jobs). Both assume the job's rows are drawn like the reviews;
the audit checks that.

`audit` runs, per calibration id and target (never pooled), a one-sided anytime-valid test of
"the auto-accepted rows' precision is below the target" over the audited rows, images as the
unit, in the order people reviewed them (`grounding.calibration.precision_evidence`, side
"below"): the alarm is raised only when the evidence reaches 1 / (1 - confidence), so a
promise that holds raises it with probability <= 1 - confidence however often the report is
looked at. Power: about `AUDIT_ROWS` (250) audited rows, from one or several jobs of one
calibration, find a drop to 0.8 under a 0.9 target 90 % of the time (simulated: 100 rows 53 %,
200 rows 86 %, 250 rows 92 %, at 95 % confidence); the default audit share (5 %) gets there
after about 5,000 auto-accepted rows.
"""

from __future__ import annotations

import math
from collections import defaultdict

from pydantic import BaseModel, Field

from grounding.calibration import HOLDOUT, MIN_FIT, Bound, Method
from grounding.gold import ReviewerFilter
from grounding.settings import RegistryURI, Settings, StoreURI, StoreVersion
from grounding.storage import StorageOptions

AUDIT_SHARE = 0.05    # default share of auto-accepted rows audited by people
AUDIT_ROWS = 250      # audited rows that find precision 0.8 under a 0.9 target, power ~0.9


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
    audit_share: float = Field(AUDIT_SHARE, ge=0, le=1, description="The audit share routed "
                               "jobs used: their reviewed rows below it (by the audit hash) "
                               "are the uniform sample that enters the threshold's bound.")
    reviewers: ReviewerFilter = Field(default_factory=ReviewerFilter,
                                      description="Reviewers judged on gold items.")
    storage: StorageOptions = Field(default_factory=StorageOptions, description="Object storage.")


class Routing(BaseModel):
    """Auto-accept: which rows skip people, at what precision, and how many are audited."""

    auto_accept_precision: float | None = Field(
        None, gt=0, lt=1, description="Auto-accept the rows whose raw score clears the lowest "
        "threshold at which, with probability >= --confidence, the precision of rows drawn like "
        "the reviewed ones (same model, adapter, prompt; images as the unit) is at least this "
        "(population precision; see --per-job). Default: everything goes to people.")
    per_job: bool = Field(False, description="Promise this job's realised precision instead: "
                          "its auto-accepted rows are >= --auto-accept-precision right with "
                          "probability >= --confidence, given their count (adds a finite-job "
                          "margin; fewer rows auto-accepted). Both promises assume the job's "
                          "rows are drawn like the reviews.")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Confidence level of the "
                              "promise.")
    bound: Bound = Field("betting", description="Test at each threshold: betting (images as "
                         "the unit; valid when an image has several expressions) or "
                         "clopper-pearson / wilson (rows taken as independent).")
    audit_share: float = Field(AUDIT_SHARE, ge=0, le=1, description="Share of the "
                               "auto-accepted rows also sent to people, so realised precision "
                               "stays measured (at least one when any is auto-accepted and "
                               "this is > 0); about 250 audited rows per calibration detect "
                               "precision 0.8 under a 0.9 target with power 0.9.")
    registry: str | None = Field(None, description="Adapter registry holding the calibrations "
                                 "(`groundlabel review calibrate`); also gives Label Studio the "
                                 "calibrated score.")
    store: str | None = Field(None, description="Reviewed-label store the `auto` decisions are "
                              "committed to (needed with --auto-accept-precision).")


def _usable(store, version=None, audit_share: float = AUDIT_SHARE,
            exclude: frozenset | set = frozenset()) -> dict:
    """``{Key: [Outcome]}`` of the store's newest human decision per item. A review of a routed
    job's row (a job with ``auto`` decisions) that routing sent to people is in the bound
    stream (``sampled``) only when the row's `grounding.calibration.audit_unit` is below the
    audit share; audited rows always are: together a uniform sample of the job."""
    from grounding.calibration import audit_unit, outcomes
    from grounding.store import HUMAN

    autos = [r for r in store.history(version).to_pylist() if r["decision"] == "auto"]
    auto_items = {r["item_id"] for r in autos}
    routed = {r.get("job_id") for r in autos}
    groups: dict = defaultdict(list)
    for r in store.snapshot(version, HUMAN, exclude).to_pylist():
        for o in outcomes([r]):
            if r.get("job_id") in routed and r["item_id"] not in auto_items:
                o = o.model_copy(update={
                    "sampled": audit_unit(r.get("job_id"), r["item_id"]) < audit_share})
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
    exclude, excluded = cfg.reviewers.excluded(store, v, cfg.storage)
    out = []
    for key, data in sorted(_usable(store, v, cfg.audit_share, exclude).items(),
                            key=lambda kv: kv[0].show()):
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
    # items people disagree on, without an adjudication: no review of theirs is used
    return {"store": cfg.store, "version": v, "keys": out,
            "unresolved_items": store.resolution(v, exclude)["unresolved"]} | excluded


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
    from grounding.calibration import audit_unit, choose_threshold, key_of, reviews_needed
    from grounding.labels import image_key
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
        scored = [it for it in group if _finite(it.get("score"))]
        thr = choose_threshold(cal, target, cfg.confidence, cfg.bound,
                               job_scores=[it["score"] for it in scored],
                               job_units=[image_key(it.get("image")) or f"item:{it['item_id']}"
                                          for it in scored], per_job=cfg.per_job)
        promise = "per_job" if cfg.per_job else "population"
        if thr.threshold is None:
            keys.append(info | {"calibration": cal.id, "threshold": None, "auto_accepted": 0,
                                "promise": promise, "needed": thr.needed, "why": thr.reason})
            review += group
            continue
        ok = [it for it in scored if it["score"] >= thr.threshold - 1e-12]
        ids = {id(it) for it in ok}
        review += [it for it in group if id(it) not in ids]
        n_audit = math.ceil(cfg.audit_share * len(ok)) if ok else 0
        picked = sorted(ok, key=lambda it: audit_unit(it.get("job_id") or job_id,
                                                      it["item_id"]))[:n_audit]
        auto += ok
        audit += picked
        keys.append(info | {"calibration": cal.id, "threshold": thr.threshold,
                            "threshold_on": "raw", "promise": promise,
                            "reviews_above": thr.n, "reviews_right": thr.hits,
                            "images_above": thr.images, "estimate": thr.estimate,
                            "precision_lower_bound": thr.lower, "job_slack": thr.slack,
                            "auto_accepted": len(ok), "audited": len(picked)})
    version = None
    if auto:
        records = [decision_record(it, "auto", predicted=it, source="auto",
                                   calibrated_score=it.get("calibrated"), auto_precision=target,
                                   calibration=it.get("calibration")) for it in auto]
        version = store.append(records, source="auto", note=f"job {job_id}: precision >= "
                               f"{target} at {cfg.confidence:.0%} ({cfg.bound}, "
                               f"{'per job' if cfg.per_job else 'population'})")
    return {"review": review, "audit": audit, "auto": auto, "keys": keys, "version": version}


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)


def audit(store, version: int | None = None, confidence: float = 0.95,
          bound: Bound = "betting") -> list[dict]:
    """Per calibration id and target: the auto-accepted rows people reviewed afterwards, and
    the sequential test of the module docstring.

    A person's ``accept`` is right, ``correct`` is right when the boxes match
    (`grounding.calibration.boxes_match`), ``reject`` is left out (as in calibration). Images
    are the unit, in the order their first audited row was reviewed. ``evidence`` is the
    test's e-value (its largest capital); the alarm is raised when it reaches
    1 / (1 - confidence). ``lower``/``upper`` describe the audited rows (``bound``, rows as
    independent), they do not decide the alarm."""
    from grounding.calibration import boxes_match, lower_bound, precision_evidence, upper_bound
    from grounding.labels import image_key

    hist = store.history(version).to_pylist()
    autos: dict[str, dict] = {}
    groups: dict[tuple, dict] = {}
    for r in hist:  # commit order: a person's decision after the auto one audits it
        if r["decision"] == "auto":
            autos[r["item_id"]] = r
            g = (r.get("calibration"), r["auto_precision"])
            groups.setdefault(g, {"rec": r, "images": {}})
        elif r["item_id"] in autos and r["decision"] in ("accept", "correct"):
            a = autos.pop(r["item_id"])
            right = r["decision"] == "accept" or boxes_match(a["boxes"], r["boxes"])
            img = image_key(a.get("image")) or f"item:{a['item_id']}"
            per = groups[(a.get("calibration"), a["auto_precision"])]["images"]
            n, h = per.get(img, (0, 0))
            per[img] = (n + 1, h + int(right))
    out = []
    for (cal_id, t), g in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        counts = list(g["images"].values())
        n, k = sum(c[0] for c in counts), sum(c[1] for c in counts)
        ev = precision_evidence([c[0] for c in counts], [c[1] for c in counts], t,
                                "below") if counts else 0.0
        rec = g["rec"]
        out.append({"calibration": cal_id, "model": rec.get("model"),
                    "adapter": rec.get("adapter"), "prompt_version": rec.get("prompt_version"),
                    "target": t, "audited": n, "right": k, "images": len(counts),
                    "precision": k / n if n else None,
                    "lower": lower_bound(k, n, confidence, bound) if n else None,
                    "upper": upper_bound(k, n, confidence, bound) if n else None,
                    "evidence": math.exp(min(ev, 700.0)), "confidence": confidence,
                    "alarm": ev >= math.log(1 / (1 - confidence))})
    return out
