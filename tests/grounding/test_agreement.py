"""Agreement between reviewers, from the store: box agreement (boxes matched at IoU >= 0.5,
mean IoU of the matches) and decision agreement (Cohen's kappa, scikit-learn), overall, per
guideline version, per person and per pair; `groundlabel review agreement STORE` prints it."""

from __future__ import annotations

import json

import pytest

from grounding.labels import item
from grounding.store import ReviewStore, decision_record

G1, G2 = "team@1", "team@2"


def _rec(text, boxes, decision, who, guideline=G1):
    it = item("/data/img.png", text, boxes, width=100, height=80)
    return decision_record(it, decision, reviewer=who, guideline=guideline, source="test",
                           reviewed_at="2026-12-01T10:00:00+00:00")


@pytest.fixture
def store(tmp_path):
    st = ReviewStore(str(tmp_path / "store"))
    st.append([
        # i1: three people; bob's box one pixel narrower (IoU 0.9), carol accepts
        _rec("i1", [[0, 0, 10, 10]], "correct", "alice"),
        _rec("i1", [[1, 0, 10, 10]], "correct", "bob"),
        _rec("i1", [[0, 0, 10, 10]], "accept", "carol"),
        # i2: both reject; i3: both correct, boxes apart; i4: both "no such object"
        _rec("i2", [], "reject", "alice"), _rec("i2", [], "reject", "bob"),
        _rec("i3", [[0, 0, 10, 10]], "correct", "alice"),
        _rec("i3", [[20, 20, 30, 30]], "correct", "bob"),
        _rec("i4", [], "correct", "alice"), _rec("i4", [], "correct", "bob"),
        # i5: one person only: not an overlap, not counted
        _rec("i5", [[0, 0, 5, 5]], "correct", "alice"),
        # an auto decision is nobody's
        _rec("i1", [[0, 0, 10, 10]], "auto", None),
    ], source="test")
    # i6, under the next guideline: alice accepts, bob rejects
    st.append([_rec("i6", [[0, 0, 10, 10]], "accept", "alice", G2),
               _rec("i6", [], "reject", "bob", G2)], source="test")
    return st


def test_agreement_overall_per_guideline_person_and_pair(store):
    from sklearn.metrics import cohen_kappa_score

    from grounding.agreement import agreement

    a = agreement(store)
    assert a["version"] == 2 and a["overlapped_items"] == 5 and a["people"] == [
        "alice", "bob", "carol"]
    g1 = a["by_guideline"][G1]
    # 6 pairs under team@1: i1 (3 pairs), i2, i3, i4
    assert g1["pairs"] == 6 and g1["items"] == 4
    assert g1["decisions"]["agreement"] == pytest.approx(4 / 6)
    # box pairs: i1 x3 (all matched: IoU .9, 1, .9), i3 (0 of 2), i4 both empty
    assert g1["boxes"]["pairs"] == 5 and g1["boxes"]["both_empty"] == 1
    assert g1["boxes"]["matched_share"] == pytest.approx(6 / 8)
    assert g1["boxes"]["mean_iou"] == pytest.approx((0.9 + 1.0 + 0.9) / 3)
    ab = a["by_pair"]["alice | bob"]
    assert ab["pairs"] == 5  # i1, i2, i3, i4 under team@1 and i6 under team@2
    kappa = cohen_kappa_score(["correct", "reject", "correct", "correct", "accept"],
                              ["correct", "reject", "correct", "correct", "reject"])
    assert ab["decisions"]["kappa"] == pytest.approx(kappa)
    assert a["by_guideline"][G2]["decisions"]["agreement"] == 0.0
    alice = a["by_person"]["alice"]
    assert alice["pairs"] == 6 and alice["decisions"]["agreement"] == pytest.approx(4 / 6)
    assert a["by_person"]["carol"]["decisions"]["agreement"] == 0.0
    assert a["overall"]["pairs"] == 7
    # i1 (carol accepts, alice and bob correct: all boxes match), i2, i4 agree; i3 (boxes
    # apart) and i6 (accept against reject) wait for an adjudication
    assert a["resolution"] == {"version": 2, "items": 6, "overlapped": 5, "agreed": 3,
                               "adjudicated": 0, "unresolved": 2}


def test_kappa_is_none_where_it_is_undefined(tmp_path):
    from grounding.agreement import agreement

    st = ReviewStore(str(tmp_path / "s"))
    st.append([_rec("x", [[0, 0, 4, 4]], "accept", "a"), _rec("x", [[0, 0, 4, 4]], "accept", "b")],
              source="test")
    d = agreement(st)["overall"]["decisions"]
    # one category only: chance agreement is 1, kappa is 0/0
    assert d["agreement"] == 1.0 and d["kappa"] is None


def test_a_store_without_overlap_says_so(tmp_path):
    from grounding.agreement import agreement

    st = ReviewStore(str(tmp_path / "s"))
    st.append([_rec("x", [[0, 0, 4, 4]], "accept", "a")], source="test")
    a = agreement(st)
    assert a["overlapped_items"] == 0 and a["overall"]["pairs"] == 0
    assert a["overall"]["decisions"]["agreement"] is None


def test_match_boxes_one_to_one_at_the_threshold():
    from grounding.agreement import match_boxes

    # two boxes each side; the best one-to-one assignment, not greedy
    a = [[0, 0, 10, 10], [0, 0, 10, 12]]
    b = [[0, 0, 10, 12], [0, 0, 10, 10]]
    assert sorted(match_boxes(a, b)) == [pytest.approx(1.0), pytest.approx(1.0)]
    assert match_boxes([[0, 0, 10, 10]], [[5, 0, 15, 10]]) == []  # IoU 1/3 < 0.5
    assert match_boxes([[0, 0, 10, 10]], [[5, 0, 15, 10]], iou=0.3) == [pytest.approx(1 / 3)]
    assert match_boxes([], [[0, 0, 1, 1]]) == []


def test_review_agreement_on_the_command_line(store, capsys, tmp_path):
    from groundlabel.cli import main

    assert main(["review", "agreement", store.uri]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["by_pair"]["alice | bob"]["pairs"] == 5
    assert main(["review", "agreement", store.uri, "--version", "1"]) == 0
    assert "team@2" not in json.loads(capsys.readouterr().out)["by_guideline"]
    assert main(["review", "agreement", str(tmp_path / "nope")]) == 2
    assert "error" in capsys.readouterr().err
