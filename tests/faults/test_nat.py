"""A miner behind NAT: in a network namespace that can only dial out, it trains with the swarm in client mode."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
from netns import Namespace, reaching_the_swarm
from swarm_helpers import peer_id_of, stop_and_check, wait_until

from hivetrain.settings import SwarmSettings
from hivetrain.swarm.launcher import Swarm

pytestmark = pytest.mark.integration

BASE_ENV = {"HIVE_TORCH_THREADS": "1", "HIVE_AVERAGING_TIMEOUT": "15", "HIVE_SAVE_EVERY": "0"}


def _nothing_dials_in(ns: Namespace) -> None:
    """The firewall holds (test set-up): a listener inside the namespace is not reachable from here, and it can dial out."""
    listener = subprocess.Popen(ns.exec(sys.executable, "-c", (
        "import socket,sys; s=socket.create_server(('0.0.0.0', 47000)); s.settimeout(8); "
        "c=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5); c.close()\n"
        "try: s.accept(); print('accepted')\nexcept OSError: print('nothing came in')"), ns.host_ip, "47001"),
        stdout=subprocess.PIPE, text=True)
    probe = socket.create_server((ns.host_ip, 47001))
    try:
        probe.settimeout(10)
        probe.accept()[0].close()  # it dialled out to us
        with pytest.raises(OSError):
            socket.create_connection((ns.ip, 47000), timeout=2)
        assert listener.communicate(timeout=20)[0].strip() == "nothing came in"
    finally:
        probe.close()
        if listener.poll() is None:
            listener.kill()


def test_a_miner_that_can_only_dial_out_trains_with_the_swarm_in_client_mode(tmp_path, report):
    with Namespace(dial_out_only=True) as ns:
        _nothing_dials_in(ns)
        settings = SwarmSettings(miners=1, workdir=str(tmp_path), preset="tiny", bootstrap_port=0, validator=False,
                                 run_id="nat", stop_timeout=45)
        # the swarm's DHT peers listen where the namespace can reach them; its HTTP and Redis stay on loopback
        swarm = Swarm(settings, extra_env={**BASE_ENV, "HIVE_HOST_MADDRS": f'["/ip4/{ns.host_ip}/tcp/0"]'})
        try:
            swarm.start()
            with reaching_the_swarm(swarm, ns) as reached:
                env = {"HIVE_CLIENT_MODE": "true", **reached}
                started = time.time()
                behind = swarm.add_miner(env=env, argv=ns.exec(sys.executable, "-m", "hivetrain.miner"))
                def joint_rounds():
                    assert behind.alive(), f"the miner behind NAT exited; see {behind.log_path}"
                    return [r for r in swarm.summary()["rounds"]
                            if r["kind"] == "gradients" and r["group_size"] == 2 and len(r["reported_by"]) == 2]

                rounds = wait_until(joint_rounds, timeout=300, what="gradient rounds that the miner behind NAT took part in")
                miners = swarm.summary()["miners"]
                assert behind.alive() and len(miners) == 2 and all(m["samples"] > 0 for m in miners.values())
                report("miner behind NAT (client mode)", joint_rounds=len(rounds),
                       first_joint_round_s=round(min(r["time"] for r in rounds) - started, 1),
                       samples_behind_nat=miners[peer_id_of(behind)]["samples"])
        finally:
            stop_and_check(swarm)
