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
