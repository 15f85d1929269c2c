"""From checked claims to scores and weights, keeping the evidence behind every number.

A miner's round score is ``share x pass_rate``: its share of the samples the validator could
verify this round (``check_claimed_samples``) times the fraction of its gradient spot checks that
passed. Scores are smoothed with an EMA, ``new = alpha * round + (1 - alpha) * previous``, so one
lucky or unlucky round moves a miner only part of the way. A miner with no verified samples,
with every spot check failed, or not spot-checked yet gets 0 for the round, whatever its history.
A miner whose hotkey this validator caught itself (a peer of it served a state the model sync refused, see
``hivetrain.validator.service``) scores 0 outright, its EMA included, for as long as its ban holds: an
operator cannot earn with an honest-looking miner while another key of the same hotkey attacks.
The spot checks passed in are the miner's recent history (the validator keeps the last few), so
a window in which a miner happened not to be challenged does not wipe out its record.
"""

from __future__ import annotations

import math
from typing import Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field

from hivetrain.validator.verdicts import ClaimCheckResult, SpotCheckResult

#: Weight of the newest round in the EMA.
DEFAULT_ALPHA = 0.3


class CheckSummary(BaseModel):
    """One recent spot check as the dashboard shows it."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    verdict: Literal["pass", "fail"]
    cosine: float | None = Field(
        description="cosine with the validator's projection; None when there was no usable answer"
    )


class ScoreEvidence(BaseModel):
    """Everything that produced one miner's score for one round."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    miner: str = Field(min_length=1, description="hotkey (or peer id) of the miner")
    verified_samples: int = Field(ge=0, description="samples credited after the claimed-samples check")
    claimed_samples: int = Field(ge=0, description="samples the miner claimed this round")
    share: float = Field(ge=0, le=1, description="verified_samples / all miners' verified samples")
    passes: int = Field(ge=0, description="recent gradient spot checks passed")
    fails: int = Field(ge=0, description="recent gradient spot checks failed")
    pass_rate: float = Field(
        ge=0, le=1, description="passes / (passes + fails) over recent spot checks; 0 when never checked"
    )
    round_score: float = Field(
        ge=0, le=1, description="share x pass_rate, 0 when nothing verified or every check failed"
    )
    alpha: float = Field(gt=0, le=1)
    previous_ema: float = Field(ge=0)
    new_ema: float = Field(ge=0)
    reasons: list[str] = Field(default_factory=list, description="why each check passed or failed")
    checks: list[CheckSummary] = Field(default_factory=list, description="the recent spot checks, oldest first")


def pass_rate(passes: int, fails: int) -> float:
    """Fraction of spot checks passed; 0.0 for a miner never challenged: its work is not verified yet."""
    total = passes + fails
    return 0.0 if total == 0 else passes / total


def score_round(
    claims: Mapping[str, ClaimCheckResult],
    spot_checks: Mapping[str, list[SpotCheckResult]],
    previous: Mapping[str, float],
    alpha: float = DEFAULT_ALPHA,
    caught: Mapping[str, str] | None = None,
) -> dict[str, ScoreEvidence]:
    """Score every miner that has a claim check, a spot check or a previous score.

    ``claims`` holds each miner's claimed-samples verdict, ``spot_checks`` its gradient spot-check
    verdicts this round and ``previous`` its EMA so far; ``caught`` maps the hotkeys this validator
    caught misbehaving to why (their round score and their EMA are 0).
    A miner absent from this round decays towards 0 (its round score is 0).
    """
    caught = caught or {}
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    verified = {miner: (c.verified_samples if c.passed and miner not in caught else 0) for miner, c in claims.items()}
    total = sum(verified.values())
    evidence = {}
    for miner in sorted(set(claims) | set(spot_checks) | set(previous) | set(caught)):
        checks = spot_checks.get(miner, [])
        passes = sum(1 for c in checks if c.passed)
        fails = len(checks) - passes
        samples = verified.get(miner, 0)
        share = samples / total if total else 0.0
        rate = pass_rate(passes, fails)
        round_score = 0.0 if samples == 0 or (checks and passes == 0) or miner in caught else share * rate
        before = float(previous.get(miner, 0.0))
        reasons = ([f"claim: {claims[miner].reason}"] if miner in claims else ["claim: none this round"]) + [
            f"spot check {c.verdict}: {c.reason}" for c in checks
        ]
        if miner in caught:
            reasons.append(f"caught by this validator: {caught[miner]}")
        evidence[miner] = ScoreEvidence(
            miner=miner,
            verified_samples=samples,
            claimed_samples=claims[miner].claimed_samples if miner in claims else 0,
            share=share,
            passes=passes,
            fails=fails,
            pass_rate=rate,
            round_score=round_score,
            alpha=alpha,
            previous_ema=before,
            new_ema=0.0 if miner in caught else ema(before, round_score, alpha),
            reasons=reasons,
            checks=[CheckSummary(verdict=c.verdict, cosine=_finite_or_none(c.cosine)) for c in checks],
        )
    return evidence


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def ema(previous: float, value: float, alpha: float) -> float:
    """``alpha * value + (1 - alpha) * previous``."""
    return alpha * value + (1 - alpha) * previous


def normalize_weights(scores: Mapping[str, float]) -> dict[str, float]:
    """Scores scaled to sum 1; zeros stay zero; all zero (or empty) gives all zero.

    Raises ``ValueError`` on negative or non-finite scores.
    """
    for miner, score in scores.items():
        if not math.isfinite(score) or score < 0:
            raise ValueError(f"score of {miner} must be finite and >= 0, got {score!r}")
    total = math.fsum(scores.values())
    if total == 0:
        return {miner: 0.0 for miner in scores}
    return {miner: score / total for miner, score in scores.items()}
