"""Which miners a check round asks (``hivetrain.validator.spot.CheckSchedule``): bounded, fair to the miners that were
here first, and deaf to endpoints that stall."""

from __future__ import annotations

import pytest

from hivetrain.protocol.records import PeerRecord
from hivetrain.validator.spot import BENCH_FIRST_S, BENCH_MAX_S, CheckSchedule, SpotCheck
from hivetrain.validator.verdicts import SpotCheckResult


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _miner(name: str) -> PeerRecord:
    return PeerRecord(
        peer_id=f"Qm{name}",
        role="miner",
        hotkey=name,
        challenge_url="http://10.0.0.1:8200",
        multiaddrs=[],
        started_at=0.0,
    )


def _check(name: str, verdict: str) -> SpotCheck:
    return SpotCheck(name, SpotCheckResult(verdict, "test"), 0, 0, 0, 0)


def test_a_round_is_bounded_and_the_miners_that_passed_keep_half_of_it_against_a_fresh_crowd():
    clock = Clock()
    schedule = CheckSchedule(per_round=4, clock=clock)
    honest = [_miner(f"honest{i}") for i in range(3)]
    schedule.pick(honest)  # known to the validator first
    schedule.record(honest, {m.hotkey: _check(m.hotkey, "pass") for m in honest}, set())
    clock.now += 10
    crowd = [_miner(f"fresh{i}") for i in range(100)]
    asked = schedule.pick(crowd + honest)
    assert len(asked) == 4
    assert sum(m.hotkey.startswith("honest") for m in asked) == 2  # half, least recently checked first
    # the next round: the honest miner not asked last time comes first among the proven
    schedule.record(asked, {m.hotkey: _check(m.hotkey, "pass") for m in asked if m.hotkey.startswith("honest")}, set())
    clock.now += 10
    again = [m.hotkey for m in schedule.pick(crowd + honest) if m.hotkey.startswith("honest")]
    assert {m.hotkey for m in honest} - {m.hotkey for m in asked if m.hotkey.startswith("honest")} <= set(again)


def test_the_others_go_oldest_first_and_unused_slots_go_to_the_other_side():
    clock = Clock()
    schedule = CheckSchedule(per_round=4, clock=clock)
    old = [_miner(f"old{i}") for i in range(2)]
    schedule.pick(old)
    clock.now += 5
    young = [_miner(f"young{i}") for i in range(10)]
    assert {m.hotkey for m in schedule.pick(young + old)} >= {"old0", "old1"}  # nobody has passed: all 4 slots
    proven = [_miner("proven")]
    schedule.pick(proven)
    schedule.record(proven, {"proven": _check("proven", "pass")}, set())
    assert len(schedule.pick(proven)) == 1  # alone: one miner, one slot
    assert len(schedule.pick(proven + young)) == 4  # one proven, three others


def test_a_stalled_endpoint_is_benched_for_longer_each_time_and_an_answer_ends_it():
    clock = Clock()
    schedule = CheckSchedule(per_round=4, clock=clock)
    tarpit = _miner("tarpit")
    benches = []
    for _ in range(8):
        assert schedule.pick([tarpit]) == [tarpit]
        schedule.record([tarpit], {"tarpit": _check("tarpit", "fail")}, {"tarpit"})
        until, _ = schedule.benched["tarpit"]
        benches.append(until - clock.now)
        assert schedule.pick([tarpit]) == []  # benched
        schedule.forget(set())  # nor does leaving the registry end a bench
        assert "tarpit" in schedule.benched
        clock.now = until
    assert benches[:3] == [BENCH_FIRST_S, 2 * BENCH_FIRST_S, 4 * BENCH_FIRST_S] and max(benches) == BENCH_MAX_S
    schedule.record([tarpit], {"tarpit": _check("tarpit", "fail")}, set())  # it answered (wrongly): no more bench
    assert schedule.pick([tarpit]) == [tarpit] and "tarpit" not in schedule.benched


def test_forgetting_departed_miners_keeps_memory_bounded():
    schedule = CheckSchedule(per_round=2, clock=Clock())
    crowd = [_miner(f"m{i}") for i in range(50)]
    schedule.pick(crowd)
    schedule.forget({"m0"})
    assert set(schedule.first_seen) == {"m0"}
    with pytest.raises(ValueError):
        CheckSchedule(per_round=0)
