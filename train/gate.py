"""The gate of ``groundlabel retrain``: which items are held out, how a candidate adapter and
production are compared on them, and the decision.

- **Split by image** (`split`): every expression about one image falls on the same side, so the
  gate never scores an image the candidate was trained on under another expression.
- **Paired scoring** (`evaluate_items`): each held-out image is read once and both adapters
  answer the same items in the same vLLM engine that serves. An image that cannot be read is
  neither adapter's hit: it is left out of both sides and counted (``unreadable``).
- **Paired test** (`compare`): an exact McNemar test on the discordant items (the candidate
  right where production is wrong, and the reverse). The candidate is promoted only when it is
  better at ``confidence`` (one-sided p <= 1 - confidence), by at least ``margin`` Acc@0.5, on at
  least ``min_heldout`` scored items.
- **No forgetting** (`decide`): on the held-out items that production was already trained with
  (labels at or before its snapshot version) and on an optional regression set of an older
  domain, the candidate may lose at most ``max_forgetting`` Acc@0.5 (paired, same items). This
  is the observed drop, not a test: a safety check errs towards refusing, and ``p_worse`` and
  n are recorded beside it (on a few items it is noisy: give a regression set for a firm one).

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

from grounding.labels import image_unit
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
def compare(candidate: list[bool | None], production: list[bool | None],
            confidence: float = 0.95) -> dict:
    """Paired comparison of two hit vectors over the same items (None = unreadable image: left
    out of both sides).

    ``p_better``: exact McNemar, one-sided: the chance of at least ``candidate_only`` wins out of
    the discordant items if both were equally good (binomial, p = 1/2). ``p_worse``: the same
    the other way. ``diff_interval``: the Acc@0.5 difference (candidate - production), each end a
    one-sided bound at ``confidence`` (exact Clopper-Pearson on the discordant items, given their
    count); promotion at ``confidence`` is equivalent to its lower end being above 0.
    """
    from scipy.stats import binomtest

    if len(candidate) != len(production):
        raise ValueError(f"paired hit vectors differ in length: {len(candidate)} vs "
                         f"{len(production)}")
    pairs = [(bool(c), bool(p)) for c, p in zip(candidate, production, strict=True)
             if c is not None and p is not None]
    n = len(pairs)
    b = sum(c and not p for c, p in pairs)  # the candidate alone is right
    c_ = sum(p and not c for c, p in pairs)  # production alone is right
    out = {"n": n, "unreadable": len(candidate) - n,
           "candidate": round(sum(c for c, _ in pairs) / n, 4) if n else None,
           "production": round(sum(p for _, p in pairs) / n, 4) if n else None,
           "diff": round((b - c_) / n, 4) if n else None,
           "candidate_only": b, "production_only": c_, "confidence": confidence,
           "p_better": 1.0, "p_worse": 1.0, "diff_interval": [0.0, 0.0] if n else None}
    if b + c_:
        m = b + c_
        up, down = binomtest(b, m, 0.5, "greater"), binomtest(b, m, 0.5, "less")
        lo = up.proportion_ci(confidence, "exact").low
        hi = down.proportion_ci(confidence, "exact").high
        out.update(p_better=float(up.pvalue), p_worse=float(down.pvalue),
                   diff_interval=[round((2 * lo - 1) * m / n, 4), round((2 * hi - 1) * m / n, 4)])
    return out


def compare_part(candidate: list[bool | None], production: list[bool | None],
                 mask: list[bool], want: bool, confidence: float = 0.95) -> dict:
    """`compare` on the items where ``mask`` is ``want`` (e.g. the labels of earlier versions)."""
    keep = [i for i, m in enumerate(mask) if m == want]
    return compare([candidate[i] for i in keep], [production[i] for i in keep], confidence)


def decide(heldout_cmp: dict, earlier: dict | None, regression: dict | None, *,
           min_heldout: int, confidence: float, margin: float,
           max_forgetting: float) -> tuple[bool, list[str]]:
    """(passed, reasons refused): the gate's rule on `compare` results. ``earlier``: on the
    held-out items production was trained with (None or n = 0: none to check); ``regression``:
    on the regression set (None: not given)."""
    reasons = []
    n = heldout_cmp["n"]
    if n < min_heldout:
        reasons.append(f"too few held-out items: {n} scored (< --min-heldout {min_heldout}; "
                       f"{heldout_cmp['unreadable']} unreadable images left out); review more "
                       f"labels or raise --holdout-frac")
    alpha = 1 - confidence
    if heldout_cmp["p_better"] > alpha + 1e-12:
        reasons.append(
            f"not better than production at {confidence:g} confidence (--confidence): "
            f"{heldout_cmp['candidate_only']} items only the candidate got right vs "
            f"{heldout_cmp['production_only']} only production, exact McNemar p = "
            f"{heldout_cmp['p_better']:.3g} > {alpha:.3g}")
    if n and (heldout_cmp["candidate_only"] - heldout_cmp["production_only"]) < margin * n - 1e-9:
        reasons.append(f"Acc@0.5 lift {heldout_cmp['diff']:+.3f} on {n} held-out items is "
                       f"below --margin {margin:g}")
    for what, cmp in (("held-out items of earlier store versions", earlier),
                      ("the regression set (--regression-set)", regression)):
        if cmp and cmp["n"]:
            drop = (cmp["production_only"] - cmp["candidate_only"]) / cmp["n"]
            if drop > max_forgetting + 1e-9:
                reasons.append(f"forgets: Acc@0.5 on {what} fell {cmp['production']:.3f} -> "
                               f"{cmp['candidate']:.3f} ({cmp['n']} items, drop {drop:.3f} > "
                               f"--max-forgetting {max_forgetting:g})")
    return not reasons, reasons


def summary(v: dict) -> str:
    """One line of a verdict, for ``adapters list`` and logs."""
    h = v.get("heldout") or {}

    def part(name: str, c: dict | None) -> str:
        if not c or not c.get("n"):
            return f"{name}: {(c or {}).get('note') or 'none'}"
        return f"{name}: {c['production']:.3f} -> {c['candidate']:.3f} (n={c['n']})"

    head = (f"held-out n={h.get('n')}: {h.get('production')} -> {h.get('candidate')}, "
            f"+{h.get('candidate_only')}/-{h.get('production_only')}, "
            f"p={h.get('p_better', 1):.2g}")
    return "; ".join([head, part("new", v.get("new")), part("old", v.get("old")),
                      part("regression", v.get("regression"))])


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
         regression: list[dict] | None = None) -> dict:
    """Score the candidate and production (None = the base model) on the held-out items (and
    the regression set), paired, through vLLM, and decide (`decide`).

    ``earlier_ids``: item_ids production was trained with (its snapshot's labels), which split
    the held-out items into ``old`` and ``new``; None when production has no snapshot in this
    store (``since_note`` says why).
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
    all_cmp = compare(hits["candidate"], hits["production"], conf)
    if earlier_ids is None:
        new_cmp = dict(all_cmp, note="all held-out items are new: " + (since_note or ""))
        old_cmp = {"n": 0, "note": "no earlier-version held-out items: " + (since_note or "")}
    else:
        is_old = [it["item_id"] in earlier_ids for it in held]
        new_cmp, old_cmp = (compare_part(hits["candidate"], hits["production"], is_old, want, conf)
                            for want in (False, True))
        if not new_cmp["n"]:
            new_cmp["note"] = f"no held-out labels newer than production's snapshot ({since_note})"
        if not old_cmp["n"]:
            old_cmp["note"] = f"no held-out labels in production's snapshot ({since_note})"
    reg_cmp = None
    if reg_hits is not None:
        reg_cmp = dict(compare(reg_hits["candidate"], reg_hits["production"], conf),
                       source=cfg.regression_set)
    passed, reasons = decide(all_cmp, old_cmp, reg_cmp, min_heldout=cfg.min_heldout,
                             confidence=conf, margin=cfg.margin,
                             max_forgetting=cfg.max_forgetting)
    verdict = {
        "passed": passed, "reasons": reasons, "split": SPLIT_RULE,
        "rule": {"min_heldout": cfg.min_heldout, "confidence": conf, "margin": cfg.margin,
                 "max_forgetting": cfg.max_forgetting, "test": "exact McNemar, one-sided"},
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
