"""A miner SIGKILLed in the middle of an averaging round: the round fails over, the next one goes on without it."""

from __future__ import annotations

import os
import re
import signal
import time
from datetime import datetime

import pytest
from swarm_helpers import peer_id_of, stop_and_check, wait_until

from hivetrain.settings import SwarmSettings
from hivetrain.swarm.launcher import Swarm

pytestmark = pytest.mark.integration

BASE_ENV = {"HIVE_TORCH_THREADS": "1", "HIVE_AVERAGING_TIMEOUT": "15", "HIVE_SAVE_EVERY": "0"}
#: hivemind logs this (verbose) when a miner enters an epoch's averaging round
_BEGINS = re.compile(rb"Beginning optimizer step #(\d+)")
_PARTIAL = re.compile(r"Averaging: received ([\d.]+)% results")
#: and the miner logs how each round ended (hivetrain.miner.train)
_OUTCOME = re.compile(
    r"^(\S+ \S+) INFO \[hivetrain\.miner\.train\] averaging round for epoch \d+ \(gradients\)"
    r"(?:: (\d+) peers|( failed or ran alone))"
)


def _kill_when_its_next_round_begins(victim, timeout: float) -> tuple[int, float]:
    """Watch the victim's log; SIGKILL its whole group the moment it begins an averaging round.
    Returns the epoch of that round and when it was killed."""
    with open(victim.log_path, "rb") as log:
        log.seek(0, os.SEEK_END)
        deadline, pending = time.monotonic() + timeout, b""
        while time.monotonic() < deadline:
            assert victim.alive(), f"the victim exited by itself; see {victim.log_path}"
            pending += log.read()
            if match := _BEGINS.search(pending):
                os.killpg(victim.pid, signal.SIGKILL)
                killed_at = time.time()
                victim.popen.wait(timeout=10)
                return int(match.group(1)), killed_at
            pending = pending[pending.rfind(b"\n") + 1 :]
            time.sleep(0.02)
    pytest.fail(f"the victim began no averaging round within {timeout:.0f}s")


def _log_since(miner, offset: int) -> str:
    with open(miner.log_path, "rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


def _round_outcomes_since(miner, since: float) -> list[str]:
    """The survivor's own account of its rounds after ``since``: 'ok (N peers)' or 'failed'."""
    outcomes = []
    for line in miner.log_path.read_text(errors="replace").splitlines():
        if match := _OUTCOME.match(line):
            stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
            if stamp >= since:
                outcomes.append("failed" if match.group(3) else f"ok ({match.group(2)} peers)")
    return outcomes


def test_a_miner_killed_mid_round_is_failed_over(tmp_path, report):
    settings = SwarmSettings(
        miners=3,
        workdir=str(tmp_path),
        preset="tiny",
        bootstrap_port=0,
        validator=False,
        run_id="kill-mid-round",
        stop_timeout=45,
    )
    swarm = Swarm(settings, extra_env=BASE_ENV)
    try:
        swarm.start()
        victim, *survivors = swarm.miners
        wait_until(lambda: all(peer_id_of(m) for m in swarm.miners), timeout=180, what="the miners' DHTs")
        dead = peer_id_of(victim)
        alive = {peer_id_of(m) for m in survivors}

        def rounds(since: float, group: set[str]):
            return [
                r
                for r in swarm.summary()["rounds"]
                if r["kind"] == "gradients" and r["time"] >= since and set(r["peers"]) == group
            ]

        wait_until(lambda: rounds(0.0, alive | {dead}), timeout=300, what="a gradient round of all 3 miners")
        epoch, killed_at = _kill_when_its_next_round_begins(victim, timeout=120)
        logged = [m.log_path.stat().st_size for m in survivors]
        after = wait_until(
            lambda: rounds(killed_at, alive), timeout=180, what="a round of the 2 survivors after the kill"
        )
        wait_until(
            lambda: len(rounds(killed_at, alive)) >= 2, timeout=180, what="2 rounds of the survivors after the kill"
        )
        assert all(m.alive() for m in survivors), "a survivor died with the victim"
        outcomes = {peer_id_of(m)[:12]: _round_outcomes_since(m, killed_at)[:3] for m in survivors}
        # an all-reduce the victim was in when it died ends with the parts it held missing (hivemind logs the share)
        partial = sorted(
            {share for m, offset in zip(survivors, logged) for share in _PARTIAL.findall(_log_since(m, offset))}
        )
        report(
            "kill mid-round (1 of 3 miners SIGKILLed as its round began)",
            epoch=epoch,
            first_round_without_it_s=round(min(r["time"] for r in after) - killed_at, 1),
            survivors_next_rounds=outcomes,
            partial_all_reduce_results_pct=partial,
        )
    finally:
        stop_and_check(swarm)
