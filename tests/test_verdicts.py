"""Claimed-samples verdicts: DHT progress records and a throughput ceiling bound what a miner may claim."""

from __future__ import annotations

import pytest

from hivetrain.validator.verdicts import check_claimed_samples, judge_claims


@pytest.mark.parametrize(
    "claimed, dht, elapsed, verdict, verified, why",
    [
        (1000, 1000, 100, "pass", 1000, "DHT shows"),
        (1080, 1000, 100, "pass", 1000, "DHT shows"),  # within 10 % tolerance: credit what the DHT shows
        (900, 1000, 100, "pass", 900, "DHT shows"),
        (1200, 1000, 100, "fail", 0, "progress records show 1000"),
        (500, None, 100, "fail", 0, "no progress records"),
        (0, None, 100, "pass", 0, "no samples"),
        (5000, 5000, 100, "fail", 0, "ceiling"),  # 50 samples/s claimed, 20/s is the bound
        (2200, 2200, 100, "pass", 2200, "DHT shows"),  # 22/s: inside the 10 % tolerance
    ],
)
def test_claimed_samples_verdicts(claimed, dht, elapsed, verdict, verified, why):
    result = check_claimed_samples(claimed, dht, elapsed, max_samples_per_s=20.0, tolerance=0.1)
    assert (result.verdict, result.verified_samples) == (verdict, verified) and why in result.reason, result


def test_claimed_samples_rejects_bad_arguments():
    with pytest.raises(ValueError):
        check_claimed_samples(-1, 0, 10, 1.0, 0.1)
    with pytest.raises(ValueError):
        check_claimed_samples(1, 0, 10, 0.0, 0.1)


def test_credit_is_the_smaller_of_the_claim_and_the_dht_growth_whatever_the_tolerance():
    # the default tolerance, 1.0: claiming 1,990 against 1,000 in the DHT passes (polls miss samples), and earns 1,000
    inflated = judge_claims(1990, 1000, 1990, 1000, elapsed_s=100, max_samples_per_s=10_000, tolerance=1.0)
    assert (inflated.verdict, inflated.verified_samples, inflated.claimed_samples) == ("pass", 1000, 1990)
    assert (
        judge_claims(800, 1000, 800, 1000, 100, 10_000, 1.0).verified_samples == 800
    )  # an honest under-claim: its claim
    # the totals since first seen pass, but this window's DHT growth is smaller: the window's growth bounds the credit
    assert judge_claims(500, 200, 1500, 1500, 100, 10_000, 1.0).verified_samples == 200
    assert judge_claims(500, None, 1500, 1500, 100, 10_000, 1.0).verified_samples == 0  # nothing in the DHT this window
    beyond = judge_claims(2100, 1000, 2100, 1000, 100, 10_000, 1.0)  # above the tolerance: a failure, no credit
    assert (beyond.verdict, beyond.verified_samples) == (
        "fail",
        0,
    ) and "DHT progress records show 1000" in beyond.reason
