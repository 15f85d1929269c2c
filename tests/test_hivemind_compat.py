"""The hivemind workarounds refuse to run on a hivemind they were not written for, and keep to their doors.

Every override is pinned to the hivemind source it was written against; nothing replaces a hivemind
module attribute; two averagers in one process keep their own aggregation rule and bans.
"""

from __future__ import annotations

import time

import hivemind
import pytest

from hivetrain.hivemind_compat import HIVEMIND_VERSION, check_hivemind


def test_the_installed_hivemind_is_the_one_the_workarounds_were_written_for():
    assert hivemind.__version__ == HIVEMIND_VERSION
    check_hivemind()


def test_another_hivemind_release_is_refused_with_the_fix():
    with pytest.raises(
        ImportError, match=rf"written for hivemind {HIVEMIND_VERSION}, found 1\.2\.0: install hivemind=="
    ):
        check_hivemind("1.2.0")


def test_a_downloaded_state_is_checked_before_it_replaces_ours():
    import torch

    from hivetrain.hivemind_compat import StateRejected, check_downloaded_state

    local = [torch.zeros(4, 2), torch.zeros(3)]
    good = [torch.ones(4, 2), torch.ones(3), torch.ones(5)]  # parameters, then optimizer statistics
    check_downloaded_state({"epoch": 6}, good, local, max_epoch=7)
    check_downloaded_state({"epoch": 10**9}, good, local, max_epoch=None)
    bad = [
        ({"epoch": 8}, good, "beyond the 7"),
        ({"epoch": True}, good, "not a non-negative integer"),
        ({"epoch": -1}, good, "not a non-negative integer"),
        ({}, good, "not a non-negative integer"),
        ({"epoch": 1}, good[:1], "fewer than our 2"),
        ({"epoch": 1}, [torch.ones(2, 4), *good[1:]], "parameter 0 is"),
        ({"epoch": 1}, [torch.ones(4, 2, dtype=torch.float64), *good[1:]], "parameter 0 is"),
        ({"epoch": 1}, [*good[:2], torch.tensor([1.0, float("nan")])], "tensor 2 is not a finite"),
        ({"epoch": 1}, [good[0], torch.full((3,), float("inf")), good[2]], "tensor 1 is not a finite"),
    ]
    for metadata, tensors, why in bad:
        with pytest.raises(StateRejected, match=why):
            check_downloaded_state(metadata, tensors, local, max_epoch=7)


def _tracker(cls, dht, **kwargs):
    from hivemind.utils.crypto import RSAPrivateKey

    # a key of its own, as each peer's process has (trackers in one process share one by default)
    return cls(
        dht,
        prefix="plausible",
        target_batch_size=10_000,
        min_refresh_period=0.1,
        max_refresh_period=0.5,
        private_key=RSAPrivateKey(),
        start=True,
        **kwargs,
    )


