"""The validator's verdicts on what a miner claims: one spot-check answer, one claimed sample count.

``judge_spot_check`` compares a miner's answer with the validator's own projection of the same
batch (the bar and the measurements behind it are in ``hivetrain.protocol.spotcheck``).
``check_claimed_samples`` bounds what a miner says it trained on by what hivemind's own progress
records in the DHT showed (``hivetrain.validator.progress``) and by a throughput ceiling;
``judge_claims`` makes that a scoring window's verdict, crediting min(claim, DHT growth). Those
records are still self-reported: they bound claims, they do not prove work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal, Mapping

import torch

from hivetrain.protocol.projection import cosine
from hivetrain.protocol.spotcheck import COPY_THRESHOLD, SPOT_CHECK_THRESHOLD

Verdict = Literal["pass", "fail"]


@dataclass(frozen=True)
class SpotCheckResult:
    """The verdict of one check, with the reason a person can read in the score evidence."""

    verdict: Verdict
    reason: str
    cosine: float | None = None

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"


@dataclass(frozen=True)
class ClaimCheckResult(SpotCheckResult):
    """A claimed-samples verdict; ``verified_samples`` is what scoring may credit (0 on failure)."""

    verified_samples: int = 0
    claimed_samples: int = 0


def judge_spot_check(
    expected: torch.Tensor,
    answer: object,
    threshold: float = SPOT_CHECK_THRESHOLD,
    other_answers: Mapping[str, torch.Tensor] | Iterable[torch.Tensor] = (),
    *,
    baseline: torch.Tensor | None = None,
    copy_threshold: float = COPY_THRESHOLD,
) -> SpotCheckResult:
    """Pass when ``answer`` matches the validator's ``expected`` projection.

    Fails on a wrong shape or non-finite/zero answer, on a copy (an answer at least
    ``copy_threshold`` similar to another miner's answer for a different batch, and closer to it
    than to ``expected``), and on cosine below ``threshold``. With ``baseline`` (from
    ``baseline_projection``, same seed) every cosine is taken after subtracting it.
    """
    if not isinstance(answer, torch.Tensor) or answer.shape != expected.shape:
        shape = tuple(answer.shape) if isinstance(answer, torch.Tensor) else type(answer).__name__
        return SpotCheckResult("fail", f"answer has shape {shape}, expected {tuple(expected.shape)}")
    if not torch.isfinite(answer).all() or not answer.abs().sum() > 0:
        return SpotCheckResult("fail", "answer is zero or not finite")
    center = baseline if baseline is not None else torch.zeros_like(expected)
    similarity = cosine(expected - center, answer - center)
    others = other_answers.items() if isinstance(other_answers, Mapping) else enumerate(other_answers)
    for who, other in others:
        if isinstance(other, torch.Tensor) and other.shape == answer.shape:
            copied = cosine(other - center, answer - center)
            if copied >= copy_threshold and copied > similarity:
                return SpotCheckResult(
                    "fail", f"answer copies {who}'s answer for another batch (cosine {copied:.4f})", similarity
                )
    if not math.isfinite(similarity):  # NaN < threshold is False: without this a NaN model would pass every answer
        return SpotCheckResult("fail", "cosine is not finite (the validator's own projection is not finite)")
    if similarity < threshold:
        return SpotCheckResult("fail", f"cosine {similarity:.4f} below threshold {threshold}", similarity)
    return SpotCheckResult("pass", f"cosine {similarity:.4f} >= {threshold}", similarity)


def check_claimed_samples(
    claimed: int, dht_progress_samples: int | None, elapsed_s: float, max_samples_per_s: float, tolerance: float = 0.1
) -> ClaimCheckResult:
    """Fail claims above hivemind's progress records or a throughput ceiling, each with ``tolerance``.

    ``dht_progress_samples`` is what the miner's ProgressTracker records showed over the same
    period (``ProgressLedger.samples``); None means the miner never appeared there.
    """
    if claimed < 0 or elapsed_s < 0 or max_samples_per_s <= 0 or tolerance < 0:
        raise ValueError("need claimed >= 0, elapsed_s >= 0, max_samples_per_s > 0 and tolerance >= 0")
    ceiling = max_samples_per_s * elapsed_s * (1 + tolerance)

    def verdict(ok: bool, reason: str, verified: int = 0) -> ClaimCheckResult:
        return ClaimCheckResult("pass" if ok else "fail", reason, verified_samples=verified, claimed_samples=claimed)

    if claimed > ceiling:
        return verdict(False, f"claims {claimed} samples in {elapsed_s:.0f}s, above the ceiling of {ceiling:.0f}")
    if claimed == 0:
        return verdict(True, "claims no samples")
    if dht_progress_samples is None:
        return verdict(False, f"claims {claimed} samples but has no progress records in the DHT")
    if claimed > dht_progress_samples * (1 + tolerance):
        return verdict(False, f"claims {claimed} samples, DHT progress records show {dht_progress_samples}")
    return verdict(
        True, f"claims {claimed} samples, DHT shows {dht_progress_samples}", min(claimed, dht_progress_samples)
    )


def judge_claims(
    claimed_window: int,
    dht_window: int | None,
    claimed_total: int,
    dht_total: int | None,
    elapsed_s: float,
    max_samples_per_s: float,
    tolerance: float,
) -> ClaimCheckResult:
    """One scoring window's claim verdict: pass or fail on the totals, credit from the window.

    Pass or fail is decided on everything claimed since the validator first saw the miner against
    what its DHT records grew by in that time (``check_claimed_samples``), so polling lag stays a
    constant instead of an error in each window. A passing miner is credited ``min(this window's
    claim, this window's DHT growth)``: ``tolerance`` decides pass or fail only and never adds credit
    (with the default 1.0, a claim of 1,990 against 1,000 in the DHT passes and earns 1,000).
    """
    total = check_claimed_samples(claimed_total, dht_total, elapsed_s, max_samples_per_s, tolerance)
    window = (
        f"this window: claims {claimed_window}, DHT shows {dht_window if dht_window is not None else 'nothing'}; "
        f"since first seen {elapsed_s:.0f}s ago: "
    )
    if not total.passed:
        return ClaimCheckResult("fail", window + total.reason, claimed_samples=claimed_window)
    credit = min(claimed_window, max(0, dht_window or 0))
    return ClaimCheckResult("pass", window + total.reason, verified_samples=credit, claimed_samples=claimed_window)
