"""Creating hivemind DHT peers the same way in every service."""

from __future__ import annotations

from pathlib import Path

import hivemind

from hivetrain.log import get_logger
from hivetrain.settings import DHTSettings

logger = get_logger(__name__)


def make_dht(settings: DHTSettings, initial_peers: list[str] | None = None, client_mode: bool = False, **kwargs) -> hivemind.DHT:
    """Start a DHT peer (a forked child process plus p2pd) configured from ``settings``.

    Raises ``ValueError`` for settings the daemon would reject, with what to change.
    """
    identity = settings.identity_path or None
    if identity:
        Path(identity).parent.mkdir(parents=True, exist_ok=True)
    host_maddrs = list(settings.host_maddrs)
    if client_mode:
        host_maddrs = []  # a client dials out only; nothing listens
    try:
        return hivemind.DHT(
            initial_peers=list(initial_peers or []),
            host_maddrs=host_maddrs,
            announce_maddrs=list(settings.announce_maddrs) or None,
            identity_path=identity,
            client_mode=client_mode,
            use_relay=settings.use_relay,
            start=True,
            **kwargs,
        )
    except ValueError as error:
        raise ValueError(f"could not start the DHT ({error}); check HIVE_HOST_MADDRS / HIVE_ANNOUNCE_MADDRS") from error


def visible_maddrs(dht: hivemind.DHT) -> list[str]:
    """Addresses other peers can dial, loopback last so remote peers try real interfaces first; none in client mode."""
    if dht.client_mode:  # it listens nowhere, and hivemind raises "No multiaddrs found" instead of answering []
        return []
    addrs = [str(addr) for addr in dht.get_visible_maddrs()]
    return sorted(addrs, key=lambda a: ("/127.0.0.1/" in a or "/::1/" in a, a))

