"""The ban table one owner's averagers share: a ban made in one forked child holds in the others."""

from __future__ import annotations

import multiprocessing as mp
import time

from hivetrain.hivemind_compat.bans import Bans, BanTable, OffenceLog


def test_a_ban_made_in_a_forked_child_holds_in_the_parent_and_its_siblings():
    log = OffenceLog(ban_s=60.0)
    ours, sibling = Bans(log), Bans(log)  # made before the fork, as an owner makes its averagers' bans
    child = mp.get_context("fork").Process(target=ours.ban, args=("QmBad", "grads", "sender", "sent NaN"))
    child.start()
    child.join(timeout=30)
    assert child.exitcode == 0
    assert sibling.is_banned("QmBad") and not sibling.is_banned("QmGood")
    assert not Bans(OffenceLog()).is_banned("QmBad"), "another owner's bans are its own"


def test_a_flood_of_bans_forgets_those_that_end_first():
    table = BanTable(slots=32)
    now = time.monotonic()
    table.ban("QmLong", now + 600)
    for index in range(1000):
        table.ban(f"QmShort{index}", now + 1)
    assert table.until("QmLong") == now + 600
    table.ban("QmLong", now + 10)  # a later, shorter ban of the same peer does not cut the first one short
    assert table.until("QmLong") == now + 600
