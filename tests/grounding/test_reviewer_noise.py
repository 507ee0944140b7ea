"""The reviewer-noise simulation of bench/bench_reviewers.py, small: agreement ranks the noisy
reviewer last, gold exclusion removes her alone, and unresolved items never train."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))


def test_agreement_and_gold_find_the_noisy_reviewer():
    from bench_reviewers import one

    r = one(300, 0, 0.8)
    rates = r["recovered_error_rate"]
    assert rates["carol"] > 0.2 and max(rates["alice"], rates["bob"]) < 0.1
    assert min(r["person_kappa"], key=r["person_kappa"].get) == "carol"
    assert r["excluded"] == ["carol"]
    assert r["before"]["precision"] > r["latest_wins"]["precision"]
    assert r["after"]["labels"] > r["before"]["labels"] and r["after"]["precision"] >= 0.99
