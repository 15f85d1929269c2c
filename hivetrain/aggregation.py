"""Robust aggregation of one all-reduce partition: what a reducer computes instead of a weighted mean.

hivemind's reducer sums every sender's part with the weight the sender declares, so one NaN
poisons the partition and one huge weight or huge part decides it. Here (after BTARD's
CenteredClip, Gorbunov et al. 2022), per partition:

1. parts with NaN or infinite values, and declared weights that are not finite and positive, are
   dropped and their senders named;
2. declared weights are capped at ``max_weight_ratio`` x their median (a peer may have accumulated
   more samples than others, not arbitrarily more);
3. the aggregate is CenteredClip: start at the coordinate-wise median and move towards every part,
   each part's pull clipped to radius ``tau``. ``tau`` is ``clip_factor`` x the median distance of the
   parts from that median, so it follows the scale of honest parts through training; a sender
   farther than ``ban_ratio`` x ``tau`` from the result was clipped hard and is named.

With a minority of bad parts, each one moves the result by at most ``tau / n`` per iteration,
however large it is. With two senders nothing can tell the honest one from the other (the median
of two is their mean); the receiving side's check (``check_received``) then falls back to the
peer's own part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass(frozen=True)
class AggregationRule:
    """How a reducer aggregates a partition (settings: ``HIVE_ROBUST_AGGREGATION`` and friends)."""

    clip_factor: float = 1.0
    iterations: int = 10
    max_weight_ratio: float = 2.0
    ban_ratio: float = 10.0

    def __post_init__(self):
        if not (self.clip_factor > 0 and self.iterations >= 1 and self.max_weight_ratio >= 1 and self.ban_ratio > 1):
            raise ValueError(f"need clip_factor > 0, iterations >= 1, max_weight_ratio >= 1 and ban_ratio > 1, got {self}")


@dataclass
class Aggregate:
    """The aggregated partition and, by sender index, why a sender's part was dropped or clipped hard."""

    value: torch.Tensor
    offences: dict[int, str] = field(default_factory=dict)


def centered_clip(parts: torch.Tensor, weights: torch.Tensor, tau: float, iterations: int) -> torch.Tensor:
    """CenteredClip of ``parts`` (n, d) with ``weights`` (n,): the (d,) point no part pulls further than ``tau``."""
    center = parts.median(dim=0).values  # (d,)
    if tau <= 0:
        return center
    for _ in range(iterations):
        diff = parts - center  # (n, d)
        scale = torch.clamp(tau / diff.norm(dim=1).clamp_min(1e-30), max=1.0)  # (n,)
        center = center + (diff * (weights * scale)[:, None]).sum(dim=0) / weights.sum()
    return center


def robust_aggregate(parts: Sequence[torch.Tensor], weights: Sequence[float], rule: AggregationRule) -> Aggregate:
    """Aggregate one partition from every sender's part (index = sender index); see the module docstring."""
    offences: dict[int, str] = {}
    kept: list[int] = []
    for index, (part, weight) in enumerate(zip(parts, weights)):
        if not torch.isfinite(part).all():
            offences[index] = "sent NaN or infinite values"
        elif not (math.isfinite(weight) and weight > 0):
            offences[index] = f"declared the weight {weight!r}"
        else:
            kept.append(index)
    if not kept:
        return Aggregate(torch.zeros_like(parts[0]), offences)
    stacked = torch.stack([parts[i].reshape(-1).float() for i in kept])  # (n, d)
    declared = torch.tensor([float(weights[i]) for i in kept], dtype=torch.float32)  # (n,)
    capped = torch.minimum(declared, declared.median() * rule.max_weight_ratio)
    median = stacked.median(dim=0).values  # (d,)
    tau = rule.clip_factor * float((stacked - median).norm(dim=1).median())
    value = centered_clip(stacked, capped, tau, rule.iterations)
    if tau > 0:
        distances = (stacked - value).norm(dim=1) / tau  # (n,)
        for row, index in enumerate(kept):
            if distances[row] > rule.ban_ratio:
                how_far = f"{float(distances[row]):.3g}x" if torch.isfinite(distances[row]) else "beyond measure,"
                offences[index] = f"sent a part {how_far} the clipping radius from the aggregate"
    return Aggregate(value.reshape(parts[0].shape).to(parts[0].dtype), offences)


#: A reducer's answer this far from our own part (in our part's scale) is not applied: we keep our part.
#: An honest aggregate is about as far from our part as the other peers' parts are (the batch noise
#: of gradients, a small drift of parameters); an attacker reducing with its own weight or its own
#: flipped part lands at about twice our part's size.
FALLBACK_BOUND = 1.5
#: ... and this far, it cannot be honest at all: the reducer is named and banned.
OFFENCE_BOUND = 16.0


@dataclass(frozen=True)
class Refusal:
    """Why a reducer's answer is not applied; ``offence``: the answer cannot be honest (name and ban the reducer)."""

    reason: str
    offence: bool


def check_received(delta: torch.Tensor, own: torch.Tensor, own_rms: float) -> Refusal | None:
    """Whether a reducer's answer (``delta`` = its aggregate minus our ``own`` part) may be applied.

    The scale is the larger of our part's norm and ``own_rms`` (the RMS of all our tensors) over
    the part's size, so a part that happens to be near zero for us does not make every answer
    look far. Non-finite answers, and answers ``OFFENCE_BOUND`` scales away, are offences;
    answers ``FALLBACK_BOUND`` scales away are only not applied (an honest peer whose own part is
    much less noisy than the others' can see that). A plausible wrong answer within the bound
    still lands on the reducer's share of the vector: only recomputation would catch it.
    """
    if not torch.isfinite(delta).all():
        return Refusal("returned NaN or infinite values", offence=True)
    scale = max(float(own.float().norm()), own_rms * math.sqrt(own.numel()))
    size = float(delta.float().norm())
    if scale > 0 and size > FALLBACK_BOUND * scale:
        ratio = size / scale
        return Refusal(f"returned an aggregate {ratio:.3g}x our part's scale away from it", offence=ratio > OFFENCE_BOUND)
    return None
