"""Robust aggregation of one partition: bad parts are dropped or clipped and named, honest parts averaged."""

from __future__ import annotations

import pytest
import torch

from hivetrain.aggregation import AggregationRule, PartStream, centered_clip, check_received, robust_aggregate

RULE = AggregationRule()


@pytest.fixture
def honest():
    generator = torch.Generator().manual_seed(0)
    signal = torch.randn(50_000, generator=generator)
    return [signal + 0.3 * torch.randn(50_000, generator=generator) for _ in range(3)]


def _error(value, honest) -> float:
    mean = torch.stack(honest).mean(dim=0)
    return float((value - mean).norm() / mean.norm())


def test_honest_parts_average_to_their_mean(honest):
    result = robust_aggregate(honest, [8.0, 8.0, 8.0], RULE)
    assert _error(result.value, honest) < 0.02 and result.offences == {}


@pytest.mark.parametrize(
    "attack, named",
    [
        (lambda h: torch.full_like(h[0], float("nan")), "NaN or infinite"),
        (lambda h: torch.full_like(h[0], float("inf")), "NaN or infinite"),
        (lambda h: h[0] * 1e30, "typical spread"),
        (lambda h: h[0] * 1e4, "typical spread"),
        # of a size an honest peer's hard batch can have: clipped, not named
        (lambda h: -3 * torch.stack(h).mean(dim=0), None),
        (lambda h: 30 * h[0], None),
    ],
)
def test_a_bad_part_is_named_and_barely_moves_the_result(honest, attack, named):
    result = robust_aggregate([*honest, attack(honest)], [8.0] * 4, RULE, scale=lambda: float(honest[0].norm()))
    assert torch.isfinite(result.value).all()
    assert _error(result.value, honest) < 0.15, _error(result.value, honest)
    if named is None:
        assert result.offences == {}
    else:
        assert list(result.offences) == [3] and named in result.offences[3]


def test_a_declared_weight_is_capped_not_obeyed(honest):
    mean = torch.stack(honest).mean(dim=0)
    attacker = -mean  # what the attacker wants the swarm to apply
    plain = (sum(8.0 * h for h in honest) + 1e30 * attacker) / (24.0 + 1e30)  # hivemind's weighted mean
    assert _error(plain, honest) > 1.9
    result = robust_aggregate([*honest, attacker], [8.0, 8.0, 8.0, 1e30], RULE)
    assert _error(result.value, honest) < 0.3  # weighted as the median, and clipped: a pull, not a takeover
    for weight in (float("nan"), -1.0, float("inf")):
        assert "declared the weight" in robust_aggregate([*honest, attacker], [8.0, 8.0, 8.0, weight], RULE).offences[3]


def test_a_weight_beyond_what_a_round_holds_is_named_and_zero_weight_tags_along(honest):
    bounded = AggregationRule(max_weight=64.0)
    result = robust_aggregate([*honest, honest[0] * 1.01], [8.0, 8.0, 8.0, 1e30], bounded)
    assert list(result.offences) == [3] and "more than the 64 samples" in result.offences[3]
    assert _error(result.value, honest) < 0.02  # left out entirely
    # hivemind's tag-along: an honest peer that only takes the result sends its part with weight 0
    along = robust_aggregate([*honest, -10 * honest[0]], [8.0, 8.0, 8.0, 0.0], bounded)
    assert along.offences == {} and _error(along.value, honest) < 0.02


def test_centered_clip_bounds_one_far_point():
    parts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1e9, 1e9]])
    value = centered_clip(parts, torch.ones(4), tau=1.0, iterations=20)
    assert value.norm() < 2.0


def test_a_received_answer_is_checked_against_our_own_part():
    own = torch.ones(100)
    assert (
        check_received(torch.full((100,), 0.5), own, own_rms=lambda: 1.0) is None
    )  # an honest pull towards the others
    assert (
        check_received(-own, own, own_rms=lambda: 1.0) is None
    )  # a plausible wrong answer still lands (see the docstring)
    taken_over = check_received(-2.1 * own, own, own_rms=lambda: 1.0)  # e.g. the reducer obeyed its own huge weight
    assert taken_over is not None and not taken_over.offence and "scale away" in taken_over.reason
    assert check_received(torch.tensor([float("nan")] * 100), own, own_rms=lambda: 1.0).offence
    assert check_received(own * 1e6, own, own_rms=lambda: 1.0).offence
    # a part that is near zero for us: the scale is our tensors' RMS, not this part's norm
    assert check_received(torch.full((100,), 0.5), torch.zeros(100), own_rms=lambda: 1.0) is None


