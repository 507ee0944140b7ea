"""Gold items measure each reviewer: Acc@0.5 against the known boxes and decision accuracy,
from the store; reviewers below a threshold can be left out of what trains and calibrates."""

from __future__ import annotations

import json

import pytest

from grounding.labels import item
from grounding.store import ReviewStore, decision_record

GOLD = {0: [[0, 0, 10, 10]], 1: [[20, 20, 40, 40]], 2: [], 3: [[0, 0, 10, 10]]}
PRED = {0: [[0, 0, 10, 10]], 1: [[0, 0, 5, 5]], 2: [[1, 1, 3, 3]], 3: [[0, 0, 10, 10]]}


def _it(k, boxes):
    return item(f"/data/{k}.png", f"thing {k}", boxes, width=100, height=80, model="m",
                prompt_version="p1")


def _rec(k, boxes, decision, who):
    return decision_record(_it(k, boxes), decision, reviewer=who, source="test",
                           predicted={"boxes": PRED.get(k, [[0, 0, 1, 1]]), "score": 0.5})


@pytest.fixture
def gold_file(tmp_path):
    p = tmp_path / "gold.jsonl"
    p.write_text("".join(json.dumps({"image": f"/data/{k}.png", "text": f"thing {k}",
                                     "bboxes": b, "width": 100, "height": 80}) + "\n"
                         for k, b in GOLD.items()))
    return str(p)


@pytest.fixture
def store(tmp_path):
    st = ReviewStore(str(tmp_path / "store"))
    st.append([
        # alice: right on every gold item (accepts 0 and 3, corrects 1 and 2)
        _rec(0, GOLD[0], "accept", "alice"), _rec(1, GOLD[1], "correct", "alice"),
        _rec(2, [], "correct", "alice"), _rec(3, GOLD[3], "accept", "alice"),
        # bob: accepts the model's wrong box on 1, rejects 2, corrects 3 to another place
        _rec(0, [[0.5, 0, 10, 10]], "correct", "bob"), _rec(1, PRED[1], "accept", "bob"),
        _rec(2, [], "reject", "bob"), _rec(3, [[50, 50, 60, 60]], "correct", "bob"),
        # ordinary items, labeled by each
        _rec(10, [[1, 1, 5, 5]], "correct", "alice"), _rec(11, [[2, 2, 6, 6]], "correct", "bob"),
    ], source="test")
    return st


def test_each_reviewer_is_scored_on_gold(store, gold_file):
    from grounding.gold import load_gold, score

    s = score(store, load_gold(gold_file, "seed"))
    assert s["alice"] == {"gold_items": 4, "acc50": 1.0, "decision_accuracy": 1.0}
    # bob: 0 right (IoU .95; decision correct where accept was due), 1 wrong, 2 wrong (reject),
    # 3 wrong
    assert s["bob"] == {"gold_items": 4, "acc50": 0.25, "decision_accuracy": 0.0}


def test_reviewers_below_the_threshold_are_left_out(store, gold_file):
    from grounding.gold import excluded_reviewers, load_gold

    gold = load_gold(gold_file, "seed")
    assert excluded_reviewers(store, gold, 0.5) == {"bob"}
    assert excluded_reviewers(store, gold, 0.2) == set()
    labels = {it["text"] for it in store.labels(exclude={"bob"})}
    assert "thing 11" not in labels and "thing 10" in labels
    # without bob nobody disagrees on the gold items any more
    assert store.resolution(exclude={"bob"})["unresolved"] == 0
    assert store.resolution()["unresolved"] == 3


def test_a_reviewer_without_gold_items_is_not_judged(tmp_path, gold_file):
    from grounding.gold import excluded_reviewers, load_gold, score

    st = ReviewStore(str(tmp_path / "s"))
    st.append([_rec(10, [[1, 1, 5, 5]], "correct", "carol")], source="test")
    assert score(st, load_gold(gold_file, "seed")) == {}
    assert excluded_reviewers(st, load_gold(gold_file, "seed"), 0.9) == set()


def test_agreement_on_the_command_line_shows_gold(store, gold_file, capsys):
    from groundlabel.cli import main

    assert main(["review", "agreement", store.uri, "--gold", gold_file,
                 "--gold-format", "seed"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gold"]["bob"]["acc50"] == 0.25


def test_calibrate_and_training_leave_the_noisy_reviewer_out_and_say_so(store, gold_file,
                                                                        tmp_path):
    from grounding.gold import ReviewerFilter
    from pipelines.routing import CalibrateConfig, calibrate
    from train.retrain import labels_for_training

    keep = ReviewerFilter(gold=gold_file, min_reviewer_accuracy=0.5)
    out = calibrate(CalibrateConfig(store=store.uri, registry=str(tmp_path / "reg"),
                                    reviewers=keep))
    assert out["excluded_reviewers"] == ["bob"] and out["excluded_decisions"] == 5
    assert out["reviewer_accuracy"] == {"alice": 1.0, "bob": 0.25}
    assert out["unresolved_items"] == 0
    assert out["keys"][0]["reviews"] == 5  # alice's 5 decisions, nobody disagreeing
    plain = calibrate(CalibrateConfig(store=store.uri, registry=str(tmp_path / "reg")))
    assert plain["keys"][0]["reviews"] == 3 and plain["unresolved_items"] == 3
    assert "excluded_reviewers" not in plain
    exclude, _ = keep.excluded(store)
    items, _, _ = labels_for_training(store, store.latest(), 0.25, exclude=exclude)
    assert {it["text"] for it in items} == {"thing 0", "thing 1", "thing 2", "thing 3",
                                            "thing 10"}


def test_min_reviewer_accuracy_needs_gold():
    from pydantic import ValidationError

    from grounding.gold import ReviewerFilter

    with pytest.raises(ValidationError, match="--min-reviewer-accuracy needs --gold"):
        ReviewerFilter(min_reviewer_accuracy=0.8)


def test_review_calibrate_flags_on_the_command_line(store, gold_file, tmp_path, capsys):
    from groundlabel.cli import main

    assert main(["review", "calibrate", store.uri, "--registry", str(tmp_path / "reg"),
                 "--gold", gold_file, "--min-reviewer-accuracy", "0.5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["excluded_reviewers"] == ["bob"] and out["excluded_decisions"] == 5
    with pytest.raises(SystemExit, match="--min-reviewer-accuracy needs --gold"):
        main(["review", "calibrate", store.uri, "--registry", str(tmp_path / "reg"),
              "--min-reviewer-accuracy", "0.5"])
