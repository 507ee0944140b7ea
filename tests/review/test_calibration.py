"""Calibrated confidence: outcomes from reviews, isotonic / Platt fits, ECE, lower bounds, the
auto-accept threshold's guarantee, the store's `auto` decision, the registry's calibrations and
routing a job's predictions (auto, audit, people; too few reviews)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from grounding import calibration as C
from grounding.labels import item
from grounding.registry import AdapterRegistry, RegistryError
from grounding.store import ReviewStore, decision_record

KEY = C.Key(model="models/m", adapter=None, prompt_version="qwen3_vl:abcd1234")


def _truth(s):
    """The world of these tests: raw scores are overconfident, P(right) = s**3."""
    return s ** 3


def _draw(n: int, seed: int, key=KEY) -> list[C.Outcome]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        s = rng.random() ** 0.3  # mostly high raw scores, as a model's are
        out.append(C.Outcome(item_id=f"{seed}-{i}", key=key, score=s,
                             hit=rng.random() < _truth(s)))
    return out


# ---------------------------------------------------------------------------------- outcomes


def test_outcome_of_each_decision():
    pred = item("/i.png", "the cat", [[0, 0, 10, 10]], width=20, height=20, score=0.8,
                model="m", prompt_version="p")
    near = item("/i.png", "the cat", [[1, 0, 10, 10]], width=20, height=20)
    far = item("/i.png", "the cat", [[10, 10, 20, 20]], width=20, height=20)
    none = item("/i.png", "the cat", [], width=20, height=20)
    rec = lambda it, d: decision_record(it, d, predicted=pred)  # noqa: E731
    assert C.outcome(rec(pred, "accept")) is True
    assert C.outcome(rec(near, "correct")) is True          # IoU 0.9: the prediction was right
    assert C.outcome(rec(far, "correct")) is False
    assert C.outcome(rec(none, "correct")) is False         # "no such object": a miss
    assert C.outcome(rec(pred, "reject")) is None            # unusable item: left out
    assert C.outcome(rec(pred, "auto")) is None              # nobody looked: left out
    unscored = decision_record(pred, "accept", predicted=dict(pred, score=None))
    assert C.outcome(unscored) is None
    assert C.key_of(rec(pred, "accept")) == C.Key(model="m", adapter=None, prompt_version="p")


def test_boxes_match_pairs_one_to_one():
    a, b = [0, 0, 10, 10], [20, 20, 30, 30]
    assert C.boxes_match([a, b], [b, a])
    assert not C.boxes_match([a, a], [a, b])   # both predictions on one true box
    assert not C.boxes_match([a], [a, b])
    assert C.boxes_match([], [])


# ---------------------------------------------------------------------------------- fitting


@pytest.mark.parametrize("method", ["isotonic", "platt"])
def test_fit_improves_ece_on_held_out_reviews(method):
    data = _draw(3000, seed=1)
    cal = C.fit(data, method)
    assert cal.n_fit + cal.n_holdout == 3000 and 1300 < cal.n_holdout < 1700
    fit_ids = {o.item_id for o in data if not C.held_out(o.item_id)}
    assert len(fit_ids) == cal.n_fit  # the held-out part is exactly the hash's choice
    q = cal.quality()
    assert q["ece_raw"] > 0.15                       # s**3 is far from s
    assert q["ece_calibrated"] < 0.05                # ... and the fit fixes it, held out
    assert q["ece_calibrated"] < q["ece_raw"] / 3
    grid = np.linspace(0.05, 0.95, 19)
    assert np.abs(cal(grid) - _truth(grid)).max() < 0.15    # isotonic steps: coarse
    assert all(np.diff(cal(grid)) >= -1e-12)          # monotone in the raw score


def test_isotonic_matches_scikit_learn_and_survives_json():
    from sklearn.isotonic import IsotonicRegression

    data = _draw(500, seed=2)
    cal = C.fit(data, "isotonic")
    part = [o for o in data if not C.held_out(o.item_id)]
    iso = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(
        [o.score for o in part], [o.hit for o in part])
    xs = np.linspace(-0.2, 1.2, 57)
    np.testing.assert_allclose(cal(xs), iso.predict(xs), atol=1e-12)
    back = C.Calibration.model_validate_json(cal.model_dump_json())
    np.testing.assert_allclose(back(xs), cal(xs))
    assert cal.one(None) is None and math.isnan(cal([None])[0])


def test_too_few_reviews_say_how_many_more():
    with pytest.raises(C.TooFewReviews) as e:
        C.fit(_draw(20, seed=3))
    assert e.value.needed == math.ceil(C.MIN_FIT / (1 - C.HOLDOUT)) - 20
    assert "more needed" in str(e.value)
    all_hits = [o.model_copy(update={"hit": True}) for o in _draw(200, seed=3)]
    with pytest.raises(C.TooFewReviews, match="only hits"):
        C.fit(all_hits)


def test_ece_and_reliability_by_hand():
    p = [0.05, 0.15, 0.15, 0.95, 1.0]
    y = [False, True, False, True, True]
    rel = C.reliability(p, y, bins=10)
    assert [(b["lo"], b["n"]) for b in rel] == [(0.0, 1), (0.1, 2), (0.9, 2)]
    assert rel[1]["hit_rate"] == 0.5 and rel[2]["mean_p"] == pytest.approx(0.975)
    want = (1 * 0.05 + 2 * abs(0.15 - 0.5) + 2 * abs(0.975 - 1.0)) / 5
    assert C.ece(p, y) == pytest.approx(want)
    assert C.ece([], []) is None


# ---------------------------------------------------------------------------------- bounds


def test_lower_bounds_agree_with_scipy():
    from scipy.stats import binomtest

    for k, n in [(90, 100), (59, 59), (5, 40), (0, 10), (300, 310)]:
        # one-sided at 95 % = the low end of a two-sided 90 % interval
        ci_exact = binomtest(k, n).proportion_ci(confidence_level=0.90, method="exact")
        ci_wilson = binomtest(k, n).proportion_ci(confidence_level=0.90, method="wilson")
        assert C.lower_bound(k, n, 0.95) == pytest.approx(ci_exact.low, abs=1e-9)
        assert C.lower_bound(k, n, 0.95, "wilson") == pytest.approx(ci_wilson.low, abs=1e-9)
        assert C.upper_bound(k, n, 0.95) == pytest.approx(ci_exact.high, abs=1e-9)
    assert C.min_holdout(0.95, method="clopper-pearson") == 59   # 0.95**59 < 0.05 <= 0.95**58
    assert C.min_holdout(0.98, method="clopper-pearson") == 149
    # the clustered betting test (routing's default) needs more all-right rows: 68 at 0.95 with
    # its prior tuned to the counts (88 with the uniform prior before it)
    assert C.min_holdout(0.95) == 68 and C.min_holdout(0.98) == 172
    # its bound is a little below the exact one, and rejects what it should
    for k, n in [(90, 100), (900, 1000)]:
        lb = C.lower_bound(k, n, 0.95, "betting")
        assert C.lower_bound(k, n) - 0.05 < lb < C.lower_bound(k, n)


# ------------------------------------------------- guarantees, in simulation (issue #29)
#
# The clustered world: images of M = 5 expressions; raw scores s = U**0.3 (U uniform), P(right
# | s) = s**3, and the rows of one image right or wrong together through a Gaussian copula with
# latent correlation RHO = 0.5. Its population precision above a raw threshold t is exact:
# with u0 = t**(1/0.3), E[U**0.9 | U >= u0] = (1 - u0**1.9) / (1.9 (1 - u0)).
#
# Each test runs DRAWS = 150 independent worlds at confidence 0.9 (nominal failure rate 0.1)
# and fails when more than LIMIT = 22 break the promise: scipy.stats.binom.cdf(22, 150, 0.2) =
# 0.059, so a true failure rate of 2x nominal (0.2) fails the test with probability 0.94; a
# method exactly at nominal fails it with probability binom.sf(22, 150, 0.1) = 0.026 (the
# seeds are fixed: the outcome is the same on every run).

M, RHO, CONF, DRAWS, LIMIT = 5, 0.5, 0.9, 150, 22


def _world(n_images: int, rng, tag: str):
    """Scores, hits and image ids of ``n_images`` images of the clustered world."""
    from scipy.stats import norm

    n = n_images * M
    s = rng.random(n) ** 0.3
    z = (math.sqrt(RHO) * np.repeat(rng.standard_normal(n_images), M)
         + math.sqrt(1 - RHO) * rng.standard_normal(n))
    hit = z < norm.ppf(np.clip(_truth(s), 1e-12, 1 - 1e-12))
    units = [f"{tag}/img{i}" for i in np.repeat(np.arange(n_images), M)]
    return s, hit, units


def _outcomes(s, hit, units, tag: str, sampled=None) -> list[C.Outcome]:
    return [C.Outcome(item_id=f"{tag}-{i}", key=KEY, score=float(v), hit=bool(h), unit=u,
                      sampled=True if sampled is None else bool(sampled[i]))
            for i, (v, h, u) in enumerate(zip(s, hit, units, strict=True))]


def _population_precision(t: float) -> float:
    u0 = min(1.0, max(0.0, t) ** (1 / 0.3))
    return 1.0 if u0 >= 1.0 else (1 - u0 ** 1.9) / (1.9 * (1 - u0))


def _choose(cal, target, conf=CONF, **kw):
    """`choose_threshold` with the keywords this version of it knows (so the test also runs,
    and fails, on the code before #29)."""
    import inspect

    known = inspect.signature(C.choose_threshold).parameters
    return C.choose_threshold(cal, target, conf, **{k: v for k, v in kw.items() if k in known})


def _raw_cut(cal, thr) -> float | None:
    """The raw score above which ``thr`` auto-accepts (a calibrated threshold is a raw one:
    calibration is monotone)."""
    if thr.threshold is None:
        return None
    if getattr(thr, "on", "calibrated") == "raw":
        return thr.threshold
    grid = np.linspace(0, 1, 200_001)
    ok = cal(grid) >= thr.threshold - 1e-12
    return float(grid[np.argmax(ok)]) if ok.any() else None


@pytest.mark.slow
def test_population_precision_and_the_reported_bound_hold_after_selection():
    """At confidence 0.95, over 300 worlds of 1,000 reviews (200 images of 5) and a 2,000-row
    job: the rows above the chosen threshold have population precision >= 0.8 (the promise),
    and >= the reported ``lower`` (shown as ``precision_lower_bound``, which must hold for the
    threshold that was selected), in all but at most 21 draws each. Nominal failure rate 0.05:
    binom.cdf(21, 300, 0.1) = 0.046, so a true rate of 2x nominal fails this with probability
    0.95 (binom.sf(21, 300, 0.05) = 0.049 at exactly nominal; the seeds are fixed).
    9 s on the idle 2-core VM, ~70 s beside a full test run, hence slow."""
    target, conf, draws, limit = 0.8, 0.95, 300, 21
    fails = below_lower = chosen = 0
    for d in range(draws):
        rng = np.random.default_rng(1000 + d)
        s, hit, units = _world(200, rng, f"p{d}")
        job, _, junits = _world(400, rng, f"pj{d}")
        cal = C.fit(_outcomes(s, hit, units, f"p{d}"))
        thr = _choose(cal, target, conf, job_scores=job, job_units=junits)
        cut = _raw_cut(cal, thr)
        if cut is None:
            continue
        chosen += 1
        assert thr.lower is not None and thr.lower >= target
        fails += _population_precision(cut) < target
        below_lower += _population_precision(cut) < thr.lower
    assert fails <= limit, f"{fails} of {draws} draws below the target"
    assert below_lower <= limit, f"{below_lower} of {draws} draws below the reported bound"
    assert chosen >= draws * 0.8      # ... and it does auto-accept something nearly every time


def test_the_audit_keeps_the_uniform_prior():
    """Routing's test ("above") weights its mixture toward the strongest bet; the audit's
    ("below") must find moderate drops, and keeps Robbins' uniform mixture: its evidence on
    single-row images is the uniform average of the Bernoulli likelihood ratios."""
    h = np.array([1] * 30 + [0] * 10)
    k = (np.arange(C.MIX) + 0.5) / C.MIX
    for mu in (0.9, 0.95):
        p1 = mu * k
        lr = np.cumsum(np.where(h[None, :] == 1, np.log(p1 / mu)[:, None],
                                np.log((1 - p1) / (1 - mu))[:, None]), axis=1)
        uniform = np.log(np.exp(lr).mean(axis=0)).max()
        assert C.precision_evidence(np.ones(40), h, mu, "below") == pytest.approx(uniform)


def test_job_slack_is_the_smaller_of_hoeffding_and_bernstein():
    """The finite-job margin: Hoeffding's over images, or Bernstein's with the variance of a
    job whose precision is >= the target (<= M N target (1 - target)), whichever is smaller
    for these counts. At 0.9, 200 single-row images: 0.064 instead of Hoeffding's 0.096."""
    L = math.log(1 / 0.025)
    ones = np.ones(200)
    hoeffding = math.sqrt(L * 200 / 2) / 200
    assert C.job_slack(ones, 0.975) == pytest.approx(hoeffding)          # no target: Hoeffding
    b = L / 3 + math.sqrt((L / 3) ** 2 + 2 * 200 * 0.09 * L)
    assert C.job_slack(ones, 0.975, 0.9) == pytest.approx(b / 200)
    assert C.job_slack(ones, 0.975, 0.9) < 0.7 * hoeffding
    # clustered: 40 images of 5 rows; Bernstein's variance is M N v = 5 * 200 * 0.09
    fives = np.full(40, 5)
    b5 = 5 * L / 3 + math.sqrt((5 * L / 3) ** 2 + 2 * 5 * 200 * 0.09 * L)
    assert C.job_slack(fives, 0.975, 0.9) == pytest.approx(b5 / 200)
    # below 0.5 the variance bound is 1/4, and Hoeffding is the smaller
    assert C.job_slack(ones, 0.975, 0.3) == pytest.approx(hoeffding)


@pytest.mark.slow
def test_per_job_precision_is_kept_for_a_200_row_job():
    """``per_job``: this job's own auto-accepted rows are >= the target right, in all but at
    most LIMIT of DRAWS draws of 2,000 reviews + a 200-row job (40 images of 5; 2x nominal
    fails with probability 0.94). The population promise does not give this (issue #29 (a):
    8-18 % of 200-row jobs fell below at 95 %), nor did the code before #29. The finite-job
    margin is Hoeffding's over images (valid whatever the within-image correlation), so in
    this world it auto-accepts little: the price of promising a small clustered job (its
    Bernstein alternative helps at high targets, not at 0.6)."""
    target, fails, chosen = 0.6, 0, 0
    for d in range(DRAWS):
        rng = np.random.default_rng(3000 + d)
        s, hit, units = _world(400, rng, f"j{d}")
        job, jhit, junits = _world(40, rng, f"jj{d}")
        cal = C.fit(_outcomes(s, hit, units, f"j{d}"))
        thr = _choose(cal, target, job_scores=job, job_units=junits, per_job=True)
        cut = _raw_cut(cal, thr)
        if cut is None or not (job >= cut - 1e-12).any():
            continue
        chosen += 1
        fails += jhit[job >= cut - 1e-12].mean() < target
    assert fails <= LIMIT, f"{fails} of {DRAWS} jobs below the target"
    assert chosen >= 3


@pytest.mark.slow
def test_per_job_precision_is_kept_at_a_high_target_with_bernstein():
    """``per_job`` at 0.85, where the margin is Bernstein's (`job_slack`): single-row images,
    P(right | s) = s**3, 3,000 reviews and a 3,000-row job per draw; the job's auto-accepted
    rows are >= 0.85 right in all but at most LIMIT of DRAWS draws (2x nominal fails this with
    probability 0.94), and it auto-accepts something in most draws. ~30 s, hence slow."""
    target, fails, chosen = 0.85, 0, 0
    for d in range(DRAWS):
        rng = np.random.default_rng(5000 + d)
        s = rng.random(6000) ** 0.3
        hit = rng.random(6000) < _truth(s)
        units = [f"b{d}/img{i}" for i in range(6000)]
        cal = C.fit(_outcomes(s[:3000], hit[:3000], units[:3000], f"b{d}"))
        job, jhit = s[3000:], hit[3000:]
        thr = C.choose_threshold(cal, target, CONF, job_scores=job, job_units=units[3000:],
                                 per_job=True)
        if thr.threshold is None or not (job >= thr.threshold - 1e-12).any():
            continue
        chosen += 1
        fails += jhit[job >= thr.threshold - 1e-12].mean() < target
    assert fails <= LIMIT, f"{fails} of {DRAWS} jobs below the target"
    assert chosen >= DRAWS // 2, f"auto-accepted something in only {chosen} of {DRAWS} draws"


@pytest.mark.slow
def test_five_routed_jobs_in_a_row_keep_their_share():
    """The walk's start does not feed back. Reviews: 1,000 rows (200 images); then five
    1,500-row jobs (300 images) are routed at 0.8 one after the other. People review what is
    not auto-accepted, and an audit share (5 %) of what is; the bound stream takes the audited
    rows and the reviewed rows below the same audit hash (`C.audit_unit`), as
    `pipelines.routing` does. A draw fails when the fifth job auto-accepts less than half the
    first job's share (before #29 the walk started among the low-score reviews and stopped:
    issue #29 (d), 6.5 % -> 47 % of draws accepting nothing) or when any job's threshold has
    population precision < 0.8. At most 4 of 20 such draws may fail: binom.cdf(4, 20, 0.4) =
    0.051, so a failure rate of 0.4 fails the test with probability 0.95 (this is a check on
    collapse, not on the nominal 10 % level, which the other tests check)."""
    target, share, fails, draws = 0.8, 0.05, 0, 20
    for d in range(draws):
        rng = np.random.default_rng(4000 + d)
        s, hit, units = _world(200, rng, f"f{d}")
        data = _outcomes(s, hit, units, f"f{d}")
        shares, bad = [], False
        for j in range(5):
            job, jhit, junits = _world(300, rng, f"f{d}j{j}")
            cal = C.fit(data)
            thr = _choose(cal, target, job_scores=job, job_units=junits)
            cut = _raw_cut(cal, thr)
            auto = job >= cut - 1e-12 if cut is not None else np.zeros(len(job), bool)
            shares.append(auto.mean())
            bad |= cut is not None and _population_precision(cut) < target
            tag = f"f{d}j{j}"
            unit = np.array([C.audit_unit(tag, f"{tag}-{i}") if hasattr(C, "audit_unit")
                             else random.Random(f"{tag}-{i}").random()
                             for i in range(len(job))])
            n_audit = math.ceil(share * auto.sum())
            audited = np.zeros(len(job), bool)
            if n_audit:
                audited[np.flatnonzero(auto)[np.argsort(unit[auto])[:n_audit]]] = True
            reviewed = ~auto | audited
            routed = auto.any()
            sampled = audited | (unit < share) if routed else np.ones(len(job), bool)
            data += [o for o, r in zip(_outcomes(job, jhit, junits, tag, sampled), reviewed,
                                       strict=True) if r]
        fails += bad or shares[-1] < shares[0] / 2
    assert fails <= 4, f"{fails} of {draws} draws collapsed or broke the promise"


def _audited_store(tmp_path, groups: list[tuple[int, float]], target: float, seed: int):
    """A store in which, per (rows, precision) of ``groups``, one calibration's auto-accepted
    rows were audited by people: rows in images of two (latent correlation RHO), each right
    with probability ``precision``."""
    from scipy.stats import norm

    rng = np.random.default_rng(seed)
    st = ReviewStore(str(tmp_path / "audits"))
    autos, people = [], []
    for g, (n, prec) in enumerate(groups):
        z = (math.sqrt(RHO) * np.repeat(rng.standard_normal((n + 1) // 2), 2)[:n]
             + math.sqrt(1 - RHO) * rng.standard_normal(n))
        right = z < norm.ppf(prec)
        for i in range(n):
            p = item(f"/a/{g}/{i // 2}.png", f"thing {i}", [[0, 0, 10, 10]], width=40,
                     height=40, score=0.99, model=KEY.model, prompt_version=KEY.prompt_version,
                     job_id=f"job{g}", row_id=f"r{i}")
            autos.append(decision_record(p, "auto", predicted=p, calibrated_score=0.99,
                                         auto_precision=target, calibration=f"cal-{g:04d}"))
            if right[i]:
                people.append(decision_record(p, "accept", predicted=p))
            else:
                people.append(decision_record(dict(p, boxes=[[20, 20, 30, 30]]), "correct",
                                              predicted=p))
    st.append(autos, source="auto")
    st.append(people, source="people")
    return st


def test_audit_alarm_false_alarm_rate_and_power_per_calibration(tmp_path):
    """`pipelines.routing.audit`, per calibration id (never pooled), at confidence 0.9:

    * DRAWS calibrations whose auto-accepted rows are right exactly at the target 0.9 (the
      promise holds, at its edge), 40 audited rows each: at most LIMIT alarms (nominal 10 %;
      binom.cdf(22, 150, 0.2) = 0.059, so a 20 % false-alarm rate fails with probability
      0.94). The point-estimate alarm before #29 fired about half the time here, and pooled
      every calibration of a target into one line.
    * DRAWS calibrations whose rows are right 0.75 of the time, 150 audited rows each: at
      most LIMIT miss the alarm (claimed power 0.9 at this size; a miss rate of 0.2 fails
      with probability 0.94)."""
    from pipelines.routing import audit

    groups = [(40, 0.9)] * DRAWS + [(150, 0.75)] * DRAWS
    st = _audited_store(tmp_path, groups, 0.9, seed=5)
    out = audit(st, confidence=CONF)
    assert len(out) == 2 * DRAWS, f"{len(out)} audit line(s) for {2 * DRAWS} calibrations"
    by = {a["calibration"]: a for a in out}
    null = [by[f"cal-{g:04d}"] for g in range(DRAWS)]
    alt = [by[f"cal-{g:04d}"] for g in range(DRAWS, 2 * DRAWS)]
    assert all(a["audited"] == 40 and a["images"] == 20 for a in null)
    false_alarms = sum(a["alarm"] for a in null)
    misses = sum(not a["alarm"] for a in alt)
    print(f"false alarms {false_alarms}/{DRAWS}, missed alarms {misses}/{DRAWS}")
    assert false_alarms <= LIMIT, f"{false_alarms} false alarms in {DRAWS}"
    assert misses <= LIMIT, f"{misses} missed alarms in {DRAWS}"
    assert all((a["evidence"] >= 1 / (1 - CONF)) == a["alarm"] for a in out)


def test_threshold_refuses_with_too_few_or_too_poor_reviews():
    cal = C.fit(_draw(80, seed=5))            # 80 reviews < the 184 needed for 0.98
    thr = C.choose_threshold(cal, 0.98)
    assert thr.threshold is None and thr.needed > 0 and "more review" in thr.reason
    poor = [o.model_copy(update={"hit": random.Random(o.item_id).random() < 0.3})
            for o in _draw(2000, seed=6)]
    thr = C.choose_threshold(C.fit(poor), 0.95)
    assert thr.threshold is None and thr.needed == 0 and "no threshold reaches" in thr.reason
    # every review counts in the bound now (raw-score routing), not only the held-out half
    assert C.reviews_needed(0, 0.95) == max(math.ceil(C.MIN_FIT / 0.5), C.min_holdout(0.95))
    assert C.reviews_needed(10_000, 0.95) == 0


# ---------------------------------------------------------------------------------- store


def _pred(i: int, score: float, box=(0, 0, 10, 10), adapter=None) -> dict:
    return item(f"/img/{i}.png", "the red square", [list(box)], width=40, height=40,
                score=score, scores=[score], model=KEY.model, adapter=adapter,
                prompt_version=KEY.prompt_version, job_id="j1", row_id=f"s:{i}")


def test_auto_never_overrules_a_person_and_is_not_trained_on(tmp_path):
    st = ReviewStore(str(tmp_path / "store"))
    a, b, c = _pred(1, 0.9), _pred(2, 0.9), _pred(3, 0.9)
    st.append([decision_record(a, "correct", predicted=a)], source="people")
    st.append([decision_record(x, "auto", predicted=x, calibrated_score=0.97,
                               auto_precision=0.95, calibration="cal-x") for x in (a, b, c)],
              source="auto")
    st.append([decision_record(b, "accept", predicted=b)], source="people")   # the audit
    snap = {r["item_id"]: r["decision"] for r in st.snapshot().to_pylist()}
    assert snap == {a["item_id"]: "correct", b["item_id"]: "accept", c["item_id"]: "auto"}
    assert {it["item_id"] for it in st.labels()} == {a["item_id"], b["item_id"]}
    assert {it["item_id"] for it in st.labels(include_auto=True)} == {
        a["item_id"], b["item_id"], c["item_id"]}
    auto = [r for r in st.history().to_pylist() if r["decision"] == "auto"]
    assert {r["auto_precision"] for r in auto} == {0.95} and auto[0]["calibration"] == "cal-x"


# ---------------------------------------------------------------------------------- registry


def test_registry_keeps_calibrations_per_adapter_newest_first(tmp_path, random_adapter):
    reg = AdapterRegistry(str(tmp_path / "reg"))
    assert reg.calibration(KEY) is None
    first, second = C.fit(_draw(300, seed=7)), C.fit(_draw(300, seed=8), "platt")
    reg.save_calibration(first)
    reg.save_calibration(second)
    assert reg.calibration(KEY).id == second.id
    name = reg.register(random_adapter, {"note": "test"})
    akey = KEY.model_copy(update={"adapter": name})
    assert reg.calibration(akey) is None            # the base model's is not the adapter's
    ad = C.fit(_draw(300, seed=9, key=akey))
    reg.save_calibration(ad)
    assert reg.calibration(akey).id == ad.id and reg.calibration(KEY).id == second.id
    other = KEY.model_copy(update={"prompt_version": "qwen3_vl:ffff0000"})
    assert reg.calibration(other) is None
    with pytest.raises(RegistryError):
        reg.save_calibration(C.fit(_draw(300, seed=9, key=KEY.model_copy(
            update={"adapter": "gl-not-registered"}))))


# ---------------------------------------------------------------------------------- routing


def _review_world(tmp_path, n_reviews: int, seed: int = 11):
    """A store of people's reviews of earlier predictions (P(right) = score**3), and a registry
    with the calibration fitted on them by `groundlabel review calibrate`."""
    from pipelines.routing import CalibrateConfig, calibrate

    rng = random.Random(seed)
    st = ReviewStore(str(tmp_path / "store"))
    recs = []
    for i in range(n_reviews):
        s = rng.random() ** 0.3
        p = _pred(10_000 + i, s)
        right = rng.random() < _truth(s)
        if right:
            recs.append(decision_record(p, "accept", predicted=p))
        else:
            recs.append(decision_record(dict(p, boxes=[[20, 20, 30, 30]]), "correct", predicted=p))
    st.append(recs, source="people")
    reg = str(tmp_path / "reg")
    out = calibrate(CalibrateConfig(store=str(tmp_path / "store"), registry=reg))
    return st, reg, out


def test_route_auto_accepts_audits_and_sends_the_rest(tmp_path):
    from pipelines.routing import Routing, audit, route

    st, reg, cal_out = _review_world(tmp_path, 1200)
    (k,) = cal_out["keys"]
    assert k["calibration"] and k["ece_calibrated"] < k["ece_raw"]
    rng = random.Random(3)
    items = [_pred(i, rng.random() ** 0.3) for i in range(400)]
    cfg = Routing(auto_accept_precision=0.8, audit_share=0.05, registry=reg, store=st.uri)
    r = route(items, cfg, None, job_id="j1")
    (info,) = r["keys"]
    thr = info["threshold"]
    assert thr is not None and info["precision_lower_bound"] >= 0.8
    # routing is on the raw score (#29); the calibrated one is still carried for people
    assert info["threshold_on"] == "raw" and info["promise"] == "population"
    assert r["auto"] and all(it["score"] >= thr - 1e-12 for it in r["auto"])
    assert all(it["score"] < thr for it in r["review"])
    assert all(it["calibrated"] is not None for it in r["auto"] + r["review"])
    assert len(r["auto"]) + len(r["review"]) == 400
    assert len(r["audit"]) == math.ceil(0.05 * len(r["auto"]))
    assert {id(x) for x in r["audit"]} <= {id(x) for x in r["auto"]}
    committed = [x for x in st.history().to_pylist() if x["decision"] == "auto"]
    assert len(committed) == len(r["auto"]) and r["version"] == st.latest()
    assert all(x["auto_precision"] == 0.8 and x["calibration"] == k["calibration"]
               for x in committed)
    # people review the audited rows: realised precision, and the alarm when it is too low
    assert audit(st)[0]["audited"] == 0
    wrong = [decision_record(dict(x, boxes=[[25, 25, 35, 35]]), "correct", predicted=x)
             for x in r["audit"]]
    st.append(wrong, source="people")
    (a,) = audit(st)
    assert a["audited"] == len(r["audit"]) and a["precision"] == 0.0 and a["alarm"]


def test_reviews_of_a_routed_job_enter_the_bound_only_as_a_uniform_sample(tmp_path):
    """After a routed job, people review its low-score rows and the audited auto rows. Only
    the audited rows and the reviewed rows below the audit hash count in the next threshold's
    bound (issue #29 (d): all of them made the evidence mostly low-score rows)."""
    from pipelines.routing import Routing, _usable, route

    st, reg, _ = _review_world(tmp_path, 1200)
    rng = random.Random(4)
    items = [_pred(50_000 + i, rng.random() ** 0.3) for i in range(600)]
    for it in items:
        it["job_id"] = "j2"
    r = route(items, Routing(auto_accept_precision=0.8, audit_share=0.05, registry=reg,
                             store=st.uri), None, job_id="j2")
    assert r["auto"] and r["audit"]
    st.append([decision_record(x, "accept", predicted=x) for x in r["review"] + r["audit"]],
              source="people")
    (data,) = _usable(st, audit_share=0.05).values()
    job2 = {o.item_id: o for o in data if o.item_id in {x["item_id"] for x in items}}
    audited = {x["item_id"] for x in r["audit"]}
    assert len(job2) == len(r["review"]) + len(r["audit"])
    for iid, o in job2.items():
        want = iid in audited or C.audit_unit("j2", iid) < 0.05
        assert o.sampled == want
    assert 0 < sum(o.sampled for o in job2.values()) < len(job2) / 5
    assert all(o.sampled for o in data if o.item_id not in job2)   # unrouted reviews: all
    assert all(o.unit and o.unit.startswith("/img/") for o in data)   # images as units


def test_route_with_too_few_reviews_auto_accepts_nothing(tmp_path):
    from pipelines.routing import Routing, route

    st, reg, cal_out = _review_world(tmp_path, 40)
    assert cal_out["keys"][0]["calibration"] is None and cal_out["keys"][0]["needed"] > 0
    items = [_pred(i, 0.99) for i in range(50)]
    r = route(items, Routing(auto_accept_precision=0.95, registry=reg, store=st.uri), None)
    (info,) = r["keys"]
    assert r["auto"] == [] and len(r["review"]) == 50 and r["version"] is None
    assert info["needed"] == C.reviews_needed(40, 0.95) and "more are needed" in info["why"]
    assert not any(x["decision"] == "auto" for x in st.history().to_pylist())
    # with a calibration but a holdout too small for 0.98: still nothing, and why
    st2, reg2, _ = _review_world(tmp_path / "b", 200)
    r = route(items, Routing(auto_accept_precision=0.98, registry=reg2, store=st2.uri), None)
    assert r["auto"] == [] and r["keys"][0]["needed"] > 0


def test_route_needs_a_store_and_a_registry(tmp_path):
    from grounding.store import StoreError
    from pipelines.routing import Routing, route

    with pytest.raises(StoreError, match="--registry"):
        route([_pred(1, 0.9)], Routing(auto_accept_precision=0.9), None)


def test_auto_labels_train_only_when_asked_and_are_never_held_out(tmp_path):
    from train.retrain import labels_for_training

    st = ReviewStore(str(tmp_path / "store"))
    people = [_pred(i, 0.5) for i in range(40)]
    autos = [_pred(1000 + i, 0.99) for i in range(40)]
    st.append([decision_record(p, "accept", predicted=p) for p in people], source="people")
    st.append([decision_record(a, "auto", predicted=a, auto_precision=0.9) for a in autos],
              source="auto")
    auto_ids = {a["item_id"] for a in autos}
    items, train, held = labels_for_training(st, st.latest(), 0.25)
    assert not auto_ids & {it["item_id"] for it in items + train + held}
    items2, train2, held2 = labels_for_training(st, st.latest(), 0.25, train_on_auto=True)
    assert items2 == items and held2 == held
    assert auto_ids <= {it["item_id"] for it in train2}
    assert not auto_ids & {it["item_id"] for it in held2}


def test_label_studio_round_trip_keeps_the_raw_score_for_calibration():
    """Tasks carry the calibrated score for sorting; what comes back is the raw one, so a
    refit never calibrates a calibrated score."""
    from grounding.convert.labelstudio import LABEL, parse_task, to_tasks

    p = dict(_pred(1, 0.42), calibrated=0.91)
    (task,) = to_tasks([p])
    assert task["predictions"][0]["score"] == 0.91 and task["data"]["score"] == 0.42
    task["annotations"] = [{"id": 1, "result": task["predictions"][0]["result"]}]
    it, problems = parse_task(task, {LABEL})
    assert not problems and it["_decision"] == "accept"
    assert it["_predicted"]["score"] == 0.42