def test_a_rule_that_would_not_clip_is_refused():
    with pytest.raises(ValueError):
        AggregationRule(clip_factor=0)
    with pytest.raises(ValueError):
        AggregationRule(ban_ratio=1.0)


def test_an_honest_peer_that_missed_a_round_is_clipped_but_not_named():
    # parameters: two peers averaged together last round (identical), a third drifted a little on its own
    generator = torch.Generator().manual_seed(3)
    params = torch.randn(50_000, generator=generator)
    drifted = params + 1e-3 * torch.randn(50_000, generator=generator)
    result = robust_aggregate([params, params.clone(), drifted], [1.0, 1.0, 1.0], RULE)
    assert result.offences == {}
    assert float((result.value - params).norm() / params.norm()) < 1e-3


@pytest.mark.parametrize("weight, bound", [(8.0, 0.5), (16.0, 1.0)])
def test_an_attacker_at_any_distance_moves_the_result_less_than_the_honest_spread(honest, weight, bound):
    # near: the mean is CenteredClip's fixed point and the fast path returns it; far: CenteredClip clips.
    # Either way the attacker (at its weight, capped at the median) moves the result a bounded amount.
    mean = torch.stack(honest).mean(dim=0)
    spread = float(torch.stack([(h - mean).norm() for h in honest]).mean())
    direction = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    direction /= direction.norm()
    shifts = []
    for distance in [0.25 * k for k in range(1, 41)]:
        result = robust_aggregate([*honest, mean + distance * spread * direction], [8.0, 8.0, 8.0, weight], RULE)
        shifts.append(float((result.value - mean).norm()) / spread)
    assert max(shifts) < bound, [round(s, 2) for s in shifts]


def test_the_streamed_fast_path_is_the_weighted_mean_at_weights_capped_at_their_median(honest):
    stream = PartStream()
    for part, weight in zip(honest, [6.0, 8.0, 10.0]):
        stream.add(part, weight)
    expected = (6 * honest[0] + 8 * honest[1] + 8 * honest[2]) / 22  # 10 claims more than the median: 8
    assert torch.allclose(stream.aggregate(RULE).value, expected, atol=1e-5)


@pytest.mark.parametrize("fast_path", [True, False])
def test_an_honest_size_flipped_part_weighs_as_one_typical_peer_whatever_weight_it_declares(fast_path):
    # Nothing marks this part: its size is an honest part's, its direction the honest mean's opposite, and the
    # honest parts are mostly batch noise (as small-batch gradients are). All the defence can do is count it
    # once. At 2x the median (the earlier cap) it left 5% of the honest direction; at the median, 56%.
    generator = torch.Generator().manual_seed(5)
    signal = torch.randn(50_000, generator=generator)
    honest = [signal + 2.0 * torch.randn(50_000, generator=generator) for _ in range(3)]
    mean = torch.stack(honest).mean(dim=0)
    flipped = -mean * float(honest[0].norm() / mean.norm())
    result = robust_aggregate([*honest, flipped], [8.0, 8.0, 8.0, 16.0], RULE, fast_path=fast_path)
    assert result.offences == {}  # nothing to name it by
    kept = float(result.value @ mean) / float(mean @ mean)  # the share of the honest direction that is left
    assert kept > 0.4, kept


def test_a_sparse_honest_part_is_not_named_but_a_huge_one_is():
    # a token embedding's rows: only the peer whose batch held the token has a gradient there
    generator = torch.Generator().manual_seed(4)
    background = [1e-4 * torch.randn(4096, generator=generator) for _ in range(4)]
    spike = background[3].clone()
    spike[:64] += torch.randn(64, generator=generator)  # one row, the size of an honest part elsewhere
    typical = lambda: 1.0  # noqa: E731  the norm of a whole honest vector (the reducer's own)
    parts = [*background[:3], spike]
    assert robust_aggregate(parts, [8.0] * 4, RULE).offences  # against the spread alone it looks far off
    assert robust_aggregate(parts, [8.0] * 4, RULE, scale=typical).offences == {}
    named = robust_aggregate([*background[:3], spike * 1e3], [8.0] * 4, RULE, scale=typical).offences
    assert list(named) == [3] and "typical spread (or size)" in named[3]