def test_a_progress_record_from_the_future_is_left_out_and_named():
    import time

    from hivemind import DHT
    from hivemind.optim.progress_tracker import ProgressTracker

    from hivetrain.hivemind_compat.optimizer import PlausibleProgressTracker

    first = DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    peers = [str(a) for a in first.get_visible_maddrs()]
    dhts = [first] + [DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=peers) for _ in range(3)]
    named: list[tuple[str, str]] = []
    trackers = []
    try:
        honest = _tracker(ProgressTracker, dhts[0])
        attacker = _tracker(ProgressTracker, dhts[1])
        ours = _tracker(PlausibleProgressTracker, dhts[2], on_implausible=lambda peer, why: named.append((peer, why)))
        plain = _tracker(ProgressTracker, dhts[3])
        trackers = [honest, attacker, ours, plain]
        honest.report_local_progress(local_epoch=3, samples_accumulated=10)
        attacker.report_local_progress(local_epoch=10**9, samples_accumulated=10)
        ours.report_local_progress(local_epoch=3, samples_accumulated=10)
        plain.report_local_progress(local_epoch=3, samples_accumulated=10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (named and plain.global_epoch == 10**9):
            time.sleep(0.2)
        assert plain.global_epoch == 10**9, "the attack did not reach plain hivemind (test set-up)"
        assert ours.global_epoch == 3
        assert [peer for peer, _ in named] == [dhts[1].peer_id.to_base58()]
        assert "claims epoch 1000000000, beyond the 5" in named[0][1]
    finally:
        for tracker in trackers:
            tracker.shutdown(timeout=5)
        for dht in dhts:
            dht.shutdown()


def test_every_override_follows_the_hivemind_source_it_was_written_against():
    from hivetrain.hivemind_compat.pins import PINS, moved_pins

    pinned = {(pin.owner.__name__, pin.name) for pin in PINS}
    # the doors robust aggregation goes through: the runner an averager builds, where it assigns its matchmaking,
    # and the gradient averager hivemind.Optimizer builds
    assert {
        ("DecentralizedAverager", "_run_allreduce_inplace_"),
        ("DecentralizedAverager", "_run_internal"),
        ("Optimizer", "_make_gradient_averager"),
        ("Optimizer", "_make_state_averager"),
    } <= pinned
    assert moved_pins() == []


def test_a_pin_whose_hivemind_source_changed_is_named():
    from hivemind.averaging import DecentralizedAverager

    from hivetrain.hivemind_compat.pins import Pin, moved_pins

    stale = Pin(DecentralizedAverager, "_run_allreduce_inplace_", "0" * 16, "RobustAveraging._run_allreduce_inplace_")
    [moved] = moved_pins([stale])
    assert "RobustAveraging._run_allreduce_inplace_ follows DecentralizedAverager._run_allreduce_inplace_" in moved


def test_nothing_replaces_hivemind_module_attributes():
    from hivemind.averaging import averager as hivemind_averager
    from hivemind.averaging.allreduce import AllReduceRunner
    from hivemind.averaging.matchmaking import Matchmaking

    import hivetrain.hivemind_compat  # noqa: F401  (everything it imports)
    import hivetrain.miner.optim  # noqa: F401

    assert hivemind_averager.AllReduceRunner is AllReduceRunner and hivemind_averager.Matchmaking is Matchmaking


def _built(cls, **robust):
    """An averager object as its child holds it, without a DHT: only what the matchmaking door reads."""
    from hivetrain.hivemind_compat import Bans

    averager = cls.__new__(cls)
    averager._parent_pid = None  # no process to shut down when it is collected
    averager.aggregation_rule, averager.bans = robust.get("aggregation_rule"), robust.get("bans", Bans())
    return averager


def _drained(log) -> list:
    """What ``log`` holds (its queue's feeder thread delivers a moment after the put)."""
    found = []
    for _ in range(50):
        found += log.drain()
        if found:
            return found
        time.sleep(0.1)
    return found


def test_two_averagers_in_one_process_keep_their_own_rule_and_bans():
    from types import SimpleNamespace

    from hivemind.averaging.matchmaking import Matchmaking
    from hivemind.p2p import PeerID
    from hivemind.proto import averaging_pb2

    from hivetrain.aggregation import AggregationRule
    from hivetrain.hivemind_compat import Bans, OffenceLog, RobustAverager, RobustGradientAverager

    log = OffenceLog(ban_s=60.0)
    robust = _built(RobustGradientAverager, aggregation_rule=AggregationRule(), bans=Bans(log))
    plain = _built(RobustAverager)
    for averager in (robust, plain):  # what hivemind's _run_internal does in each child
        averager._matchmaking = Matchmaking.__new__(Matchmaking)
    peer = PeerID(b"\x00\x24\x08\x01\x12\x20" + bytes(range(32)))
    robust.bans.ban(peer.to_base58(), "robust_grad_averager", "sender", "sent NaN")
    assert robust.bans.is_banned(peer.to_base58()) and not plain.bans.is_banned(peer.to_base58())
    assert type(plain._matchmaking) is Matchmaking, "an averager without a rule keeps hivemind's matchmaking"
    refused = robust._matchmaking._check_reasons_to_reject(None, SimpleNamespace(remote_id=peer))
    assert refused.code == averaging_pb2.PROTOCOL_VIOLATION
    assert robust._matchmaking.bans is robust.bans and plain.aggregation_rule is None
    [offence] = _drained(log)
    assert (offence.peer_id, offence.role) == (peer.to_base58(), "sender")
    log.report("QmLiar", "run_progress", "progress", "claims epoch 10^9")  # caught in the parent
    [record] = log.drain_records("QmUs")
    assert (record.offender, record.role, record.banned_s, record.peer_id) == ("QmLiar", "progress", 60.0, "QmUs")


def test_forked_averagers_name_offenders_to_their_owners_log_only():
    import multiprocessing as mp

    from hivetrain.hivemind_compat import Bans, OffenceLog

    ours, theirs = OffenceLog(ban_s=5.0), OffenceLog()
    # made in the parent, before the fork, as an optimizer makes its averagers'
    bans = {"QmBad": Bans(ours), "QmOther": Bans(theirs)}

    def averager_child(peer: str):  # bans, then lives on a moment as an averager does (its queue's feeder sends)
        bans[peer].ban(peer, "run_state_averager", "state", "NaN")
        time.sleep(1.0)

    children = [mp.get_context("fork").Process(target=averager_child, args=(peer,)) for peer in bans]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=30)
        assert child.exitcode == 0
    time.sleep(0.5)  # both offences are in flight by now: a log shared between owners would hold both
    assert [(o.peer_id, o.role) for o in _drained(ours)] == [("QmBad", "state")]
    assert [o.peer_id for o in _drained(theirs)] == ["QmOther"]
    # the owner's averagers share its ban table (made before the fork); another owner's bans are its own
    assert bans["QmBad"].is_banned("QmBad") and not bans["QmOther"].is_banned("QmBad")


def test_a_negative_ban_is_refused_with_the_fix():
    from hivetrain.hivemind_compat import OffenceLog

    with pytest.raises(ValueError, match="ban_s must be >= 0"):
        OffenceLog(ban_s=-1.0)


def test_declared_bandwidths_count_at_most_four_times_their_median_and_junk_counts_as_unspecified():
    from hivetrain.hivemind_compat.averagers import bounded_bandwidths

    assert bounded_bandwidths([1.0, 1.0, 1.0, 100.0]) == [1.0, 1.0, 1.0, 4.0]
    assert bounded_bandwidths([2.0, 0.0, None, 3.0]) == [2.0, 0.0, None, 3.0]  # a client (0), an unspecified peer
    junk = [float("nan"), float("inf"), -1.0, "fast", True, [1.0]]
    assert bounded_bandwidths([1.0, *junk]) == [1.0] + [None] * len(junk)
    assert bounded_bandwidths([None, None]) == [None, None]
