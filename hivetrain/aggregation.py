"""Robust aggregation of one all-reduce partition: what a reducer computes instead of a weighted mean.

hivemind's reducer sums every sender's part with the weight the sender declares, so one NaN
poisons the partition and one huge weight or huge part decides it. Here (after BTARD's
CenteredClip, Gorbunov et al. 2022), per partition:

1. parts with NaN or infinite values, and declared weights that are negative, not finite, or above
   ``max_weight`` (more samples than a round can hold), are dropped and their senders named; a
   weight of 0 is hivemind's "tag along" (a peer that only wants the result): left out, not named;
2. declared weights are capped at their median (``max_weight_ratio`` x it, 1 by default): a weight is
   what its sender says it accumulated, and a sender that claims more than a typical peer weighs as one
   typical peer (at 2x, one honest-size flipped part among four cancelled all but 5% of the honest
   direction; at 1x it is outvoted 3 to 1). An honest peer that did accumulate more (a faster GPU)
   is underweighted the same way: its part is still an unbiased gradient, only its extra samples'
   lower noise is not used;
3. the aggregate is CenteredClip: start at the coordinate-wise median and move towards every part,
   each part's pull clipped to radius ``tau``. ``tau`` is ``clip_factor`` x the median distance of the
   parts from that median (their typical spread), so it follows the scale of honest parts through
   training. When no part lies farther than ``tau`` from the weighted mean, the mean is the fixed
   point and is returned at once (no iterations). A sender farther than
   ``ban_ratio`` x the typical spread from the result, and farther from it than the result's own
   size, is named (an honest peer that missed a round can be far from a tight cluster, but not that),
   unless it is also within ``ban_ratio`` x the size of a whole honest vector (see ``robust_aggregate``).

Before all that, the fast path (``PartStream``): in the usual round without an attacker every part
is finite, every weight plausible, and the weighted mean is already CenteredClip's fixed point;
that is checked from the parts' dot products, taken as the parts arrive, and the mean returned.

With a minority of bad parts, each one moves the result by at most ``tau / n`` per iteration,
however large it is. With two senders nothing can tell the honest one from the other (the median
of two is their mean); the receiving side's check (``check_received``) then falls back to the
peer's own part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from hivetrain.protocol.progress import lower_median


@dataclass(frozen=True)
class AggregationRule:
    """How a reducer aggregates a partition (settings: ``HIVE_ROBUST_AGGREGATION`` and friends)."""

    clip_factor: float = 1.0
    iterations: int = 10
    max_weight_ratio: float = 1.0
    ban_ratio: float = 1000.0  # honest gradients differ by 10x and more (one peer's hard batch); attacks by far more
    max_weight: float = math.inf  # a declared weight is samples accumulated since the last round: the miner bounds it

    def __post_init__(self):
        if not (
            self.clip_factor > 0
            and self.iterations >= 1
            and self.max_weight_ratio >= 1
            and self.ban_ratio > 1
            and self.max_weight > 0
        ):
            raise ValueError(
                "need clip_factor > 0, iterations >= 1, max_weight_ratio >= 1, ban_ratio > 1 and "
                f"max_weight > 0, got {self}"
            )


@dataclass
class Aggregate:
    """The aggregated partition and, by sender index, why a sender's part was dropped or clipped hard."""

    value: torch.Tensor
    offences: dict[int, str] = field(default_factory=dict)


