"""One miner's life: it trains, stops cleanly on SIGTERM (checkpoint, deregister, no orphans), and resumes."""

from __future__ import annotations

import json
import re

import pytest
from swarm_helpers import peer_id_in, wait_until

from hivetrain.protocol.checkpoints import latest_checkpoint
from hivetrain.settings import SwarmSettings
from hivetrain.swarm import procs
from hivetrain.swarm.launcher import Swarm

pytestmark = pytest.mark.integration


def test_sigterm_checkpoints_deregisters_and_restart_resumes(tmp_path):
    settings = SwarmSettings(
        miners=1,
        workdir=str(tmp_path),
        preset="tiny",
        bootstrap_port=0,
        validator=False,
        run_id="life",
        stop_timeout=45,
    )
    swarm = Swarm(settings, extra_env={"HIVE_SAVE_EVERY": "1", "HIVE_TORCH_THREADS": "1"})
    services = []
    try:
        swarm.start()
        miner = swarm.miners[0]
        services = [swarm.redis, swarm.bootstrap, miner]
        registry = swarm.registry()
        wait_until(lambda: registry.live_peers(role="miner"), timeout=120, what="the miner's registration")
        wait_until(
            lambda: (m := swarm.summary()["miners"]) and max(v["last_epoch"] for v in m.values()) >= 2,
            timeout=180,
            what="two epochs",
        )
        assert miner.stop(timeout=45) == 0
        assert not miner.group_alive()  # DHT, averagers and p2pd went with it
        assert registry.live_peers(role="miner") == []  # it deregistered instead of waiting for the TTL
        checkpoint = latest_checkpoint(tmp_path / "miner-0")
        saved = json.loads((checkpoint / "trainer.json").read_text())
        assert saved["epoch"] >= 2
        first_id = peer_id_in(miner.log_path.read_text())

        again = swarm.add_miner(
            env={
                "HIVE_CHECKPOINT_DIR": str(tmp_path / "miner-0"),
                "HIVE_WALLET_DIR": str(tmp_path / "miner-0" / "wallets"),
            }
        )
        services.append(again)
        first_step = re.compile(r"step (\d+) epoch (\d+) ")
        wait_until(
            lambda: first_step.search(again.log_path.read_text()), timeout=120, what="the restarted miner's first step"
        )
        log = again.log_path.read_text()
        assert f"resuming from {checkpoint}" in log
        assert peer_id_in(log) == first_id  # same identity (and hotkey, so the same data shard)
        step, epoch = map(int, first_step.search(log).groups())
        assert step > saved["step"] and epoch >= saved["epoch"]  # it counts on from where it stopped
    finally:
        swarm.stop()
        leftovers = [s.name for s in services if s is not None and s.group_alive()]
        for service in services:
            if service is not None:
                procs.kill_group(service.pid)
        assert not leftovers
