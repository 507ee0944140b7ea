"""Calibrated confidence from reviewed labels, and auto-accept thresholds with a guarantee.

A prediction's raw ``score`` (the geometric-mean probability of its coordinate tokens) ranks
answers but is not a probability of being right. A `Calibration` maps it to one, fitted on the
reviewed-label store (`grounding.store`) separately for each model + adapter + prompt version
(`Key`): the same raw score means different things for different adapters and prompts.

What a review says about a prediction (`outcome`):

* ``accept``: the prediction was right (a hit);
* ``correct``: a hit when the predicted and the corrected boxes match one to one at IoU >= 0.5
  (`boxes_match`; "no such object" twice is a match), else a miss;
* ``reject`` (an unusable item) and ``auto`` (no person looked) say nothing: left out, as is a
  record without a predicted score.

Scores are per answer (a row of a job). For the usual one-box answer that is the box's score; a
multi-box answer is right only when all its boxes are, which is what auto-accepting the row
needs. Boxes are xyxy pixels of the original image.

Fitting (`fit`): the reviews of a key are split by a hash of ``item_id`` (stable across refits
and processes) into a fitting part and a held-out part (default half). Isotonic regression or
Platt scaling (scikit-learn) is fitted on the first; expected calibration error before and
after, the reliability table, and the threshold choice all use only the held-out part.

Routing (`choose_threshold`): the auto-accept threshold on the calibrated score is the lowest
point of a fixed grid whose held-out rows above it have a one-sided lower confidence bound on
precision (Clopper-Pearson, or Wilson) of at least the target. The grid is walked from the top
and the walk stops at the first point that fails (fixed-sequence testing, as in Learn-then-Test),
so trying many thresholds does not spend the confidence level. The walk starts where at least
`START` of the held-out rows (and never fewer than can pass at all) lie above the threshold: a
first test on a handful of top rows would end the walk on their luck alone. Which thresholds are
tested depends on the scores only, never on whether the rows were right. The guarantee holds for rows
drawn like the reviewed ones; the audit share in `pipelines.review` measures whether they were.
With too few held-out reviews no threshold can pass, and `reviews_needed` says how many more.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, Field

IOU_HIT = 0.5
MIN_FIT = 30          # reviews in the fitting part (both outcomes present) before fitting at all
HOLDOUT = 0.5         # share of a key's reviews held out for ECE and the threshold
BINS = 10             # equal-width bins of the reliability table and ECE
GRID = 200            # threshold grid 1.0, 0.995, ..., 0.005 on the calibrated score
START = 0.1           # the walk's first test covers at least this share of the held-out rows

Method = Literal["isotonic", "platt"]
Bound = Literal["clopper-pearson", "wilson"]


class Key(BaseModel, frozen=True):
    """What a calibration belongs to: the lineage of the predictions it was fitted on."""

    model: str = Field(description="Base model (id or path, as the job's `model` column).")
    adapter: str | None = Field(None, description="LoRA adapter name; None = the base model.")
    prompt_version: str = Field(description="Family and prompt hash (the `prompt_version` "
                                "column).")

    def digest(self) -> str:
        """Stable short id of model + prompt (the adapter has its own folder)."""
        return hashlib.sha256(f"{self.model}\x00{self.prompt_version}".encode()).hexdigest()[:16]

    def show(self) -> str:
        return f"{self.model} / {self.adapter or 'base'} / {self.prompt_version}"


class Outcome(BaseModel, frozen=True):
    """One reviewed prediction: its raw score and whether it was right."""

    item_id: str
    key: Key
    score: float
    hit: bool


class Calibration(BaseModel):
    """A fitted map from raw score to P(right), with its held-out evidence.

    Stored as JSON in the adapter registry (`grounding.registry.AdapterRegistry
    .save_calibration`); never pickled, so loading one runs no code.
    """

    id: str = Field(description="Unique id: cal-<UTC time>-<hash of the parameters>.")
    key: Key
    method: Method = Field(description="isotonic (step function) or platt (logistic on "
                           "logit(score)).")
    x: list[float] = Field(default_factory=list, description="Isotonic: raw-score knots.")
    y: list[float] = Field(default_factory=list, description="Isotonic: P(right) at the knots "
                           "(linear in between, flat outside, as scikit-learn predicts).")
    a: float = Field(0.0, description="Platt: slope on logit(score).")
    b: float = Field(0.0, description="Platt: intercept.")
    n_fit: int = Field(description="Reviews it was fitted on.")
    holdout: float = Field(HOLDOUT, description="Share of the key's reviews held out.")
    holdout_scores: list[float] = Field(description="Raw scores of the held-out reviews.")
    holdout_hits: list[bool] = Field(description="Whether each held-out prediction was right.")
    store: str | None = Field(None, description="Reviewed-label store it came from.")
    store_version: int | None = Field(None, description="Store version it was fitted on.")
    fitted_at: str = Field(description="ISO 8601, UTC.")

    def __call__(self, scores):
        """Calibrated P(right) of raw ``scores`` (array-like; None/NaN stays NaN)."""
        import numpy as np

        s = np.asarray([np.nan if v is None else v for v in np.atleast_1d(scores)], float)
        if self.method == "isotonic":
            out = np.interp(s, self.x, self.y)
        else:
            z = self.a * _logit(s) + self.b
            out = 1.0 / (1.0 + np.exp(-z))
        out[np.isnan(s)] = np.nan
        return out

    def one(self, score: float | None) -> float | None:
        """Calibrated score of one raw score (None stays None)."""
        if score is None or not math.isfinite(score):
            return None
        return float(self(score)[0])

    # -- held-out evidence ---------------------------------------------------------------
    @property
    def n_holdout(self) -> int:
        return len(self.holdout_hits)

    def holdout_calibrated(self) -> list[float]:
        return [float(v) for v in self(self.holdout_scores)]

    def quality(self, bins: int = BINS) -> dict:
        """ECE and reliability tables, raw and calibrated, on the held-out reviews."""
        raw, cal = self.holdout_scores, self.holdout_calibrated()
        return {"n_holdout": self.n_holdout, "n_fit": self.n_fit,
                "hit_rate": sum(self.holdout_hits) / max(1, self.n_holdout),
                "ece_raw": ece(raw, self.holdout_hits, bins),
                "ece_calibrated": ece(cal, self.holdout_hits, bins),
                "reliability_raw": reliability(raw, self.holdout_hits, bins),
                "reliability_calibrated": reliability(cal, self.holdout_hits, bins)}


def _logit(s):
    import numpy as np

    s = np.clip(np.asarray(s, float), 1e-6, 1 - 1e-6)
    return np.log(s) - np.log1p(-s)


# ---------------------------------------------------------------------------------- outcomes


def boxes_match(pred: list | None, truth: list | None, iou: float = IOU_HIT) -> bool:
    """True when ``pred`` and ``truth`` (xyxy lists) pair up one to one at IoU >= ``iou``.

    Both empty ("no such object") is a match; different counts never are."""
    pred, truth = list(pred or []), list(truth or [])
    if len(pred) != len(truth):
        return False
    if not pred:
        return True
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    from grounding.boxes import Box

    p = [Box.from_list(b) for b in pred]
    t = [Box.from_list(b) for b in truth]
    m = np.array([[a.iou(b) for b in t] for a in p])
    rows, cols = linear_sum_assignment(-m)
    return bool((m[rows, cols] >= iou).all())


def outcome(record: dict) -> bool | None:
    """Hit (True), miss (False) or nothing to learn (None) of one store record."""
    score = record.get("predicted_score")
    if score is None or not math.isfinite(score):
        return None
    d = record.get("decision")
    if d == "accept":
        return True
    if d == "correct":
        if record.get("predicted_boxes") is None:
            return None
        return boxes_match(record["predicted_boxes"], record.get("boxes"))
    return None  # reject: unusable item; auto: no person looked


def key_of(record: dict) -> Key | None:
    """The `Key` of a record's prediction (None when its lineage is incomplete)."""
    if not record.get("model") or not record.get("prompt_version"):
        return None
    return Key(model=record["model"], adapter=record.get("adapter") or None,
               prompt_version=record["prompt_version"])


