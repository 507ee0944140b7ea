"""The gate of ``groundlabel retrain``: which items are held out, how a candidate adapter and
production are compared on them, and the decision.

- **Split by image** (`split`): every expression about one image falls on the same side, so the
  gate never scores an image the candidate was trained on under another expression.
- **Paired scoring** (`evaluate_items`): each held-out image is read once and both adapters
  answer the same items in the same vLLM engine that serves. An image that cannot be read is
  neither adapter's hit: it is left out of both sides and counted (``unreadable``).
- **Paired test per image** (`compare`): the items of one image are not independent (one
  picture is easy or hard for both adapters), so the unit is the image, as in the split: for
  each image d = candidate hits - production hits over its items, and an exact one-sided sign
  test on the images with d != 0 (exact McNemar when every image has one item). Treating the
  items as independent, as the gate did before, promoted a no-better candidate 5.5-7.3 % of
  the time at a nominal 5 % (5 expressions per image, within-image correlation 0.5). The
  candidate is promoted only when it is better at this gate's alpha, by at least ``margin``
  Acc@0.5, on at least ``min_heldout`` scored items.
- **Repeated gates** (`spend`): the k-th gate against one production tests at
  alpha / (k (k + 1)) (alpha = 1 - confidence), so over all of them a no-better candidate is
  promoted at most alpha of the time (train/schedule.py says why this scheme). The registry
  remembers k: every gated event's metrics carry ``sequential``.
- **No forgetting** (`decide`): on the held-out items that production was already trained with
  (labels at or before its snapshot version) and on an optional regression set of an older
  domain, a non-inferiority test: refused unless the upper ``confidence`` bound of the drop
  (production - candidate Acc@0.5, paired, images as clusters: `drop_bound`) is at most
  ``max_forgetting``, and refused as "too few" below ``min_forgetting`` scored items. (Before,
  the observed drop was compared with the margin: a true 8-point loss passed 14-37 % of the
  time.)

Check a decision by hand (no engine needed)::

    python -c "from train.gate import compare; print(compare([1]*12 + [0]*3, [0]*12 + [1]*3))"
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from pathlib import Path

from grounding.labels import image_key, image_unit
from grounding.storage import StorageOptions
from train.config import RetrainConfig

# What the held-out side is a function of; recorded with every verdict so that a change of rule
# is visible in the registry (adapters gated before it were split by a hash of item_id).
SPLIT_RULE = "image-ref-sha256"

def heldout(item: dict, holdout_frac: float) -> bool:
    """True when ``item`` is on the held-out side: sha256 of its `image_key` (its item_id when it
    has no image) below ``holdout_frac``."""
    return image_unit(item) < holdout_frac


def split(items: list[dict], holdout_frac: float) -> tuple[list[dict], list[dict]]:
    """(train, held-out) by image, so no image straddles the split.

    The side is a hash of the normalised image *reference* (`image_key`), not of the image's
    bytes. Why the reference: it is in every store record, so the split costs no I/O (hashing
    the content would mean reading every image of every snapshot on the driver) and an image
    that cannot be read still gets a side; store records never change, and sha256 is the same
    in every process (``hash()`` is not), so an image keeps its side in every later store
    version, whatever labels arrive. Images sent inline are referenced by their content hash
    already. The limit: one picture stored under two different references counts as two
    images; deduplicate such copies before importing if that matters.
    """
    train, held = [], []
    for it in items:
        (held if heldout(it, holdout_frac) else train).append(it)
    return train, held


def hit(pred: list, gold: list[list[float]]) -> bool:
    """Acc@0.5 for one item: the first predicted box overlaps a true box with IoU >= 0.5; an
    item whose answer is "no such object" is a hit when nothing is predicted."""
    from grounding.boxes import Box

    if not gold:
        return not pred
    if not pred:
        return False
    return any(pred[0].iou(Box.from_list(g)) >= 0.5 for g in gold)


# ---------------------------------------------------------------------------------------------
# The statistics: pure functions of hit vectors
# ---------------------------------------------------------------------------------------------
TEST = "exact sign test on per-image differences, one-sided"
SPENDING = "alpha spending alpha/(k(k+1)) per production"


def unit_of(item: dict) -> str:
    """The unit of the paired test: the item's image (`image_key`; its item_id without one),
    the same unit as the held-out split."""
    return image_key(item.get("image")) or f"item:{item['item_id']}"


def _arrays(candidate, production, units):
    """(cand, prod, unit index) of the readable items, and the count of unreadable ones."""
    import numpy as np

    if len(candidate) != len(production):
        raise ValueError(f"paired hit vectors differ in length: {len(candidate)} vs "
                         f"{len(production)}")
    c = np.asarray(candidate)
    p = np.asarray(production)
    if c.dtype == object or p.dtype == object:  # None = unreadable
        ok = np.array([x is not None and y is not None for x, y in zip(c, p, strict=True)],
                      dtype=bool)
        c = np.array([bool(x) for x in np.where(ok, c, False)], dtype=bool)
        p = np.array([bool(x) for x in np.where(ok, p, False)], dtype=bool)
    else:
        c, p = c.astype(bool), p.astype(bool)
        ok = np.ones(len(c), dtype=bool)
    if units is None:
        u = np.arange(len(c))
    else:
        if len(units) != len(c):
            raise ValueError(f"units differ in length from the hit vectors: {len(units)} vs "
                             f"{len(c)}")
        u = np.unique(np.asarray(units), return_inverse=True)[1].ravel()
    return c[ok], p[ok], u[ok], int((~ok).sum())


def compare(candidate, production, confidence: float = 0.95, units=None) -> dict:
    """Paired comparison of two hit vectors over the same items (None = unreadable image: left
    out of both sides), per *unit*: ``units[i]`` is item i's image (`unit_of`); None: every
    item its own unit (then the test is the exact McNemar test).

    The items of one image are not independent (the same picture is easy or hard for both
    adapters), so the unit of the test is the image, as it is of the held-out split: for each
    image, d = candidate hits - production hits over its items. ``p_better``: exact one-sided
    sign test on the images with d != 0 (the chance of at least ``images_candidate_better`` of
    them favouring the candidate if an image were as likely to favour either: binomial, p=1/2);
    valid however the items of an image are correlated, as long as images are independent.
    ``p_worse``: the same the other way.

    ``diff``: the Acc@0.5 difference over items (candidate - production); ``se``: its standard
    error with images as clusters (ratio estimator, cluster-robust); ``diff_interval``: each end
    a one-sided bound at ``confidence`` (Student t on ``images - 1`` degrees of freedom).
    """
    import numpy as np
    from scipy.special import bdtr, bdtrc, stdtrit  # binomial cdf / sf, Student t quantile

    c, p, u, unreadable = _arrays(candidate, production, units)
    n = len(c)
    b, c_ = int((c & ~p).sum()), int((p & ~c).sum())
    out = {"test": TEST, "n": n, "unreadable": unreadable,
           "candidate": round(float(c.mean()), 4) if n else None,
           "production": round(float(p.mean()), 4) if n else None,
           "diff": round((b - c_) / n, 4) if n else None,
           "candidate_only": b, "production_only": c_, "confidence": confidence,
           "images": 0, "images_candidate_better": 0, "images_production_better": 0,
           "p_better": 1.0, "p_worse": 1.0, "se": None,
           "diff_interval": [0.0, 0.0] if n else None}
    if not n:
        return out
    d = np.bincount(u, weights=c.astype(float) - p)
    m = np.bincount(u).astype(float)
    d, m = d[m > 0], m[m > 0]  # images with no readable item are no unit
    g = len(d)
    pos, neg = int((d > 0).sum()), int((d < 0).sum())
    diff = (b - c_) / n
    se = 0.0
    if g > 1:
        e = d - diff * m
        se = float(np.sqrt(g / (g - 1) * (e ** 2).sum()) / m.sum())
    t = float(stdtrit(max(g - 1, 1), confidence))
    out.update(images=g, images_candidate_better=pos, images_production_better=neg,
               se=round(se, 6), diff_interval=[round(diff - t * se, 4), round(diff + t * se, 4)])
    if pos + neg:
        out.update(p_better=1.0 if pos == 0 else float(bdtrc(pos - 1, pos + neg, 0.5)),
                   p_worse=float(bdtr(pos, pos + neg, 0.5)))
    return out


def compare_part(candidate, production, mask: list[bool], want: bool,
                 confidence: float = 0.95, units=None) -> dict:
    """`compare` on the items where ``mask`` is ``want`` (e.g. the labels of earlier versions)."""
    keep = [i for i, m in enumerate(mask) if m == want]
    return compare([candidate[i] for i in keep], [production[i] for i in keep], confidence,
                   None if units is None else [units[i] for i in keep])


def drop_bound(cmp: dict, max_forgetting: float, confidence: float) -> float:
    """Upper ``confidence`` bound of the Acc@0.5 drop (production - candidate), per image, as
    the forgetting test uses it: Student t on the images, with the standard error at least
    that of a drop of ``max_forgetting`` over ``n`` independent items (sqrt(m(1-m)/n), the
    smallest it can be where the drop is the margin). Without that floor, a sample that shows
    no loss by chance (a few items, rare discordance) would have a standard error of 0 and a
    bound of 0: an 8-point loss would pass 8 % of the time at n = 30."""
    from scipy.special import stdtrit

    n, g = cmp["n"], max(cmp.get("images") or cmp["n"], 2)
    drop = (cmp["production_only"] - cmp["candidate_only"]) / n
    se = max(cmp.get("se") or 0.0, math.sqrt(max_forgetting * (1 - max_forgetting) / n))
    return drop + float(stdtrit(g - 1, confidence)) * se


def decide(heldout_cmp: dict, earlier: dict | None, regression: dict | None, *,
           min_heldout: int, confidence: float, margin: float, max_forgetting: float,
           alpha: float | None = None, min_forgetting: int = 50) -> tuple[bool, list[str]]:
    """(passed, reasons refused): the gate's rule on `compare` results. ``earlier``: on the
    held-out items production was trained with (None or n = 0: none to check); ``regression``:
    on the regression set (None: not given). ``alpha``: the level of this gate's test (`spend`:
    its share of the error allowed over all gates against this production; default
    1 - confidence, a gate on its own).

    Forgetting is a non-inferiority test: refused unless the upper ``confidence`` bound of the
    drop (`drop_bound`) is at most ``max_forgetting``, and refused as "too few" on fewer than
    ``min_forgetting`` scored items (a bound on so few cannot be trusted)."""
    reasons = []
    n = heldout_cmp["n"]
    if n < min_heldout:
        reasons.append(f"too few held-out items: {n} scored (< --min-heldout {min_heldout}; "
                       f"{heldout_cmp['unreadable']} unreadable images left out); review more "
                       f"labels or raise --holdout-frac")
    alpha = 1 - confidence if alpha is None else alpha
    if heldout_cmp["p_better"] > alpha + 1e-12:
        reasons.append(
            f"not better than production at alpha {alpha:.3g} (--confidence {confidence:g}"
            f"{'' if math.isclose(alpha, 1 - confidence) else ', spent over repeated gates'}): "
            f"{heldout_cmp.get('images_candidate_better', heldout_cmp['candidate_only'])} images "
            f"favour the candidate vs "
            f"{heldout_cmp.get('images_production_better', heldout_cmp['production_only'])} "
            f"production ({heldout_cmp['candidate_only']} vs {heldout_cmp['production_only']} "
            f"items), {heldout_cmp.get('test', 'exact McNemar')} p = "
            f"{heldout_cmp['p_better']:.3g} > {alpha:.3g}")
    if n and (heldout_cmp["candidate_only"] - heldout_cmp["production_only"]) < margin * n - 1e-9:
        reasons.append(f"Acc@0.5 lift {heldout_cmp['diff']:+.3f} on {n} held-out items is "
                       f"below --margin {margin:g}")
    for what, cmp in (("held-out items of earlier store versions", earlier),
                      ("the regression set (--regression-set)", regression)):
        if not cmp or not cmp["n"]:
            continue
        if cmp["n"] < min_forgetting:
            reasons.append(f"too few items to rule out forgetting on {what}: {cmp['n']} scored "
                           f"(< --min-forgetting {min_forgetting})")
            continue
        ub = drop_bound(cmp, max_forgetting, confidence)
        cmp["drop_upper"] = round(ub, 4)
        if ub > max_forgetting + 1e-9:
            reasons.append(f"forgets: Acc@0.5 on {what} fell {cmp['production']:.3f} -> "
                           f"{cmp['candidate']:.3f} ({cmp['n']} items, "
                           f"{cmp.get('images', cmp['n'])} images): the drop's upper "
                           f"{confidence:g} bound {ub:.3f} > --max-forgetting {max_forgetting:g}")
    return not reasons, reasons


def spend(events: list[dict], production: str | None, confidence: float,
          on: bool = True) -> dict:
    """This gate's share of the error allowed over all gates against ``production``.

    ``events``: the registry's events (`AdapterRegistry.events`, oldest first). The k-th gate
    since production last moved (a promotion or a rollback) tests at alpha_k =
    alpha / (k (k + 1)), alpha = 1 - confidence; these sum to alpha over any number of gates,
    so the chance that any candidate no better than this production is ever promoted over it
    is at most alpha, whatever the dependence between the gates (the held-out set grows and is
    reused). k is counted from the ``sequential`` record (this function's output) that each
    gated decision leaves in its event's metrics (promote, refuse, pass), so a restarted
    scheduler carries on where it was. ``on=False``: every gate at alpha (the rule before:
    nothing controls repeats)."""
    alpha = 1 - confidence
    k = 1
    for ev in reversed(events):
        if ev.get("kind") in ("promote", "rollback"):
            break
        metrics = ev.get("metrics")
        seq = metrics.get("sequential") if isinstance(metrics, dict) else None
        if isinstance(seq, dict) and seq.get("against") == production:
            k += 1
    if not on:
        return {"scheme": "none (every gate at alpha)", "against": production, "k": k,
                "alpha": alpha, "spent": alpha * k}
    return {"scheme": SPENDING, "against": production, "k": k, "alpha": alpha / (k * (k + 1)),
            "spent": alpha * k / (k + 1)}


def summary(v: dict) -> str:
    """One line of a verdict, for ``adapters list``, logs and ``retrain``'s output: which test
    ran, on how many images and items, at which alpha, and the decision with its reasons."""
    h = v.get("heldout") or {}
    seq = v.get("sequential") or {}

    def part(name: str, c: dict | None) -> str:
        if not c or not c.get("n"):
            return f"{name}: {(c or {}).get('note') or 'none'}"
        out = f"{name}: {c['production']:.3f} -> {c['candidate']:.3f} (n={c['n']}"
        if c.get("images"):
            out += f", {c['images']} images"
        if c.get("drop_upper") is not None:
            out += f", drop <= {c['drop_upper']:.3f}"
        return out + ")"

    alpha = seq.get("alpha", 1 - (v.get("rule") or {}).get("confidence", 0.95))
    head = (f"{h.get('test', 'exact McNemar, one-sided')} on {h.get('images', h.get('n'))} "
            f"images, held-out n={h.get('n')}: {h.get('production')} -> {h.get('candidate')}, "
            f"images +{h.get('images_candidate_better', h.get('candidate_only'))}"
            f"/-{h.get('images_production_better', h.get('production_only'))}, "
            f"p={h.get('p_better', 1):.2g} vs alpha={alpha:.2g}"
            + (f" (gate {seq['k']} against this production)" if seq.get("k") else ""))
    decision = ("passed" if v.get("passed")
                else "refused: " + "; ".join(v.get("reasons") or []))
    return "; ".join([head, part("new", v.get("new")), part("old", v.get("old")),
                      part("regression", v.get("regression")), decision])


# ---------------------------------------------------------------------------------------------
# Engine side
# ---------------------------------------------------------------------------------------------
def evaluate_items(engine, items: list[dict], adapters: dict[str, str | None],
                   batch_size: int = 32, storage: StorageOptions | None = None
                   ) -> dict[str, list[bool | None]]:
    """Per-item hits of each adapter (``{key: engine adapter name, None = base model}``) on
    labeled items, through ``engine``: one hit vector per key, aligned with ``items``, None where
    the image cannot be read (read once for all adapters, so it is left out of every side)."""
    from grounding.engines.grounder import Grounder, GroundingRequest
    from grounding.images import decode, read_bytes

    grounder = Grounder(engine)
    out: dict[str, list[bool | None]] = {k: [] for k in adapters}
    for i in range(0, len(items), batch_size):
        chunk, images = items[i:i + batch_size], []
        for it in chunk:
            try:
                images.append(decode(read_bytes(it["image"], storage)))
            except ValueError:  # ImageError: missing, corrupt, too large ...
                images.append(None)
        # All adapters' requests in one call: bigger engine calls are faster (FACTS.md).
        reqs, where = [], []
        for k, name in adapters.items():
            for j, (it, img) in enumerate(zip(chunk, images, strict=True)):
                if img is not None:
                    reqs.append(GroundingRequest(img, it["text"], name))
                    where.append((k, j))
        got: dict[tuple[str, int], bool] = {}
        for (k, j), res in zip(where, grounder.ground(reqs) if reqs else [], strict=True):
            got[(k, j)] = hit(res.boxes, chunk[j]["boxes"])
        for k in adapters:
            out[k].extend(got.get((k, j)) for j in range(len(chunk)))
    return out


def load_regression_set(uri: str, fmt: str, storage: StorageOptions | None = None) -> list[dict]:
    """Labeled items of a regression set: a label file in ``fmt``, or a reviewed-label store
    folder (its newest accepted/corrected labels)."""
    from grounding.convert import read_labels
    from grounding.store import ReviewStore, is_store

    if is_store(uri, storage):
        return ReviewStore(uri, storage).labels()
    res = read_labels(uri, fmt, storage)
    return [it for it in res.items if it.get("_decision") != "reject"]


def _rank(adapter_dir: str) -> int:
    return int(json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("r", 16))


def gate(cfg: RetrainConfig, adapter_dir: str, held: list[dict], production: str | None,
         registry, earlier_ids: set[str] | None = None, since_note: str | None = None,
         regression: list[dict] | None = None, sequential: dict | None = None) -> dict:
    """Score the candidate and production (None = the base model) on the held-out items (and
    the regression set), paired, through vLLM, and decide (`decide`).

    ``earlier_ids``: item_ids production was trained with (its snapshot's labels), which split
    the held-out items into ``old`` and ``new``; None when production has no snapshot in this
    store (``since_note`` says why). ``sequential``: this gate's level among the repeated gates
    against ``production`` (`spend`; None: a gate on its own, at 1 - confidence).
    """
    from grounding.engines import load_engine

    prod_dir = None
    if production:
        prod_dir = registry.download(production, tempfile.mkdtemp(prefix="gl-prod-"))
    rank = max([_rank(adapter_dir)] + ([_rank(prod_dir)] if prod_dir else []))
    engine = load_engine(cfg.inference.model_copy(update={
        "max_lora_rank": max(cfg.inference.max_lora_rank, rank),
        "vision_lora": not cfg.freeze_vision}))
    try:
        # Names never reused: vLLM caches adapters by name (vllm #42125).
        new = f"candidate-{Path(adapter_dir).name}-{time.time_ns()}"
        engine.add_adapter(new, adapter_dir)
        prod_name = None
        if prod_dir:
            prod_name = f"prod-{production}-{time.time_ns()}"
            engine.add_adapter(prod_name, prod_dir)
        names = {"candidate": new, "production": prod_name}
        hits = evaluate_items(engine, held, names, cfg.eval_batch_size, cfg.storage)
        reg_hits = (evaluate_items(engine, regression, names, cfg.eval_batch_size, cfg.storage)
                    if regression is not None else None)
    finally:
        engine.close()
    conf = cfg.confidence
    units = [unit_of(it) for it in held]
    all_cmp = compare(hits["candidate"], hits["production"], conf, units)
    if earlier_ids is None:
        new_cmp = dict(all_cmp, note="all held-out items are new: " + (since_note or ""))
        old_cmp = {"n": 0, "note": "no earlier-version held-out items: " + (since_note or "")}
    else:
        is_old = [it["item_id"] in earlier_ids for it in held]
        new_cmp, old_cmp = (compare_part(hits["candidate"], hits["production"], is_old, want,
                                         conf, units) for want in (False, True))
        if not new_cmp["n"]:
            new_cmp["note"] = f"no held-out labels newer than production's snapshot ({since_note})"
        if not old_cmp["n"]:
            old_cmp["note"] = f"no held-out labels in production's snapshot ({since_note})"
    reg_cmp = None
    if reg_hits is not None:
        reg_units = [unit_of(it) for it in regression]
        reg_cmp = dict(compare(reg_hits["candidate"], reg_hits["production"], conf, reg_units),
                       source=cfg.regression_set)
    sequential = sequential or spend([], production, conf, on=False)
    passed, reasons = decide(all_cmp, old_cmp, reg_cmp, min_heldout=cfg.min_heldout,
                             confidence=conf, margin=cfg.margin,
                             max_forgetting=cfg.max_forgetting, alpha=sequential["alpha"],
                             min_forgetting=cfg.min_forgetting)
    verdict = {
        "passed": passed, "reasons": reasons, "split": SPLIT_RULE,
        "rule": {"min_heldout": cfg.min_heldout, "confidence": conf, "margin": cfg.margin,
                 "max_forgetting": cfg.max_forgetting, "min_forgetting": cfg.min_forgetting,
                 "test": TEST, "alpha": sequential["alpha"],
                 "forgetting": "non-inferiority: upper confidence bound of the drop, per image"},
        # what the next gate against this production reads back (`spend`)
        "sequential": sequential,
        # The flat scores (older readers of the registry look here).
        "candidate": {"acc@0.5": all_cmp["candidate"], "n": all_cmp["n"],
                      "unreadable": all_cmp["unreadable"]},
        "production": {"acc@0.5": all_cmp["production"], "n": all_cmp["n"],
                       "unreadable": all_cmp["unreadable"], "name": production},
        "heldout": all_cmp, "new": new_cmp, "old": old_cmp, "regression": reg_cmp,
    }
    verdict["summary"] = summary(verdict)
    return verdict


# ---------------------------------------------------------------------------------------------
# Training items: new labels plus a replayed share of earlier ones
# ---------------------------------------------------------------------------------------------
def mix(new: list[dict], earlier: list[dict], share: float, seed: int,
        max_items: int | None = None) -> tuple[list[dict], dict]:
    """The training list: the new items and at least ``share`` of entries from ``earlier`` ones
    (see `RetrainConfig.replay_share`), deterministic for a seed. Returns (items, counts)."""
    rng = random.Random(seed)
    new = sorted(new, key=lambda it: it["item_id"])
    earlier = sorted(earlier, key=lambda it: it["item_id"])
    rng.shuffle(new)
    rng.shuffle(earlier)
    n_new = len(new)
    if max_items is not None:  # new items first, but leave ``share`` of the cap to earlier ones
        n_new = min(n_new, math.floor((1 - share) * max_items + 1e-9) if earlier else max_items)
    # Entries of earlier items that make them ``share`` of the list next to n_new new ones.
    floor_ = math.ceil(share * n_new / (1 - share) - 1e-9) if earlier else 0
    n_old = max(len(earlier), floor_)
    if max_items is not None:
        n_old = min(n_old, max_items - n_new)
    old = [earlier[i % len(earlier)] for i in range(n_old)] if earlier else []
    out = new[:n_new] + old
    rng.shuffle(out)  # workers take every k-th item: each gets the same mix
    counts = {"new": n_new, "new_available": len(new), "earlier": min(n_old, len(earlier)),
              "earlier_available": len(earlier), "earlier_entries": n_old,
              "earlier_share": round(n_old / len(out), 4) if out else None,
              "replay_share": share}
    return out, counts
