"""A miner behind NAT: in a network namespace that can only dial out, it trains with the swarm in client mode,
or as a full peer that the others dial through a relay."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import hivemind
import pytest
from netns import Namespace, fault_swarm
from swarm_helpers import peer_id_of, wait_until

pytestmark = pytest.mark.integration

BASE_ENV = {"HIVE_TORCH_THREADS": "1", "HIVE_AVERAGING_TIMEOUT": "15", "HIVE_SAVE_EVERY": "0"}


def _nothing_dials_in(ns: Namespace) -> None:
    """The firewall holds (test set-up): a listener inside the namespace is not reachable from here, and it can dial
    out."""
    listener = subprocess.Popen(
        ns.exec(
            sys.executable,
            "-c",
            (
                "import socket,sys; s=socket.create_server(('0.0.0.0', 47000)); s.settimeout(8); "
                "c=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5); c.close()\n"
                "try: s.accept(); print('accepted')\nexcept OSError: print('nothing came in')"
            ),
            ns.host_ip,
            "47001",
        ),
        stdout=subprocess.PIPE,
        text=True,
    )
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


def _public_address(ns: Namespace) -> str:
    """A public-looking address of this machine that the namespace reaches (a /32 on the veth, torn down with it).

    libp2p advertises relayed addresses only through a relay's public addresses (a private one could be anyone's),
    so the relays, the swarm's peers, listen on one. 11.0.0.0/8 is public space; the /32 lives only on the veth this
    test made, so what is sent to it stays on this machine (and that one address is unreachable meanwhile)."""
    address = "11." + ns.host_ip.split(".", 1)[1]
    subprocess.run(
        ["ip", "addr", "add", f"{address}/32", "dev", ns.host_if], check=True, capture_output=True, timeout=30
    )
    subprocess.run(
        ns.exec("ip", "route", "add", f"{address}/32", "dev", ns.ns_if), check=True, capture_output=True, timeout=30
    )
    return address


def _joint_gradient_rounds(swarm, behind) -> list[dict]:
    """Gradient rounds of the two miners, reported by both."""
    assert behind.alive(), f"the miner behind NAT exited; see {behind.log_path}"
    return [
        r
        for r in swarm.summary()["rounds"]
        if r["kind"] == "gradients" and r["group_size"] == 2 and len(r["reported_by"]) == 2
    ]


def test_a_miner_that_can_only_dial_out_trains_with_the_swarm_in_client_mode(tmp_path, report):
    with Namespace(dial_out_only=True) as ns:
        _nothing_dials_in(ns)
        # the swarm's DHT peers listen where the namespace can reach them; its HTTP and Redis stay on loopback
        with fault_swarm(ns, tmp_path, "nat", miners=1, env=BASE_ENV) as (swarm, reached):
            env = {"HIVE_CLIENT_MODE": "true", **reached}
            started = time.time()
            behind = swarm.add_miner(env=env, argv=ns.exec(sys.executable, "-m", "hivetrain.miner"))
            rounds = wait_until(
                lambda: _joint_gradient_rounds(swarm, behind),
                timeout=300,
                what="gradient rounds that the miner behind NAT took part in",
            )
            miners = swarm.summary()["miners"]
            assert behind.alive() and len(miners) == 2 and all(m["samples"] > 0 for m in miners.values())
            report(
                "miner behind NAT (client mode)",
                joint_rounds=len(rounds),
                first_joint_round_s=round(min(r["time"] for r in rounds) - started, 1),
                samples_behind_nat=miners[peer_id_of(behind)]["samples"],
            )


def test_a_miner_behind_nat_is_dialled_through_a_relay_and_averages_as_a_full_peer(tmp_path, report):
    """Not in client mode: with HIVE_USE_AUTO_RELAY it reserves a slot on the swarm's peers (every hivemind peer
    serves as a circuit relay), registers its /p2p-circuit addresses, is dialled through them, and averages
    gradients as a full peer (it listens, so all-reduce gives it a part to reduce, as it does any full peer)."""
    with Namespace(dial_out_only=True) as ns:
        _nothing_dials_in(ns)
        public = _public_address(ns)
        # 3 miners and the bootstrap: 4 relay candidates, which libp2p takes at once (with fewer it waits up to
        # 3 minutes for more, and one run in five waited longer than 5)
        with fault_swarm(ns, tmp_path, "relayed", miners=3, env=BASE_ENV, listen_ip=public) as (swarm, reached):
            probe = None
            try:
                env = {"HIVE_USE_AUTO_RELAY": "true", "HIVE_HOST_MADDRS": f'["/ip4/{ns.ip}/tcp/0"]', **reached}
                started = time.time()
                behind = swarm.add_miner(env=env, argv=ns.exec(sys.executable, "-m", "hivetrain.miner"))

                def relayed_addrs():
                    assert behind.alive(), f"the miner behind NAT exited; see {behind.log_path}"
                    peer_id = peer_id_of(behind)
                    records = [p for p in swarm.registry().live_peers(role="miner") if p.peer_id == peer_id]
                    return [a for r in records for a in r.multiaddrs if "/p2p-circuit/" in a]

                circuits = wait_until(
                    relayed_addrs, timeout=330, what="the miner behind NAT registering a relayed address"
                )
                relayed_s = time.time() - started
                assert all(a.endswith(f"/p2p/{peer_id_of(behind)}") and f"/ip4/{public}/" in a for a in circuits), (
                    circuits
                )
                # a peer it never dialled reaches it, knowing only a relayed address: the DHT pings it through the relay
                probe = hivemind.DHT(initial_peers=circuits[:1], client_mode=True, start=True)
                rounds = wait_until(
                    lambda: [
                        r
                        for r in swarm.summary()["rounds"]
                        if r["kind"] == "gradients" and peer_id_of(behind) in r["peers"] and len(r["reported_by"]) >= 2
                    ],
                    timeout=180,
                    what="gradient rounds that the relayed miner took part in",
                )
                miners = swarm.summary()["miners"]
                assert behind.alive() and len(miners) == 4 and all(m["samples"] > 0 for m in miners.values())
                report(
                    "miner behind NAT (relayed)",
                    joint_rounds=len(rounds),
                    relayed_after_s=round(relayed_s, 1),
                    first_joint_round_s=round(min(r["time"] for r in rounds) - started, 1),
                    relayed_addrs=len(circuits),
                    samples_behind_nat=miners[peer_id_of(behind)]["samples"],
                )
            finally:
                if probe is not None:
                    probe.shutdown()
