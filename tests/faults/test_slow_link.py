"""A slow link: one of 4 miners has its uplink cut to 5 Mbit/s mid-run.

The swarm's time per epoch before and after. The slow miner times its own uplink in its next round
(``hivetrain.hivemind_compat.uplink``), steps out of averaging rounds, and takes up the swarm's state
at each epoch instead: the other three keep their pace, and it keeps their parameters.
"""

from __future__ import annotations

import re
import sys
import time
from datetime import datetime

import pytest
from netns import Namespace, fault_swarm
from swarm_helpers import peer_id_of, wait_until

pytestmark = pytest.mark.integration

RATE_MBIT = 5
EPOCHS = 4  # the swarm's pace is measured over this many epochs in each phase
#: every miner says what it can upload (any unit, the same on all): hivemind gives the slow one a small part to reduce
BASE_ENV = {"HIVE_TORCH_THREADS": "1", "HIVE_AVERAGING_TIMEOUT": "30", "HIVE_SAVE_EVERY": "0", "HIVE_BANDWIDTH": "1000"}


def _epochs(rounds: list[dict]) -> int:
    return max(r["epoch"] for r in rounds) - min(r["epoch"] for r in rounds)


def _seconds_per_epoch(rounds: list[dict]) -> float:
    """The swarm's pace over these rounds (of any group): seconds from the first to the last, per epoch gone through."""
    return (max(r["time"] for r in rounds) - min(r["time"] for r in rounds)) / max(1, _epochs(rounds))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


_ASIDE = re.compile(
    r"^(\S+ \S+) WARN .*our part of epoch \d+'s round .* the swarm's straggler, "
    r"stepping out of averaging rounds for (\d+)s",
    re.M,
)


def test_a_miner_whose_link_drops_to_5_mbit_steps_aside(tmp_path, report):
    with Namespace() as ns, fault_swarm(ns, tmp_path, "slow-link", miners=3, env=BASE_ENV) as (swarm, reached):
        # the 4th miner's bandwidth is what its link will have: the same setting before and after the cut
        env = {"HIVE_HOST_MADDRS": f'["/ip4/{ns.ip}/tcp/0"]', "HIVE_BANDWIDTH": str(RATE_MBIT), **reached}
        slow = swarm.add_miner(env=env, argv=ns.exec(sys.executable, "-m", "hivetrain.miner"))
        wait_until(lambda: all(peer_id_of(m) for m in swarm.miners), timeout=180, what="the miners' DHTs")
        everyone, slow_id = {peer_id_of(m) for m in swarm.miners}, peer_id_of(slow)

        def rounds(since: float, full: bool):
            assert slow.alive(), f"the miner in the namespace exited; see {slow.log_path}"
            return [
                r
                for r in swarm.summary()["rounds"]
                if r["kind"] == "gradients" and r["time"] >= since and (set(r["peers"]) == everyone or not full)
            ]

        def enough(since: float):  # EPOCHS epochs of the swarm, and the slow miner in a round among them
            some = rounds(since, full=False)
            return some and _epochs(some) >= EPOCHS and rounds(since, full=True) and some

        first_full = wait_until(lambda: rounds(0.0, full=True), timeout=300, what="a round of all 4 miners")[0]
        before = wait_until(
            lambda: enough(first_full["time"]), timeout=300, what=f"{EPOCHS} epochs with all 4 miners at full speed"
        )
        ns.limit(RATE_MBIT)
        cut_at = time.time()
        # its next round is slow; it times its own uplink and steps out of the rounds
        asides = wait_until(
            lambda: _ASIDE.findall(slow.log_path.read_text(errors="replace")),
            timeout=300,
            what="the slow miner stepping out of averaging rounds",
        )
        aside_at = datetime.strptime(asides[0][0], "%Y-%m-%d %H:%M:%S.%f").timestamp()
        aside_s = int(asides[0][1])
        timed = [r for r in rounds(cut_at, full=False) if slow_id in r["peers"]]

        def without_it():
            later = [r for r in rounds(cut_at, full=False) if r["time"] - r["duration_s"] > aside_at]  # begun after
            return later if later and _epochs(later) >= EPOCHS else None

        after = wait_until(without_it, timeout=300, what=f"{EPOCHS} epochs after the slow miner stepped aside")
        assert not [r for r in after if slow_id in r["peers"]], "the miner that stepped aside was still in rounds"
        # left out, not left behind: it takes up the swarm's state at each epoch
        swarm_epoch = max(r["epoch"] for r in after)
        slow_epoch = wait_until(
            lambda: (
                (e := swarm.summary()["miners"].get(slow_id, {}).get("last_epoch")) is not None
                and e >= swarm_epoch - 1
                and e
            ),
            timeout=120,
            what=f"the miner that stepped aside at the swarm's epoch ({swarm_epoch})",
        )
        # the goal is the round time; the epoch's pace also counts 3 miners' samples now instead of 4
        round_before, round_after = _mean([r["duration_s"] for r in before]), _mean([r["duration_s"] for r in after])
        fast, slowed = _seconds_per_epoch(before), _seconds_per_epoch(after)
        report(
            f"slow link (1 of 4 miners' uplink cut to {RATE_MBIT} Mbit/s)",
            mean_round_s_before=round(round_before, 2),
            mean_round_s_after=round(round_after, 2),
            round_slowdown=round(round_after / round_before, 2),
            s_per_epoch_before=round(fast, 1),
            s_per_epoch_after=round(slowed, 1),
            round_s_with_it_after_cut=[round(r["duration_s"], 1) for r in timed],
            stepped_aside_for_s=aside_s,
            rounds_after_with_it=f"0 of {len(after)}",
            slow_miner_epoch=f"{slow_epoch} (swarm {swarm_epoch})",
        )
