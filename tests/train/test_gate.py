"""The gate: split by image, the paired test and the decision (pure functions of hit vectors),
the replay mix, and which labels count as earlier ones. Fast: no engine; the slow tests through
vLLM live in test_retrain.py (they reuse its trained adapter)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from grounding.labels import image_key, item
from grounding.registry import AdapterRegistry
from grounding.store import ReviewStore, decision_record
from train.gate import compare, compare_part, decide, heldout, mix, split
from train.retrain import earlier_labels


def _items(n_images: int, per_image: int, prefix: str = "/data/img") -> list[dict]:
    return [item(f"{prefix}-{i}.png", f"object {j} of image {i}", [[0, 0, 10, 10]])
            for i in range(n_images) for j in range(per_image)]


# ---- split ----------------------------------------------------------------------------------
def test_split_keeps_every_expression_of_an_image_on_one_side():
    items = _items(300, 4)
    train, held = split(items, 0.2)
    held_images = {it["image"] for it in held}
    assert not held_images & {it["image"] for it in train}  # no image straddles
    assert 40 < len(held_images) < 80 and len(held) == 4 * len(held_images)
    # the old rule (a hash of item_id) put expressions of one image on both sides
    by_id = {it["item_id"]: it for it in items}
    assert len(held) + len(train) == len(by_id)


def test_split_is_stable_across_snapshots_and_processes(tmp_path):
    """An image keeps its side when new labels (new expressions of it, new images) arrive, and
    another Python process computes the same sides."""
    store = ReviewStore(str(tmp_path / "store"))
    first = _items(60, 2)
    store.append([decision_record(it, "accept") for it in first], source="test")
    later = _items(60, 3)[2::3] + _items(40, 2, prefix="/data/new")  # 3rd expressions, new images
    store.append([decision_record(it, "correct") for it in later], source="test")
    v1_train, v1_held = split(store.labels(1), 0.25)
    v2_train, v2_held = split(store.labels(2), 0.25)
    side = {it["image"]: "held" for it in v1_held} | {it["image"]: "train" for it in v1_train}
    assert all(side.get(it["image"], "held") == "held" for it in v2_held)
    assert all(side.get(it["image"], "train") == "train" for it in v2_train)
    assert {it["item_id"] for it in v1_held} <= {it["item_id"] for it in v2_held}
    code = ("import json, sys; from train.gate import heldout; "
            "print(json.dumps([heldout({'item_id': 'x', 'image': r}, 0.25) "
            "for r in json.load(sys.stdin)]))")
    refs = sorted(side)
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(refs), text=True,
                         capture_output=True, check=True).stdout
    assert json.loads(out) == [side[r] == "held" for r in refs]


@pytest.mark.parametrize("a, b", [
    ("/data/a.png", "file:///data/a.png"),                       # file:// is the same file
    ("/data/x/../a.png", "/data/./a.png"),                       # dot segments
    ("/data//a.png", "/data/a.png"),                             # doubled slash
    (" /data/a.png\n", "/data/a.png"),                           # stray whitespace
    ("S3://Bucket/k/a.png", "s3://bucket/k/a.png"),              # scheme and host case
    ("https://h/a.png?X-Amz-Signature=1&X-Amz-Expires=60",       # pre-signed S3 links of one
     "https://h/a.png?X-Amz-Signature=2&X-Amz-Expires=300"),     # object differ only in signing
    ("https://h/a.png?sv=1&sig=abc&id=7", "https://h/a.png?id=7&sig=def"),  # Azure SAS
])
def test_image_key_same_image(a, b):
    assert image_key(a) == image_key(b)


@pytest.mark.parametrize("a, b", [
    ("/data/a.png", "/data/b.png"),                              # other file
    ("https://h/img?id=1", "https://h/img?id=2"),                # the query names the image
    ("s3://b/k/A.png", "s3://b/k/a.png"),                        # object keys are case-sensitive
    ("inline:sha256:aa", "inline:sha256:bb"),                    # inline images: content hash
])
def test_image_key_other_image(a, b):
    assert image_key(a) != image_key(b)


def test_items_without_image_fall_back_to_item_id():
    assert heldout({"item_id": "a", "image": None}, 0.5) in (True, False)
    assert image_key(None) is None and image_key("  ") is None


# ---- the paired test ------------------------------------------------------------------------
T, F, U = True, False, None


@pytest.mark.parametrize("cand, prod, want", [
    # identical answers: no discordant item, nothing to learn -> p = 1
    ([T, F, T, F] * 25, [T, F, T, F] * 25,
     {"n": 100, "candidate_only": 0, "production_only": 0, "p_better": 1.0, "diff": 0.0}),
    # 10 wins, 0 losses: exact one-sided p = 0.5**10
    ([T] * 10 + [F] * 40, [F] * 50, {"n": 50, "candidate_only": 10, "p_better": 0.5 ** 10}),
    # 12 wins vs 3 losses: P(X >= 12 | 15, 1/2) = 576/32768
    ([T] * 12 + [F] * 3, [F] * 12 + [T] * 3, {"candidate_only": 12, "production_only": 3,
                                             "p_better": 576 / 32768}),
    # the reverse is worse, not better
    ([F] * 12 + [T] * 3, [T] * 12 + [F] * 3, {"p_worse": 576 / 32768, "diff": -0.6}),
    # unreadable images are nobody's hit: left out of both sides, counted
    ([T, U, T, F], [F, U, T, T], {"n": 3, "unreadable": 1, "candidate": 0.6667,
                                  "production": 0.6667}),
    # nothing readable: no scores, p = 1
    ([U, U], [U, U], {"n": 0, "unreadable": 2, "candidate": None, "p_better": 1.0}),
])
def test_compare(cand, prod, want):
    got = compare(cand, prod, 0.95)
    for k, v in want.items():
        assert got[k] == pytest.approx(v), (k, got)


def test_compare_interval_agrees_with_the_test():
    # promotion at 95 % <=> the one-sided 95 % lower bound of the difference is above 0
    for wins, losses in [(9, 2), (8, 2), (10, 3), (6, 0), (5, 0), (20, 10)]:
        c = compare([T] * wins + [F] * losses + [T] * 30, [F] * wins + [T] * losses + [T] * 30)
        assert (c["p_better"] <= 0.05) == (c["diff_interval"][0] > 0), (wins, losses, c)
        assert c["diff_interval"][0] <= c["diff"] <= c["diff_interval"][1]


def test_compare_part_keeps_the_pairs():
    # items 0-2 of earlier versions (the candidate loses one), 3-5 new (it wins two)
    cand, prod, old = [T, F, T, T, T, U], [T, T, T, F, F, U], [T, T, T, F, F, F]
    earlier, new = compare_part(cand, prod, old, True), compare_part(cand, prod, old, False)
    assert (earlier["n"], earlier["production_only"], earlier["candidate_only"]) == (3, 1, 0)
    assert (new["n"], new["unreadable"], new["candidate_only"]) == (2, 1, 2)


def test_compare_refuses_unpaired_vectors():
    with pytest.raises(ValueError, match="differ in length"):
        compare([T, F], [T])


RULE = {"min_heldout": 50, "confidence": 0.95, "margin": 0.02, "max_forgetting": 0.05}
BETTER = compare([T] * 30 + [F] * 2 + [T] * 40, [F] * 30 + [T] * 2 + [T] * 40)  # +28 of 72
SAME = compare([T, F] * 40, [T, F] * 40)
# on earlier labels: 10 of 100 lost (0.10 drop) / 3 of 100 lost (0.03 drop, tolerated)
FORGOT = compare([F] * 10 + [T] * 90, [T] * 100)
SLIGHT = compare([F] * 3 + [T] * 97, [T] * 100)


@pytest.mark.parametrize("heldout_cmp, earlier, regression, rule, reasons", [
    # clearly better, nothing earlier to check (first retrain): promoted
    (BETTER, {"n": 0, "note": "production is the base model"}, None, {}, []),
    # no better than production (identical answers): refused by the paired test (and margin)
    (SAME, None, None, {}, ["not better than production", "below --margin"]),
    # clearly better but on too few items: refused, naming the flag
    (compare([T] * 20, [F] * 20), None, None, {}, ["--min-heldout 50"]),
    # significant but below a minimum effect
    (BETTER, None, None, {"margin": 0.5}, ["below --margin"]),
    # a stricter confidence: 28 vs 2 still passes at 0.999
    (BETTER, None, None, {"confidence": 0.999}, []),
    # better on the new labels, but forgets the earlier ones
    (BETTER, FORGOT, None, {}, ["forgets: Acc@0.5 on held-out items of earlier"]),
    # a drop within the tolerance is allowed
    (BETTER, SLIGHT, SLIGHT, {}, []),
    # forgets the regression set (an older domain)
    (BETTER, SLIGHT, FORGOT, {}, ["forgets: Acc@0.5 on the regression set"]),
    # a looser tolerance lets the same drop through
    (BETTER, FORGOT, FORGOT, {"max_forgetting": 0.1}, []),
    # every failing check is reported, not only the first
    (compare([F] * 10, [T] * 10), FORGOT, FORGOT, {},
     ["--min-heldout", "not better", "--margin", "earlier", "regression set"]),
])
def test_decide(heldout_cmp, earlier, regression, rule, reasons):
    passed, got = decide(heldout_cmp, earlier, regression, **(RULE | rule))
    assert passed == (not reasons)
    assert len(got) == len(reasons), got
    for want, g in zip(reasons, got, strict=True):
        assert want in g, (want, g)


# ---- replay ---------------------------------------------------------------------------------
def _named(prefix: str, n: int) -> list[dict]:
    return [{"item_id": f"{prefix}{i:04d}"} for i in range(n)]


@pytest.mark.parametrize("n_new, n_old, share, cap, want", [
    # first retrain (no earlier labels): all items, no replay
    (100, 0, 0.2, None, {"new": 100, "earlier_entries": 0}),
    # earlier labels already over the share: every item once (nothing thrown away)
    (100, 300, 0.2, None, {"new": 100, "earlier": 300, "earlier_entries": 300}),
    # few earlier labels: repeated until they are 20 % of the list (25 entries next to 100)
    (100, 10, 0.2, None, {"new": 100, "earlier": 10, "earlier_entries": 25,
                          "earlier_share": 0.2}),
    # share 0: the natural mix
    (100, 10, 0.0, None, {"new": 100, "earlier_entries": 10}),
    # a cap: new items fill at most 80 %, earlier ones the rest
    (300, 1000, 0.2, 100, {"new": 80, "earlier": 20, "earlier_entries": 20}),
    # a cap with few new items: earlier ones fill the list up to the cap
    (10, 1000, 0.2, 100, {"new": 10, "earlier_entries": 90}),
    # same snapshot as production (gating at the same version): only earlier labels
    (0, 50, 0.2, None, {"new": 0, "earlier_entries": 50}),
])
def test_mix(n_new, n_old, share, cap, want):
    items, counts = mix(_named("n", n_new), _named("o", n_old), share, seed=0, max_items=cap)
    for k, v in want.items():
        assert counts[k] == v, (k, counts)
    assert len(items) == counts["new"] + counts["earlier_entries"]
    assert sum(it["item_id"].startswith("o") for it in items) == counts["earlier_entries"]
    assert len({it["item_id"] for it in items if it["item_id"].startswith("n")}) == counts["new"]


def test_mix_is_deterministic_by_seed():
    new, old = _named("n", 50), _named("o", 500)
    a, _ = mix(new, old, 0.2, seed=1, max_items=60)
    b, _ = mix(list(reversed(new)), list(reversed(old)), 0.2, seed=1, max_items=60)
    c, _ = mix(new, old, 0.2, seed=2, max_items=60)
    assert [i["item_id"] for i in a] == [i["item_id"] for i in b]  # input order does not matter
    assert [i["item_id"] for i in a] != [i["item_id"] for i in c]


# ---- which labels are earlier ones ----------------------------------------------------------
def _adapter(d, seed: int):
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (d / "adapter_model.safetensors").write_bytes(bytes([seed]) * 64)
    return d


def test_earlier_labels_are_those_of_productions_snapshot(tmp_path):
    store_uri = str(tmp_path / "store")
    store = ReviewStore(store_uri)
    v1 = _items(5, 1)
    store.append([decision_record(it, "accept") for it in v1], source="test")
    store.append([decision_record(it, "accept") for it in _items(3, 1, "/data/b")], source="t")
    reg = AdapterRegistry(str(tmp_path / "reg"))
    assert earlier_labels(store, reg, None, store_uri) == (None, None,
                                                           "production is the base model")
    name = reg.register(_adapter(tmp_path / "a", 1), {"store": store_uri, "snapshot_version": 1})
    ids, since, note = earlier_labels(store, reg, name, store_uri)
    assert ids == {it["item_id"] for it in v1} and since == 1 and "version 1" in note
    assert earlier_labels(store, reg, name, store_uri + "/")[0] == ids  # same store, other spelling
    other = reg.register(_adapter(tmp_path / "b", 2), {"store": "elsewhere", "snapshot_version": 1})
    ids, since, note = earlier_labels(store, reg, other, store_uri)
    assert ids is None and "not trained on a snapshot" in note


def test_a_downloaded_adapter_can_be_gated_and_registered_again(tmp_path):
    """`retrain --candidate` on a folder that `download` wrote (it holds the old meta.json)."""
    reg = AdapterRegistry(str(tmp_path / "reg"))
    first = reg.register(_adapter(tmp_path / "a", 1), {"snapshot_version": 1})
    again = reg.register(reg.download(first, tmp_path / "cache"), {"snapshot_version": 2},
                         name="again")
    assert reg.show(again)["snapshot_version"] == 2 and reg.show(first)["snapshot_version"] == 1


# ---- scoring through the engine -------------------------------------------------------------
@pytest.mark.slow
def test_unreadable_images_are_left_out_of_both_sides(vllm_engine, synth_shard, tmp_path):
    """Through real vLLM: a missing and a corrupt image are neither adapter's hit; they are left
    out of both sides and counted, instead of silently shrinking one side."""
    from train.gate import evaluate_items

    rows = [json.loads(line) for line in synth_shard.read_text().splitlines()][:4]
    items = [item(r["image"], r["text"], [r["bbox"]]) for r in rows]
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    items.insert(1, item(str(tmp_path / "missing.png"), "the red circle", [[0, 0, 5, 5]]))
    items.append(item(str(tmp_path / "corrupt.png"), "the red circle", [[0, 0, 5, 5]]))
    hits = evaluate_items(vllm_engine, items, {"a": None, "b": None}, batch_size=3)
    assert [h is None for h in hits["a"]] == [False, True, False, False, False, True]
    assert hits["a"] == hits["b"]  # the same model on the same items: the same answers
    c = compare(hits["a"], hits["b"])
    assert c["n"] == 4 and c["unreadable"] == 2 and c["p_better"] == 1.0
