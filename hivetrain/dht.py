"""Creating hivemind DHT peers the same way in every service."""

from __future__ import annotations

from pathlib import Path

from hivetrain.hivemind_compat import DHT
from hivetrain.log import get_logger

logger = get_logger(__name__)


def make_dht(
    initial_peers: list[str] | None = None,
    *,
    host_maddrs: list[str],
    announce_maddrs: list[str] = (),
    identity_path: str = "",
    use_relay: bool = True,
    client_mode: bool = False,
    use_auto_relay: bool = False,
    **kwargs,
) -> DHT:
    """Start a DHT peer (a forked child process plus p2pd) that dials ``initial_peers``.

    ``host_maddrs``, ``announce_maddrs``, ``identity_path`` and ``use_relay`` are the ``HIVE_*`` settings of
    those names (``DHTSettings.dht_options()``); ``client_mode``: the peer dials out only.
    ``use_auto_relay``: the peer is behind NAT (not in client mode) and gets dialled through relays.
    Raises ``ValueError`` for settings the daemon would reject, with what to change.
    """
    identity = identity_path or None
    if identity:
        Path(identity).parent.mkdir(parents=True, exist_ok=True)
    host_maddrs = list(host_maddrs)
    if client_mode:
        host_maddrs = []  # a client dials out only; nothing listens
    elif use_auto_relay:
        if not use_relay:
            raise ValueError("HIVE_USE_AUTO_RELAY needs HIVE_USE_RELAY=true (or use HIVE_CLIENT_MODE=true instead)")
        # libp2p looks for relays only once AutoNAT calls the peer private, and AutoNAT only asks peers to dial
        # back to public addresses: behind a firewall with private ones, or with too few peers, that never
        # happens (issue 14's first trial), so a peer told it is behind NAT says so. It then reserves slots on
        # reachable peers (every peer serves as a relay; within 3 minutes, at once when it knows 4) and advertises
        # /p2p-circuit addresses through their public addresses.
        kwargs.update(use_auto_relay=True, force_reachability="private")
    try:
        return DHT(
            initial_peers=list(initial_peers or []),
            host_maddrs=host_maddrs,
            announce_maddrs=list(announce_maddrs) or None,
            identity_path=identity,
            client_mode=client_mode,
            use_relay=use_relay,
            start=True,
            **kwargs,
        )
    except ValueError as error:
        raise ValueError(f"could not start the DHT ({error}); check HIVE_HOST_MADDRS / HIVE_ANNOUNCE_MADDRS") from error


def visible_maddrs(dht: DHT, latest: bool = False) -> list[str]:
    """Addresses other peers can dial, none in client mode: relayed (/p2p-circuit) first, then the peer's own,
    loopback last, so remote peers try what reaches them first. ``latest``: ask p2pd again (relayed addresses
    appear once a relay has reserved a slot) instead of the addresses it had at start."""
    if dht.client_mode:  # it listens nowhere, and hivemind raises "No multiaddrs found" instead of answering []
        return []
    addrs = [str(addr) for addr in (dht.get_visible_maddrs(latest=True) if latest else dht.get_visible_maddrs())]
    return sorted(addrs, key=lambda a: ("/127.0.0.1/" in a or "/::1/" in a, "/p2p-circuit" not in a, a))
