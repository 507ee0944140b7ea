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

Fitting (`fit`): a key's reviews are split by the image they belong to
(`grounding.labels.image_unit`, the same hash as the retraining gate's split, stable across
refits and processes): every expression of one image lands on the same side. Isotonic
regression or Platt scaling (scikit-learn) is fitted on the first part; expected calibration
error before and after and the reliability table use only the held-out part. The calibrated
score is what people see (the Label Studio sort key, the report's reliability diagram, a job's
``calibrated_score``); routing does not use it.

Routing (`choose_threshold`) is on the RAW score, with every usable review in the bound
stream (`Calibration.review_scores`): isotonic calibration is monotone, so a calibrated
threshold is a raw threshold chosen on half the reviews, and it only cost power. The
auto-accept threshold is the lowest point of a grid whose reviewed rows above it pass a
one-sided test of "precision <= target" at level 1 - confidence. The grid is walked from the
top and stops at the first point that fails (fixed-sequence testing, as in Learn-then-Test,
Angelopoulos et al. 2021), so trying many thresholds does not spend the confidence level.

The unit is the image, not the row: the expressions of one image are right or wrong together
more often than independent rows would be. The test at a threshold ``t`` and target ``mu``
takes, per image ``i`` (in a fixed hash order), ``n_i`` reviewed rows above ``t`` of which
``h_i`` were right, and the bounded score ``X_i = mu + (h_i - mu * n_i) / M`` (``M`` the most
rows of one image above ``t``), whose mean exceeds ``mu`` exactly when the row-weighted
precision over images does. It rejects when the running maximum of a mixture of betting
martingales (Waudby-Smith & Ramdas 2024, "Estimating means of bounded random variables by
betting", JRSS-B; for single-row images each bet is the likelihood ratio of a Bernoulli
alternative, so the mixture is Robbins' (1970) mixture sequential probability ratio test, its
prior tuned to the counts: `_prior`) reaches ``1 / (1 - confidence)`` (Ville's inequality). It needs images drawn independently, not rows. Its bets are capped at
``1 / (mu M)``, and no valid test of the row-weighted precision can bet more: an image's
multiplier must stay nonnegative with all ``M`` rows wrong, and the null is the linear
constraint E[h - mu n] <= 0, so ``1 + lam (h - mu n)`` is the largest multiplier whose mean
stays <= 1 for every null distribution. That is the price of images of several rows, paid
most at high targets; a test treating the rows as independent does not pay it, and is not
valid on such images.

Which promise (`Threshold`):

* default, **population precision**: with probability >= confidence (over the reviews), the
  precision of rows drawn like the reviewed ones above the threshold is >= target. Post
  selection, this is the whole statement: the walk's threshold comes with ``lower = target``,
  a valid lower bound after selection; the point estimate at the threshold is reported as an
  estimate, not as a bound.
* ``per_job=True``: the realised precision of *this job's* auto-accepted rows is >= target
  with probability >= confidence (over the reviews and the job's outcomes), given how many they
  are and how they spread over images. The level is split: the walk tests population
  precision >= target + slack at half of it, and the slack is the job's own hits' deviation
  over its images at the other half (`job_slack`: Hoeffding's, ``sqrt(log(2/alpha) * sum
  n_i^2 / 2) / sum n_i``, ``n_i`` the job's rows of image ``i`` above the threshold, or
  Bernstein's with the variance of a job at the target, whichever is smaller). Both assume
  the job's rows are drawn like the reviewed ones (same model, prompt and kind of images).

A start that does not feed back: the walk's grid is the quantiles of the job's own raw scores
(or, without a job, of the reviewed scores) and it starts at the first grid point with
`START` of those rows above it and enough reviewed rows to pass at all, so which thresholds
are tested never depends on whether rows were right, nor on which rows an earlier routing
sent to people. A job routed with auto-accept sends its low-score rows to people and audits
only a share of the rest; its reviews enter the bound stream only where they are a uniform
sample of the job (`Outcome.sampled`, set by `pipelines.routing`: audited rows, and the
reviewed rows whose `audit_unit` falls below the same audit share), so the stream stays drawn
like the jobs. With too few reviews no threshold can pass, and `reviews_needed` says how many
more.
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
GRID = 200            # threshold grid: quantiles 1/GRID, 2/GRID, ... of the job's raw scores
START = 0.1           # the walk's first test covers at least this share of the job's rows
MIX = 40              # alternatives in the betting mixture (on (mu, 1); weights: `_prior`)
SPREAD = 0.25         # the prior's spread (log scale) around the tuned alternative (`_prior`)

Method = Literal["isotonic", "platt"]
Bound = Literal["betting", "clopper-pearson", "wilson"]


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
    unit: str | None = Field(None, description="The image it belongs to (`grounding.labels"
                             ".image_key`); None = an image of its own.")
    sampled: bool = Field(True, description="Counts in the threshold's bound stream: False for "
                          "a row people reviewed because routing sent it to them, outside the "
                          "uniform audit sample (module docstring).")

    def image(self) -> str:
        return self.unit or f"item:{self.item_id}"


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
    review_scores: list[float] = Field(default_factory=list, description="Raw scores of every "
                                       "usable review in the bound stream (routing's evidence; "
                                       "empty in calibrations fitted before it existed: then "
                                       "the held-out part is used).")
    review_hits: list[bool] = Field(default_factory=list, description="... right or not.")
    review_units: list[str] = Field(default_factory=list, description="... their images.")
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
            from grounding.labels import image_key

            out.append(Outcome(item_id=r["item_id"], key=key, score=float(r["predicted_score"]),
                               hit=hit, unit=image_key(r.get("image"))))
    return out


def held_out(o: Outcome | str, share: float = HOLDOUT) -> bool:
    """Whether a review is held out: `grounding.labels.image_unit` of its image (of the item
    when it has none, or when given an item_id), the same split as the retraining gate's."""
    from grounding.labels import image_unit

    if isinstance(o, str):
        return image_unit({"item_id": o}) < share
    return image_unit({"image": o.unit, "item_id": o.item_id}) < share


def audit_unit(job_id: str | None, item_id: str) -> float:
    """Where a job's row falls in [0, 1) for the audit sample (`pipelines.routing.route`
    audits the auto rows lowest on it; the reviews of a routed job below the audit share on it
    are the bound stream's uniform sample)."""
    h = hashlib.sha256(f"audit\x00{job_id or ''}\x00{item_id}".encode()).hexdigest()
    return int(h[:15], 16) / float(16 ** 15)


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
    fit_part = [o for o in data if not held_out(o, holdout)]
    hold = [o for o in data if held_out(o, holdout)]
    stream = [o for o in data if o.sampled]
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
                       holdout_hits=[o.hit for o in hold],
                       review_scores=[o.score for o in stream],
                       review_hits=[o.hit for o in stream],
                       review_units=[o.image() for o in stream], store=store,
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


def _prior(mu: float, ratio: float, n: int, level: float, mix: int = MIX,
           spread: float = SPREAD):
    """Positions ``k`` in (0, 1) of the routing test's alternatives (``p1 = mu + (1 - mu) k``,
    bet ``lam = k / mu`` on ``X``) and their prior weights, tuned to the counts.

    A mixture pays for the alternatives far from the one that wins, so its weight sits where
    the test has to decide: the alternative a level-``level`` test of ``n`` images can just
    detect (Howard et al. 2021 tune a mixture to a sample size the same way). With ``X``'s
    variance under the null ``v = mu (1 - mu) ratio`` (``ratio`` = mean ``n_i^2 / M^2``; 1 for
    single-row images), that excess is ``d = sqrt(2 v log(1/level) / n)`` and its bet
    ``lam = d / v``, so ``k* = sqrt(2 log(1/level) mu / ((1 - mu) ratio n))`` (capped at 1);
    the weights are log-normal around ``k*`` with ``spread``. The counts come from the scores
    and the images alone, never from whether rows were right, so the weights are fixed before
    any outcome is seen and the mixture stays a nonnegative supermartingale under the null
    given them (so does ``M``; that the promise also holds over the draw of the scores, i.e.
    for the population, is what the simulation tests in tests/review/test_calibration.py
    check, clustered world included). Measured against the uniform prior it replaced
    (bench/RESULTS.md, #29, 50 seeds): the base domain's share at 0.8 0.375 -> 0.475, the
    clustered world's 0.23 -> 0.29, with no more population failures."""
    import numpy as np

    k = (np.arange(mix) + 0.5) / mix
    star = min(1.0, math.sqrt(2 * math.log(1 / level) * mu / ((1 - mu) * ratio * max(n, 1))))
    logw = -((np.log(k) - math.log(max(star, 1e-300))) ** 2) / (2 * spread ** 2)
    w = np.exp(logw - logw.max())  # k* far below the grid: all weight on its lowest point
    return k, w / w.sum()


def _log_mean(logk, w, axis=0):
    """log of the ``w``-weighted mean of ``exp(logk)`` along ``axis``, without overflow."""
    import numpy as np

    top = logk.max(axis=axis)
    wb = w[:, None] if logk.ndim == 2 and axis == 0 else w
    return top + np.log((wb * np.exp(logk - top)).sum(axis=axis))


def _log_mixture(x, mu: float, side: Literal["above", "below"] = "above",
                 mix: int = MIX, w=None):
    """Running log capital of a mixture of betting martingales on ``x`` (values in [0, 1],
    in a fixed order) against mean ``mu``: "above" gathers evidence that the mean exceeds
    ``mu``, "below" that it falls short. Each bet ``1 + lam (x - mu)`` (or ``(mu - x)``) with
    ``lam`` such that, for a Bernoulli ``x``, it is the likelihood ratio of an alternative
    ``p1``; ``p1`` takes ``mix`` values ``mu + (1 - mu) k`` or ``mu (1 - k)``, ``k`` evenly
    spaced on (0, 1), weighted by ``w`` (default uniform: Robbins' mixture), and the capital is
    their weighted average. Under the null each is a nonnegative supermartingale, so is the average, and
    P(its maximum ever reaches 1/alpha) <= alpha (Ville)."""
    import numpy as np

    x = np.asarray(x, float)
    if not len(x):
        return np.zeros(0)
    k = (np.arange(mix) + 0.5) / mix
    w = np.full(mix, 1 / mix) if w is None else np.asarray(w, float)
    if side == "above":
        p1 = mu + (1 - mu) * k
        lam = (p1 - mu) / (mu * (1 - mu))
        d = x - mu
    else:
        p1 = mu * (1 - k)
        lam = (mu - p1) / (mu * (1 - mu))
        d = mu - x
    logk = np.cumsum(np.log1p(lam[:, None] * d[None, :]), axis=1)
    return _log_mean(logk, w)


def precision_evidence(n_i, h_i, mu: float, side: Literal["above", "below"] = "above",
                       level: float = 0.05) -> float:
    """Largest log capital of the clustered test (module docstring) on per-image counts
    ``n_i`` (rows, all > 0) and ``h_i`` (of which right), in the order given: evidence that
    the row-weighted precision exceeds (``above``: routing; its prior tuned by `_prior` to
    the counts and the test's ``level``) or falls short of (``below``: the audit, which must
    find moderate drops in a stream of unknown length; Robbins' uniform mixture) ``mu``."""
    import numpy as np

    n_i, h_i = np.asarray(n_i, float), np.asarray(h_i, float)
    if not len(n_i) or not 0.0 < mu < 1.0:
        return 0.0
    m = n_i.max()
    x = mu + (h_i - mu * n_i) / m
    w = (_prior(mu, float((n_i ** 2).mean()) / m ** 2, len(n_i), level)[1]
         if side == "above" else None)
    return float(max(0.0, _log_mixture(x, mu, side, w=w).max()))


def lower_bound(k: int, n: int, confidence: float = 0.95,
                method: Bound = "clopper-pearson") -> float:
    """One-sided lower confidence bound on a proportion from ``k`` successes in ``n``
    (``betting``: the smallest ``mu`` Robbins' uniform mixture does not reject from its final
    capital, rows taken as images of their own: the audit's interval; ``clopper-pearson``: exact; ``wilson``)."""
    if n <= 0:
        return 0.0
    alpha = 1.0 - confidence
    if method == "betting":
        import numpy as np

        # the final capital of Robbins' uniform mixture on k ones and n - k zeros (order-free;
        # uniform, not routing's count-tuned prior, whose weights move with mu: the capital
        # must fall as mu rises for the bisection to find the bound)
        def final(mu):
            kk = (np.arange(MIX) + 0.5) / MIX
            w = np.full(MIX, 1 / MIX)
            p1 = mu + (1 - mu) * kk
            lr = k * np.log(p1 / mu) + (n - k) * np.log((1 - p1) / (1 - mu))
            return float(_log_mean(lr, w))

        lo, hi = 1e-9, k / n
        if k == 0 or final(lo) < math.log(1 / alpha):
            return 0.0
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if final(mid) >= math.log(1 / alpha) else (lo, mid)
        return lo
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


def min_holdout(target: float, confidence: float = 0.95, method: Bound = "betting") -> int:
    """Fewest reviewed rows above a threshold that could ever show ``target`` (all right, one
    image each)."""
    if method == "betting":
        import numpy as np

        need = math.log(1 / (1 - confidence))
        for n in range(1, 1_000_000):
            kk, w = _prior(target, 1.0, n, 1 - confidence)
            if _log_mean(n * np.log((target + (1 - target) * kk) / target), w) >= need:
                return n
        raise ValueError(f"precision target {target} is out of reach")
    n = 1
    while lower_bound(n, n, confidence, method) < target:
        n += 1
        if n > 1_000_000:
            raise ValueError(f"precision target {target} is out of reach")
    return n


def job_slack(n_i, confidence: float, target: float | None = None) -> float:
    """The one-sided margin by which a job's realised precision can fall short of its rows'
    expected precision, at ``confidence``, for ``n_i`` rows per image (each image's hits in
    [0, n_i], images independent, rows within one image tied in any way).

    Hoeffding's over images, ``sqrt(L sum n_i^2 / 2) / N`` (``L = log(1 / (1 - confidence))``,
    ``N = sum n_i``), or, given the ``target`` the expected precision ``p`` is tested to
    exceed, Bernstein's, whichever is smaller for these counts (both are fixed by the counts
    alone, so taking the smaller is not a look at the outcomes). Bernstein's variance bound:
    an image's hits vary at most ``n_i^2 q_i (1 - q_i)``, ``q_i`` its expected share right,
    so the sum is <= ``M sum n_i q_i (1 - q_i) <= M N p (1 - p)`` (``M`` the largest
    ``n_i``; Jensen), and ``p (1 - p) <= target (1 - target)`` when ``p >= target >= 0.5``
    (1/4 below 0.5). The margin is ``(M L / 3 + sqrt((M L / 3)^2 + 2 V L)) / N``."""
    import numpy as np

    n_i = np.asarray(n_i, float)
    big_n = float(n_i.sum())
    if not big_n:
        return 0.0
    log_a = math.log(1 / (1 - confidence))
    hoeffding = math.sqrt(log_a * float((n_i ** 2).sum()) / 2) / big_n
    if target is None:
        return hoeffding
    v = target * (1 - target) if target >= 0.5 else 0.25
    m = float(n_i.max())
    bernstein = (m * log_a / 3 + math.sqrt((m * log_a / 3) ** 2 + 2 * m * big_n * v * log_a))
    return min(hoeffding, bernstein / big_n)


class Threshold(BaseModel):
    """The auto-accept decision for one calibration and target."""

    target: float = Field(description="Precision the auto-accepted rows must reach.")
    confidence: float = Field(description="Confidence level of the promise.")
    bound: Bound
    on: Literal["raw", "calibrated"] = Field("raw", description="Which score the threshold is "
                                             "on: the raw score (routing since #29).")
    per_job: bool = Field(False, description="The promise is about this job's realised "
                          "precision (else: population precision, module docstring).")
    threshold: float | None = Field(description="Auto-accept rows whose raw score is at "
                                    "least this; None = auto-accept nothing.")
    n: int = Field(0, description="Reviewed rows (bound stream) at or above the threshold.")
    hits: int = Field(0, description="... of which were right.")
    images: int = Field(0, description="... on this many images.")
    estimate: float | None = Field(None, description="hits / n: a point estimate, not a bound.")
    lower: float | None = Field(None, description="A lower bound on the promised precision that "
                                "is valid after the threshold was selected: the target itself "
                                "(fixed-sequence testing); None when nothing passed.")
    slack: float = Field(0.0, description="per_job: the finite-job margin added to the target "
                         "in the test at the threshold.")
    job_rows: int | None = Field(None, description="The job's rows at or above the threshold.")
    needed: int = Field(0, description="More reviews needed before anything can pass (0: none).")
    reason: str = Field("", description="Why nothing is auto-accepted, when it is not.")


def _order(units: list[str]):
    """Image index of each review, numbered in a fixed hash order of the images (independent of
    whether rows were right)."""
    import numpy as np

    names = sorted(set(units), key=lambda u: hashlib.sha256(u.encode()).hexdigest())
    pos = {u: i for i, u in enumerate(names)}
    return np.array([pos[u] for u in units], int), len(names)


def choose_threshold(cal: Calibration, target: float, confidence: float = 0.95,
                     bound: Bound = "betting", holdout: float | None = None,
                     grid: int = GRID, *, job_scores=None, job_units=None,
                     per_job: bool = False) -> Threshold:
    """The lowest raw-score threshold of the walk (module docstring) whose reviewed rows above
    it pass the test of precision > ``target`` (``per_job``: > target + the job's slack).

    ``job_scores`` (and ``job_units``, their images): the raw scores of the job being routed;
    they fix the grid and the start, and ``per_job`` needs them. ``bound``: ``betting`` (the
    clustered test; default) or ``clopper-pearson``/``wilson`` (rows taken as independent).
    ``holdout`` is accepted for old callers and unused: every review in the stream counts.
    With none passing, ``threshold`` is None and ``reason``/``needed`` say why."""
    import numpy as np

    del holdout
    if not 0.0 < target < 1.0:
        raise ValueError(f"precision target must be in (0, 1), got {target}")
    if per_job and job_scores is None:
        raise ValueError("per_job needs the job's scores (job_scores)")
    if cal.review_scores:
        s, y, u = cal.review_scores, cal.review_hits, cal.review_units
    else:  # fitted before the stream was stored: the held-out part, rows as images
        s, y = cal.holdout_scores, cal.holdout_hits
        u = [f"row:{i}" for i in range(len(s))]
    s, y = np.asarray(s, float), np.asarray(y, bool)
    idx, n_units = _order(list(u)) if len(u) else (np.zeros(0, int), 0)
    alpha = 1.0 - confidence
    a_test = alpha / 2 if per_job else alpha
    m0 = min_holdout(target, 1.0 - a_test, bound)
    base = Threshold(target=target, confidence=confidence, bound=bound, threshold=None,
                     per_job=per_job)
    if len(s) < m0:
        more = m0 - len(s)
        return base.model_copy(update={
            "needed": more, "reason": f"{len(s)} usable review(s); {m0} right answers above "
            f"a threshold are the least that can show precision >= {target} at "
            f"{confidence:.0%} confidence, so at least {more} more review(s) are needed"})
    if job_scores is not None:
        js = np.asarray([np.nan if v is None else v for v in job_scores], float)
        ju = (list(job_units) if job_units is not None else [f"row:{i}" for i in range(len(js))])
        keep = np.isfinite(js)
        js, ju = js[keep], [v for v, k in zip(ju, keep, strict=True) if k]
        jidx, _ = _order(ju) if ju else (np.zeros(0, int), 0)
        ref = js
    else:
        ref = s
    if not len(ref):
        return base.model_copy(update={"reason": "the job has no scored rows"})
    desc = np.sort(ref)[::-1]
    cand = [float(desc[max(0, math.ceil(i / grid * len(desc)) - 1)]) for i in range(1, grid + 1)]
    cand = list(dict.fromkeys(cand))  # unique, highest first
    log_need = math.log(1 / a_test)
    best = fail = None
    started = False
    for t in cand:
        above = s >= t - 1e-12
        if not started:
            if (ref >= t - 1e-12).mean() < START or above.sum() < m0:
                continue  # not a step of the sequence: too few rows for a first test
            started = True
        n, k = int(above.sum()), int(y[above].sum())
        mu, slack, jn = target, 0.0, None
        if job_scores is not None:
            jab = js >= t - 1e-12
            jn = int(jab.sum())
            if per_job:
                slack = job_slack(np.bincount(jidx[jab]), 1 - a_test, target) if jn else 0.0
                mu = target + slack
        n_i = np.bincount(idx[above], minlength=n_units)
        h_i = np.bincount(idx[above], weights=y[above].astype(float), minlength=n_units)
        nz = n_i > 0
        if mu >= 1.0:
            ok = False
        elif bound == "betting":
            ok = precision_evidence(n_i[nz], h_i[nz], mu, level=a_test) >= log_need
        else:
            ok = lower_bound(k, n, 1.0 - a_test, bound) >= mu
        step = {"threshold": t, "n": n, "hits": k, "images": int(nz.sum()),
                "estimate": k / n if n else None, "slack": slack, "job_rows": jn}
        if not ok:
            fail = step
            break  # fixed sequence: the first failure ends the walk
        best = step
    if best is None:
        if fail is None:
            more = m0
            return base.model_copy(update={
                "needed": more, "reason": f"fewer than {m0} reviews lie above any threshold "
                f"the walk could start at; at least {more} more review(s) are needed"})
        extra = f" (+ {fail['slack']:.3f} for this job's {fail['job_rows']} rows)" if per_job else ""
        return base.model_copy(update={k: v for k, v in fail.items() if k != "threshold"} | {
            "reason": f"no threshold reaches precision {target}{extra}: the walk's first test, "
            f"the {fail['n']} reviewed rows on {fail['images']} images with raw score >= "
            f"{fail['threshold']:.3f}, had {fail['hits']} right: not enough evidence at "
            f"{confidence:.0%} confidence"})
    return base.model_copy(update=best | {"lower": target})


def reviews_needed(have: int, target: float, confidence: float = 0.95,
                   bound: Bound = "betting", holdout: float = HOLDOUT,
                   min_fit: int = MIN_FIT) -> int:
    """More reviews (at least) before a key can be fitted and routed at ``target`` (the fit
    needs ``min_fit`` outside the held-out images; the bound counts every review)."""
    total = max(math.ceil(min_fit / (1 - holdout)), min_holdout(target, confidence, bound))
    return max(0, total - have)