def coordinate_median(parts: torch.Tensor) -> torch.Tensor:
    """The lower median of ``parts`` (n, d) along n, as ``parts.median(dim=0)``: (d,).

    For the small groups averaging uses, an odd-even transposition sort with elementwise
    min/max is several times faster than torch's median over dim 0 (which sorts column by column).
    """
    n = parts.shape[0]
    if n > 8:
        return parts.median(dim=0).values
    rows = list(parts.unbind(0))
    for step in range(n):
        for i in range(step % 2, n - 1, 2):
            rows[i], rows[i + 1] = torch.minimum(rows[i], rows[i + 1]), torch.maximum(rows[i], rows[i + 1])
    return rows[(n - 1) // 2]


def centered_clip(
    parts: torch.Tensor,
    weights: torch.Tensor,
    tau: float,
    iterations: int,
    center: torch.Tensor | None = None,
    tolerance: float = 1e-4,
) -> torch.Tensor:
    """CenteredClip of ``parts`` (n, d) with ``weights`` (n,): the (d,) point no part pulls further than ``tau``.

    Starts at ``center`` (default: the coordinate-wise median) and stops early once a step moves
    it less than ``tolerance`` x ``tau``.
    """
    center = coordinate_median(parts) if center is None else center  # (d,)
    if tau <= 0:
        return center
    total = weights.sum()
    for _ in range(iterations):
        diff = parts - center  # (n, d)
        scale = torch.clamp(tau / _norms(diff).clamp_min(1e-30), max=1.0).float()  # (n,)
        step = (weights * scale) @ diff / total  # (d,)
        center = center + step
        if float(step.norm()) < tolerance * tau:
            break
    return center


def _norms(rows: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row (float64): float32 squares of values near 1e20 overflow, so those rows are redone in
    float64."""
    norms = rows.norm(dim=1).double()
    if not torch.isfinite(norms).all():
        norms = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float64)
    return norms


def _finite(part: torch.Tensor) -> bool:
    # the sum is one cheap pass and is NaN or infinite whenever an element is; only then look closer
    # (a sum of huge finite values can overflow)
    return bool(torch.isfinite(part.sum())) or bool(torch.isfinite(part).all())


class PartStream:
    """One partition's parts as they arrive from the senders, with the fast path's work done on arrival.

    hivemind's reducer adds each part to a sum as it streams in, so when the last one arrives only a
    division is left. ``add`` does the fast path's share the same way (the part's dot products with
    the parts before it, and the weighted sum), so that ``aggregate`` finds the usual round decided
    by a handful of scalars. The fast path: the weighted mean is returned when it is CenteredClip's
    fixed point, i.e. when no part lies farther than ``tau`` from it. Here ``tau`` is ``clip_factor``
    x a spread taken from the pairwise distances (each part's lower-median distance to the others;
    the lower median of those; over sqrt 2, the distance to the centre that implies), which a
    minority of outliers cannot move, and the weights are the declared ones capped at their median.
    Anything unusual (a weight to question, a non-finite value, parts so alike that float32 sums
    cannot measure their distances, as parameters averaged between nearly equal replicas are, an
    outlier) goes ``robust_aggregate``'s full way.
    """

    def __init__(self):
        self.parts: list[torch.Tensor] = []
        self.weights: list[float] = []
        self._gram: list[list[float]] = []  # row i: dot products of part i with parts 0..i
        self._sum: torch.Tensor | None = None  # sum of weight x part (flat, float32)
        self._fast = True  # until something rules the fast path out

    def add(self, part: torch.Tensor, weight: float) -> None:
        self.parts.append(part)
        self.weights.append(float(weight))
        flat = part.reshape(-1)
        if not self._fast or flat.dtype != torch.float32 or not (math.isfinite(weight) and weight > 0):
            self._fast = False
            return
        self._gram.append([float(torch.dot(flat, other.reshape(-1))) for other in self.parts])
        if self._sum is None:
            self._sum = flat * float(weight)
        else:
            self._sum.add_(flat, alpha=float(weight))

    def aggregate(self, rule: AggregationRule, scale: Callable[[], float] = lambda: 0.0) -> Aggregate:
        fast = self._mean_if_fixed_point(rule)
        if fast is not None:
            return Aggregate(fast)
        return robust_aggregate(self.parts, self.weights, rule, fast_path=False, scale=scale)

    def _mean_if_fixed_point(self, rule: AggregationRule) -> torch.Tensor | None:
        n = len(self.parts)
        if not self._fast or n < 3 or max(self.weights) > rule.max_weight:
            return None
        weights = capped_weights(self.weights, rule.max_weight_ratio)  # the fast path's weights are all positive
        # n is a group's size: plain Python floats beat a dozen tiny tensor ops here
        gram = [[self._gram[max(i, j)][min(i, j)] for j in range(n)] for i in range(n)]
        if not all(math.isfinite(x) for row in self._gram for x in row):  # a non-finite part (or too large to square)
            return None
        squares = [gram[i][i] for i in range(n)]
        pairwise = [[max(0.0, squares[i] + squares[j] - 2 * gram[i][j]) for j in range(n) if j != i] for i in range(n)]
        spread2 = lower_median([lower_median(row) for row in pairwise]) / 2
        if not spread2 > 1e-3 * max(squares):  # parts too alike for float32 sums: measure the slow way
            return None
        total = sum(weights)
        w = [weight / total for weight in weights]
        pulled = [sum(gram[i][j] * w[j] for j in range(n)) for i in range(n)]  # (G w)_i
        centre = sum(w[i] * pulled[i] for i in range(n))  # w^T G w: the mean's squared norm
        # squared distance of each part from the weighted mean
        if max(squares[i] - 2 * pulled[i] + centre for i in range(n)) > rule.clip_factor**2 * spread2:
            return None
        if weights != self.weights:  # a weight was capped: the streamed sum is not the mean
            self._sum = torch.zeros_like(self._sum)
            for part, weight in zip(self.parts, weights):
                self._sum.add_(part.reshape(-1), alpha=weight)
        mean, self._sum = self._sum.mul_(1.0 / total), None  # the sum is ours: no copy
        return mean.reshape(self.parts[0].shape)


def capped_weights(weights: Sequence[float], ratio: float) -> list[float]:
    """``weights`` (positive, finite) each capped at ``ratio`` x their lower median."""
    cap = lower_median(weights) * ratio
    return [min(weight, cap) for weight in weights]


def robust_aggregate(
    parts: Sequence[torch.Tensor],
    weights: Sequence[float],
    rule: AggregationRule,
    fast_path: bool = True,
    scale: Callable[[], float] = lambda: 0.0,
) -> Aggregate:
    """Aggregate one partition from every sender's part (index = sender index); see the module docstring.

    ``scale()``: a size no honest part exceeds by much (the reducer's own whole vector's norm: a
    part is a slice of such a vector); a sender is named only when it is ``ban_ratio`` times the
    larger of that and the parts' spread away. The spread alone can be near zero where honest
    parts are sparse: the rows of a token embedding that only one peer's batch holds are zero in
    every other peer's part, and such a row can be many times the whole gradient's RMS.
    """
    if fast_path:
        stream = PartStream()
        for part, weight in zip(parts, weights):
            stream.add(part, weight)
        return stream.aggregate(rule, scale)
    offences: dict[int, str] = {}
    kept: list[int] = []
    for index, (part, weight) in enumerate(zip(parts, weights)):
        if not _finite(part):
            offences[index] = "sent NaN or infinite values"
        elif weight == 0:
            continue  # tagging along: it takes the result and gives nothing
        elif not (math.isfinite(weight) and 0 < weight <= rule.max_weight):
            offences[index] = f"declared the weight {weight!r}" + (
                f", more than the {rule.max_weight:g} samples a round can hold" if weight > rule.max_weight else ""
            )
        else:
            kept.append(index)
    if not kept:
        return Aggregate(torch.zeros_like(parts[0]), offences)
    stacked = torch.stack([parts[i].reshape(-1).float() for i in kept])  # (n, d)
    capped = torch.tensor(capped_weights([float(weights[i]) for i in kept], rule.max_weight_ratio))  # (n,)
    median = coordinate_median(stacked)  # (d,)
    spread = float(_norms(stacked - median).median())  # how far a typical part is from the median
    tau = rule.clip_factor * spread
    mean = capped @ stacked / capped.sum()  # (d,)
    distances = _norms(stacked - mean)  # (n,)
    if float(distances.max()) > tau:  # some part would be clipped: the mean is not the answer
        value = centered_clip(stacked, capped, tau, rule.iterations, center=median)
        distances = _norms(stacked - value)
    else:  # no part is farther than tau from the mean: the mean is CenteredClip's fixed point
        value = mean
    size = float(_norms(value.reshape(1, -1))[0])
    yardstick = max(spread, scale()) if float(distances.max()) > rule.ban_ratio * spread else spread
    if yardstick > 0:
        for row, index in enumerate(kept):
            ratio = float(distances[row]) / yardstick
            # far from the others *and* farther from the aggregate than the aggregate is from zero: a part
            # that opposes or dwarfs it. Far from a tight cluster alone is how an honest peer that missed a
            # round looks (its parameters drifted a little, the others' did not at all): clipped, not named.
            if ratio > rule.ban_ratio and float(distances[row]) > size:
                how_far = f"{ratio:.3g}x" if math.isfinite(ratio) else "immeasurably far,"
                offences[index] = f"sent a part {how_far} the typical spread (or size) of parts away from the aggregate"
    return Aggregate(value.reshape(parts[0].shape).to(parts[0].dtype), offences)


#: A reducer's answer this far from our own part (in our part's scale) is not applied: we keep our part.
#: An honest aggregate is about as far from our part as the other peers' parts are (the batch noise
#: of gradients, a small drift of parameters); an attacker reducing with its own weight or its own
#: flipped part lands at about twice our part's size.
FALLBACK_BOUND = 1.5
#: ... and this far, it cannot be honest at all: the reducer is named and banned. Honest gradients can
#: differ by 10x and more between peers (a hard batch, a loss spike), so the bound is far above that.
OFFENCE_BOUND = 1000.0


@dataclass(frozen=True)
class Refusal:
    """Why a reducer's answer is not applied; ``offence``: the answer cannot be honest (name and ban the reducer)."""

    reason: str
    offence: bool


def check_received(delta: torch.Tensor, own: torch.Tensor, own_rms: Callable[[], float]) -> Refusal | None:
    """Whether a reducer's answer (``delta`` = its aggregate minus our ``own`` part) may be applied.

    The scale is the larger of our part's norm and ``own_rms()`` (the RMS of all our tensors,
    computed once per round by the caller) over the part's size, so a part that happens to be near
    zero for us does not make every answer look far; our part's norm is only computed for answers
    beyond the second. Non-finite answers, and answers ``OFFENCE_BOUND`` scales away, are offences;
    answers ``FALLBACK_BOUND`` scales away are only not applied (an honest peer whose own part is
    much less noisy than the others' can see that). A plausible wrong answer within the bound still
    lands on the reducer's share of the vector: only recomputation would catch it.
    """
    size = float(torch.linalg.vector_norm(delta))  # one pass; NaN or infinite when a value is, or on overflow
    if not math.isfinite(size):
        if not _finite(delta):
            return Refusal("returned NaN or infinite values", offence=True)
        size = float(_norms(delta.reshape(1, -1))[0])  # finite values too large for a float32 norm
    scale = own_rms() * math.sqrt(own.numel())
    if size <= FALLBACK_BOUND * scale:
        return None
    scale = max(scale, float(_norms(own.reshape(1, -1).float())[0]))
    if scale > 0 and size > FALLBACK_BOUND * scale:
        ratio = size / scale
        return Refusal(
            f"returned an aggregate {ratio:.3g}x our part's scale away from it", offence=ratio > OFFENCE_BOUND
        )
    return None