def outcomes(records: Iterable[dict]) -> list[Outcome]:
    """Every record that says whether a scored prediction was right."""
    out = []
    for r in records:
        hit, key = outcome(r), key_of(r)
        if hit is not None and key is not None:
            out.append(Outcome(item_id=r["item_id"], key=key, score=float(r["predicted_score"]),
                               hit=hit))
    return out


def held_out(item_id: str, share: float = HOLDOUT) -> bool:
    """Whether an item's reviews are held out: a hash of the id, the same in every process."""
    h = int(hashlib.sha256(f"calibration\x00{item_id}".encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < share


# ---------------------------------------------------------------------------------- fitting


class TooFewReviews(ValueError):
    """Not enough reviews to fit or to route; ``needed`` more would allow it (at least)."""

    def __init__(self, key: Key, have: int, needed: int, why: str):
        self.key, self.have, self.needed = key, have, needed
        super().__init__(f"{key.show()}: {have} usable review(s); {why}: at least {needed} more "
                         "needed")


def fit(data: list[Outcome], method: Method = "isotonic", holdout: float = HOLDOUT,
        min_fit: int = MIN_FIT, store: str | None = None,
        store_version: int | None = None) -> Calibration:
    """Fit one key's `Calibration` (all ``data`` must share a key); TooFewReviews if it can't."""
    import numpy as np

    if not data:
        raise ValueError("no reviewed predictions to fit on")
    key = data[0].key
    if any(o.key != key for o in data):
        raise ValueError("fit one key at a time (model + adapter + prompt version)")
    fit_part = [o for o in data if not held_out(o.item_id, holdout)]
    hold = [o for o in data if held_out(o.item_id, holdout)]
    hits = {o.hit for o in fit_part}
    if len(fit_part) < min_fit or len(hits) < 2:
        need = max(math.ceil(min_fit / (1 - holdout)) - len(data), 1)
        why = (f"{len(fit_part)} in the fitting part, {min_fit} needed" if len(fit_part) < min_fit
               else "the fitting part holds only " + ("hits" if True in hits else "misses"))
        raise TooFewReviews(key, len(data), need, why)
    s = np.array([o.score for o in fit_part], float)
    y = np.array([o.hit for o in fit_part], float)
    params: dict = {}
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(s, y)
        params = {"x": iso.X_thresholds_.tolist(), "y": iso.y_thresholds_.tolist()}
    else:
        from sklearn.linear_model import LogisticRegression

        lr = LogisticRegression(C=1e4).fit(_logit(s).reshape(-1, 1), y)
        params = {"a": float(lr.coef_[0][0]), "b": float(lr.intercept_[0])}
    stamp = dt.datetime.now(dt.UTC)
    digest = hashlib.sha256(repr((key, method, sorted(params.items()))).encode()).hexdigest()[:6]
    return Calibration(id=f"cal-{stamp:%Y%m%d-%H%M%S}-{digest}", key=key, method=method,
                       n_fit=len(fit_part), holdout=holdout,
                       holdout_scores=[o.score for o in hold],
                       holdout_hits=[o.hit for o in hold], store=store,
                       store_version=store_version,
                       fitted_at=stamp.isoformat(timespec="seconds"), **params)


def ece(p: list[float], y: list[bool], bins: int = BINS) -> float | None:
    """Expected calibration error: the row-weighted mean |mean p - hit rate| over equal-width
    bins of ``p`` (None without rows)."""
    table = reliability(p, y, bins)
    n = sum(b["n"] for b in table)
    if not n:
        return None
    return sum(b["n"] * abs(b["mean_p"] - b["hit_rate"]) for b in table) / n


def reliability(p: list[float], y: list[bool], bins: int = BINS) -> list[dict]:
    """Per non-empty bin ``[lo, hi)`` (the last one closed): rows, mean p and hit rate."""
    out = []
    for i in range(bins):
        lo, hi = i / bins, (i + 1) / bins
        idx = [j for j, v in enumerate(p) if lo <= v < hi or (i == bins - 1 and v == 1.0)]
        if idx:
            out.append({"lo": lo, "hi": hi, "n": len(idx),
                        "mean_p": sum(p[j] for j in idx) / len(idx),
                        "hit_rate": sum(bool(y[j]) for j in idx) / len(idx)})
    return out


# ---------------------------------------------------------------------------------- routing


def lower_bound(k: int, n: int, confidence: float = 0.95,
                method: Bound = "clopper-pearson") -> float:
    """One-sided lower confidence bound on a proportion from ``k`` successes in ``n``."""
    if n <= 0:
        return 0.0
    alpha = 1.0 - confidence
    if method == "clopper-pearson":
        from scipy.stats import beta

        return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))
    from scipy.stats import norm

    z, ph = float(norm.ppf(confidence)), k / n
    centre = ph + z * z / (2 * n)
    half = z * math.sqrt(ph * (1 - ph) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n))


