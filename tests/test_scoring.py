"""Scores = verified share x spot-check pass rate, EMA-smoothed, with the evidence kept."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from hivetrain.validator.scoring import ScoreEvidence, ema, normalize_weights, pass_rate, score_round
from hivetrain.validator.verdicts import ClaimCheckResult, SpotCheckResult

PASS = SpotCheckResult("pass", "cosine 0.99 >= 0.95", 0.99)
FAIL = SpotCheckResult("fail", "cosine 0.10 below threshold 0.95", 0.10)


def claim(verified: int, claimed: int | None = None, ok: bool = True) -> ClaimCheckResult:
    reason = f"claims {claimed if claimed is not None else verified}"
    return ClaimCheckResult(
        "pass" if ok else "fail", reason, verified_samples=verified if ok else 0, claimed_samples=claimed or verified
    )


def test_round_score_is_share_times_pass_rate():
    claims = {"a": claim(300), "b": claim(100), "c": claim(600, claimed=5000, ok=False)}
    checks = {"a": [PASS, PASS, FAIL, PASS], "b": [PASS]}
    scores = score_round(claims, checks, previous={}, alpha=1.0)
    assert scores["a"].share == pytest.approx(0.75) and scores["a"].pass_rate == pytest.approx(0.75)
    assert scores["a"].round_score == pytest.approx(0.5625) and scores["a"].new_ema == pytest.approx(0.5625)
    assert scores["b"].round_score == pytest.approx(0.25)
    # an overclaimer is credited nothing and takes no share from the others
    assert (scores["c"].verified_samples, scores["c"].claimed_samples, scores["c"].round_score) == (0, 5000, 0.0)


def test_zero_verified_or_all_failed_gets_zero():
    claims = {"idle": claim(0), "cheat": claim(500), "good": claim(500)}
    checks = {"idle": [PASS], "cheat": [FAIL, FAIL], "good": [PASS]}
    scores = score_round(claims, checks, previous={"idle": 0.0, "cheat": 0.0}, alpha=1.0)
    assert scores["idle"].round_score == 0.0 and scores["cheat"].round_score == 0.0
    assert scores["cheat"].pass_rate == 0.0 and scores["cheat"].share == pytest.approx(0.5)
    assert scores["good"].round_score == pytest.approx(0.5)
    assert normalize_weights({m: s.new_ema for m, s in scores.items()}) == {"idle": 0.0, "cheat": 0.0, "good": 1.0}


def test_a_hotkey_the_validator_caught_scores_zero_at_once_and_takes_no_share():
    claims = {"operator": claim(500), "good": claim(500)}
    checks = {"operator": [PASS, PASS], "good": [PASS]}  # its miner answers honestly; another key of it attacked
    caught = {"operator": "state: served a state we refused: tensor 0 is not a finite tensor"}
    scores = score_round(claims, checks, previous={"operator": 0.9, "good": 0.1}, alpha=0.3, caught=caught)
    assert scores["operator"].round_score == 0.0 and scores["operator"].new_ema == 0.0  # not a decay: zero
    assert scores["operator"].verified_samples == 0 and scores["good"].share == pytest.approx(1.0)
    assert any(r.startswith("caught by this validator: state:") for r in scores["operator"].reasons)
    assert normalize_weights({m: s.new_ema for m, s in scores.items()}) == {"operator": 0.0, "good": 1.0}
    named = score_round({}, {}, {}, caught={"stranger": "why"})["stranger"]  # named on the board, at 0
    assert named.new_ema == 0.0 and named.reasons[-1] == "caught by this validator: why"


def test_ema_smooths_and_absent_miners_decay():
    previous = {"a": 0.4, "gone": 0.5}
    scores = score_round({"a": claim(100)}, {"a": [PASS]}, previous, alpha=0.25)
    assert scores["a"].new_ema == pytest.approx(0.25 * 1.0 + 0.75 * 0.4)
    assert scores["gone"].new_ema == pytest.approx(0.75 * 0.5) and scores["gone"].round_score == 0.0
    assert ema(1.0, 0.0, 0.5) == 0.5
    history = 0.0
    for _ in range(30):
        history = score_round({"a": claim(10)}, {"a": [PASS]}, {"a": history}, alpha=0.3)["a"].new_ema
    assert history == pytest.approx(1.0, abs=1e-3)  # a verified sole contributor converges to 1
    unchecked = score_round({"new": claim(500)}, {}, {}, alpha=1.0)["new"]
    assert unchecked.pass_rate == 0.0 and unchecked.round_score == 0.0  # not spot-checked yet: nothing verified
    with pytest.raises(ValueError):
        score_round({}, {}, {}, alpha=0.0)


def test_evidence_keeps_the_inputs():
    scores = score_round({"a": claim(40, claimed=42)}, {"a": [PASS, FAIL]}, {"a": 0.2}, alpha=0.5)
    evidence = scores["a"]
    assert isinstance(evidence, ScoreEvidence)
    assert evidence.model_dump() == {
        "miner": "a",
        "verified_samples": 40,
        "claimed_samples": 42,
        "share": 1.0,
        "passes": 1,
        "fails": 1,
        "pass_rate": 0.5,
        "round_score": 0.5,
        "alpha": 0.5,
        "previous_ema": 0.2,
        "new_ema": pytest.approx(0.35),
        "reasons": [
            "claim: claims 42",
            "spot check pass: cosine 0.99 >= 0.95",
            "spot check fail: cosine 0.10 below threshold 0.95",
        ],
        "checks": [{"verdict": "pass", "cosine": 0.99}, {"verdict": "fail", "cosine": 0.10}],
    }
    assert ScoreEvidence.model_validate_json(evidence.model_dump_json()) == evidence
    unusable = [SpotCheckResult("fail", "no answer"), SpotCheckResult("fail", "answer is NaN", float("nan"))]
    assert [c.cosine for c in score_round({}, {"a": unusable}, {})["a"].checks] == [None, None]  # JSON has no NaN
    with pytest.raises(ValidationError):
        ScoreEvidence(**{**evidence.model_dump(), "share": 1.5})


def test_normalize_weights():
    assert normalize_weights({"a": 1.0, "b": 3.0, "c": 0.0}) == {"a": 0.25, "b": 0.75, "c": 0.0}
    assert normalize_weights({"a": 0.0, "b": 0.0}) == {"a": 0.0, "b": 0.0}
    assert normalize_weights({}) == {}
    assert sum(normalize_weights({str(i): i * 0.1 for i in range(10)}).values()) == pytest.approx(1.0)
    for bad in ({"a": -0.1}, {"a": float("nan")}, {"a": float("inf")}):
        with pytest.raises(ValueError):
            normalize_weights(bad)


def test_pass_rate_without_checks_verifies_nothing():
    assert pass_rate(0, 0) == 0.0 and pass_rate(3, 1) == 0.75 and pass_rate(0, 2) == 0.0
