"""hivetrain.dht: real hivemind peers on loopback, started the way the services start them."""

from __future__ import annotations

import os
import time

import pytest
from hivemind.utils import get_dht_time

from hivetrain.dht import make_dht, visible_maddrs
from hivetrain.settings import DHTSettings
from hivetrain.swarm import procs

#: How long a second peer may take to reach the first one and see its record.
CONNECT_TIMEOUT_S = 30.0


@pytest.mark.integration
def test_peers_meet_through_a_dns4_announce_address(monkeypatch):
    """Compose and Kubernetes announce ``/dns4/<service>/tcp/N``; a peer given only that address (and the peer
    id) must dial it, resolve the name and reach the DHT behind it. Loopback only: localhost is the name."""
    for key in list(os.environ):
        if key.startswith("HIVE_"):
            monkeypatch.delenv(key)
    port = procs.free_port()
    announced = f"/dns4/localhost/tcp/{port}"
    first = second = None
    try:
        first = make_dht(
            **DHTSettings(
                host_maddrs=[f"/ip4/127.0.0.1/tcp/{port}"], announce_maddrs=[announced], use_relay=False
            ).dht_options()
        )
        assert visible_maddrs(first) == [f"{announced}/p2p/{first.peer_id}"], "the peer announces the dns4 address only"
        second = make_dht(
            [f"{announced}/p2p/{first.peer_id}"],
            **DHTSettings(host_maddrs=["/ip4/127.0.0.1/tcp/0"], use_relay=False).dht_options(),
        )
        assert second.store("dns4-probe", "from-second", get_dht_time() + 60), (
            "the second peer stored its record nowhere"
        )
        deadline, found = time.monotonic() + CONNECT_TIMEOUT_S, None
        while time.monotonic() < deadline:
            found = first.get("dns4-probe", latest=True)
            if found is not None:
                break
            time.sleep(0.5)
        assert found is not None and found.value == "from-second", (
            f"the first peer never saw the second peer's record within {CONNECT_TIMEOUT_S:.0f} s"
        )
    finally:
        for dht in (second, first):
            if dht is not None:
                dht.shutdown()