def upper_bound(k: int, n: int, confidence: float = 0.95,
                method: Bound = "clopper-pearson") -> float:
    """One-sided upper confidence bound (the lower bound of the failures, mirrored)."""
    return 1.0 - lower_bound(n - k, n, confidence, method) if n > 0 else 1.0


def min_holdout(target: float, confidence: float = 0.95,
                method: Bound = "clopper-pearson") -> int:
    """Fewest held-out rows above a threshold that could ever show ``target`` (all hits)."""
    n = 1
    while lower_bound(n, n, confidence, method) < target:
        n += 1
        if n > 1_000_000:
            raise ValueError(f"precision target {target} is out of reach")
    return n


class Threshold(BaseModel):
    """The auto-accept decision for one calibration and target."""

    target: float = Field(description="Precision the auto-accepted rows must reach.")
    confidence: float = Field(description="Confidence level of the lower bound.")
    bound: Bound
    threshold: float | None = Field(description="Auto-accept rows whose calibrated score is at "
                                    "least this; None = auto-accept nothing.")
    n: int = Field(0, description="Held-out rows at or above the threshold.")
    hits: int = Field(0, description="... of which were right.")
    lower: float | None = Field(None, description="Lower confidence bound of their precision.")
    needed: int = Field(0, description="More reviews needed before anything can pass (0: none).")
    reason: str = Field("", description="Why nothing is auto-accepted, when it is not.")


