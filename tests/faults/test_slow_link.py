"""A slow link: one of 4 miners has its uplink cut to 5 Mbit/s mid-run. The swarm's time per epoch before and after."""

from __future__ import annotations

import sys
import time

import pytest
from netns import Namespace, reaching_the_swarm
from swarm_helpers import peer_id_of, stop_and_check, wait_until

from hivetrain.settings import SwarmSettings
from hivetrain.swarm.launcher import Swarm

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


def test_a_miner_whose_link_drops_to_5_mbit(tmp_path, report):
    with Namespace() as ns:
        settings = SwarmSettings(miners=3, workdir=str(tmp_path), preset="tiny", bootstrap_port=0, validator=False,
                                 run_id="slow-link", stop_timeout=45)
        swarm = Swarm(settings, extra_env={**BASE_ENV, "HIVE_HOST_MADDRS": f'["/ip4/{ns.host_ip}/tcp/0"]'})
        try:
            swarm.start()
            with reaching_the_swarm(swarm, ns) as reached:
                # the 4th miner's bandwidth is what its link will have: the same setting before and after the cut
                env = {"HIVE_HOST_MADDRS": f'["/ip4/{ns.ip}/tcp/0"]', "HIVE_BANDWIDTH": str(RATE_MBIT), **reached}
                slow = swarm.add_miner(env=env, argv=ns.exec(sys.executable, "-m", "hivetrain.miner"))
                wait_until(lambda: all(peer_id_of(m) for m in swarm.miners), timeout=180, what="the miners' DHTs")
                everyone = {peer_id_of(m) for m in swarm.miners}

                def rounds(since: float, full: bool):
                    assert slow.alive(), f"the miner in the namespace exited; see {slow.log_path}"
                    return [r for r in swarm.summary()["rounds"] if r["kind"] == "gradients" and r["time"] >= since
                            and (set(r["peers"]) == everyone or not full)]

                def enough(since: float):  # EPOCHS epochs of the swarm, and the slow miner in a round among them
                    some = rounds(since, full=False)
                    return some and _epochs(some) >= EPOCHS and rounds(since, full=True) and some

                first_full = wait_until(lambda: rounds(0.0, full=True), timeout=300, what="a round of all 4 miners")[0]
                before = wait_until(lambda: enough(first_full["time"]), timeout=300,
                                    what=f"{EPOCHS} epochs with all 4 miners at full speed")
                ns.limit(RATE_MBIT)
                cut_at = time.time()
                after = wait_until(lambda: enough(cut_at), timeout=600,
                                   what=f"{EPOCHS} epochs and a round of all 4 with one uplink at {RATE_MBIT} Mbit/s")
                fast, slowed = _seconds_per_epoch(before), _seconds_per_epoch(after)
                slow_id = peer_id_of(slow)
                report(f"slow link (1 of 4 miners' uplink cut to {RATE_MBIT} Mbit/s)",
                       s_per_epoch_before=round(fast, 1), s_per_epoch_after=round(slowed, 1), slowdown=round(slowed / fast, 2),
                       rounds_before=f"{sum(slow_id in r['peers'] for r in before)} of {len(before)} with it",
                       rounds_after=f"{sum(slow_id in r['peers'] for r in after)} of {len(after)} with it",
                       mean_round_s_with_it_after=round(_mean([r["duration_s"] for r in after if slow_id in r["peers"]]), 1))
        finally:
            stop_and_check(swarm)
