"""The hivemind workarounds refuse to run on a hivemind they were not written for."""

from __future__ import annotations

import hivemind
import pytest

from hivetrain.hivemind_compat import HIVEMIND_VERSION, check_hivemind


def test_the_installed_hivemind_is_the_one_the_workarounds_were_written_for():
    assert hivemind.__version__ == HIVEMIND_VERSION
    check_hivemind()


def test_another_hivemind_release_is_refused_with_the_fix():
    with pytest.raises(ImportError, match=rf"written for hivemind {HIVEMIND_VERSION}, found 1\.2\.0: install hivemind=="):
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
    return cls(dht, prefix="plausible", target_batch_size=10_000, min_refresh_period=0.1, max_refresh_period=0.5,
               private_key=RSAPrivateKey(), start=True, **kwargs)


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