def choose_threshold(cal: Calibration, target: float, confidence: float = 0.95,
                     bound: Bound = "clopper-pearson", holdout: float | None = None,
                     grid: int = GRID) -> Threshold:
    """The lowest grid threshold whose held-out precision bound reaches ``target`` (module
    docstring). With none, ``threshold`` is None and ``reason``/``needed`` say why (``holdout``:
    the share of new reviews that will be held out; default: the calibration's)."""
    holdout = cal.holdout if holdout is None else holdout
    if not 0.0 < target < 1.0:
        raise ValueError(f"precision target must be in (0, 1), got {target}")
    p, y = cal.holdout_calibrated(), cal.holdout_hits
    m0 = min_holdout(target, confidence, bound)
    start = max(m0, math.ceil(START * len(p)))
    base = Threshold(target=target, confidence=confidence, bound=bound, threshold=None)
    if len(p) < m0:
        more = math.ceil((m0 - len(p)) / holdout)
        return base.model_copy(update={
            "needed": more, "reason": f"{len(p)} held-out review(s); {m0} right answers above "
            f"a threshold are the least that can show precision >= {target} at "
            f"{confidence:.0%} confidence, so at least {more} more review(s) are needed"})
    best = None
    best_fail = None
    for i in range(grid, 0, -1):
        t = i / grid
        above = [j for j, v in enumerate(p) if v >= t - 1e-12]
        if len(above) < start:
            continue  # too few rows for a first test: not a step of the sequence
        k = sum(bool(y[j]) for j in above)
        lb = lower_bound(k, len(above), confidence, bound)
        if lb < target:
            best_fail = (t, k, len(above), lb)
            break  # fixed sequence: the first failure ends the walk
        best = (t, k, len(above), lb)
    if best is None:
        if best_fail is None:
            more = math.ceil(m0 / holdout)
            return base.model_copy(update={
                "needed": more, "reason": f"fewer than {m0} held-out reviews share any "
                f"calibrated score; at least {more} more review(s) are needed"})
        t, k, n, lb = best_fail
        return base.model_copy(update={
            "n": n, "hits": k, "lower": lb, "reason": f"no threshold reaches precision {target}: "
            f"the most confident {n} held-out rows (calibrated >= {t:.3f}) had {k} right, lower "
            f"bound {lb:.3f} at {confidence:.0%} confidence"})
    t, k, n, lb = best
    return base.model_copy(update={"threshold": t, "n": n, "hits": k, "lower": lb})


def reviews_needed(have: int, target: float, confidence: float = 0.95,
                   bound: Bound = "clopper-pearson", holdout: float = HOLDOUT,
                   min_fit: int = MIN_FIT) -> int:
    """More reviews (at least) before a key can be fitted and routed at ``target``."""
    total = max(math.ceil(min_fit / (1 - holdout)),
                math.ceil(min_holdout(target, confidence, bound) / holdout))
    return max(0, total - have)
