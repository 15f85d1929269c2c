"""Who may take part in training: live registrations bound to a hotkey the chain admits; and the operator's CLI.

``make_admission`` builds the ``hivetrain.protocol.admission.Admission`` a miner, the validator or the
bootstrap asks: a peer id is admitted when a live, bound registration in the registry names its hotkey
(``Registry.live_peers`` checks the signature and the binding) and the chain admits that hotkey
(``Chain.admitted``: a uid on a Bittensor subnet; on the local chain, a hotkey the operator admitted,
or a registered validator). ``HIVE_ADMISSION=open`` admits any libp2p key, as hivemind does.

The local chain's admission list, with a Redis credential that writes the run's keys::

    python -m hivetrain.admission admit HOTKEY [HOTKEY ...]
    python -m hivetrain.admission revoke HOTKEY
    python -m hivetrain.admission list
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

from hivetrain.chain import Chain, LocalChain, make_chain
from hivetrain.log import get_logger
from hivetrain.protocol.admission import ADMISSION_REFRESH_S, Admission
from hivetrain.protocol.records import Keys
from hivetrain.settings import ServiceSettings, domain_of, load_settings
from hivetrain.store import Refused, Registry, connect_redis, redacted

logger = get_logger(__name__)

#: The most registrations one reload reads (the freshest first); bound hotkeys have at most a few peers each.
MAX_ADMISSION_PEERS = 4096
#: The metagraph of a real subnet is slow to read: its admitted set is reread this often.
CHAIN_REFRESH_S = 60.0


def admitted_peers(registry: Registry, chain: Chain, limit: int = MAX_ADMISSION_PEERS) -> dict[str, str]:
    """``{peer_id: hotkey}`` of the live, bound registrations whose hotkey ``chain`` admits."""
    peers = registry.live_peers(limit=limit)
    admitted = chain.admitted({peer.hotkey for peer in peers})
    return {peer.peer_id: peer.hotkey for peer in peers if peer.hotkey in admitted}


def admission_mode(settings: ServiceSettings) -> str:
    """``settings.admission``, its default resolved: the chain's on Bittensor, open on the local chain."""
    if settings.admission:
        return settings.admission
    return "chain" if settings.chain == "bittensor" else "open"


def make_admission(settings: ServiceSettings, chain: Chain | None = None) -> Admission:
    """The admission ``settings`` ask for; ``chain`` defaults to the settings' own (Bittensor: a network call)."""
    if admission_mode(settings) == "open":
        logger.warning(
            "admission is open (HIVE_ADMISSION=open): any libp2p key joins all-reduce groups, sends parts, serves "
            "states and publishes progress, and one operator with many free keys counts as many peers. Fine for a "
            "throwaway local swarm; elsewhere admit your miners (python -m hivetrain.admission admit HOTKEY) and "
            "set HIVE_ADMISSION=chain"
        )
        return Admission.open()
    refresh_s = ADMISSION_REFRESH_S if settings.chain == "local" else CHAIN_REFRESH_S
    logger.info(f"admission: peers bound to a hotkey the {settings.chain} chain admits, reread every {refresh_s:.0f}s")
    sources: dict[int, tuple[Registry, Chain]] = {}

    def load() -> dict[str, str]:
        # each process its own connections: a forked averager child must not talk over its parent's (a Bittensor
        # websocket shared by two processes mixes their messages; redis-py reconnects after a fork by itself)
        pid = os.getpid()
        if pid not in sources:
            client = connect_redis(settings.redis_url)
            own_chain = chain if chain is not None and pid == creator else _chain_of(settings, client)
            sources[pid] = (Registry(client, Keys(settings.run_id), domain_of(settings)), own_chain)
        return admitted_peers(*sources[pid])

    creator = os.getpid()
    return Admission(load, refresh_s=refresh_s, what="the admitted peers")


def _chain_of(settings: ServiceSettings, client) -> Chain:
    bittensor = {} if settings.chain == "local" else dict(netuid=settings.netuid, network=_network(settings))
    return make_chain(settings.chain, redis_client=client, run_id=settings.run_id, **bittensor)


class HotkeyGate:
    """Whether the chain admits one hotkey (the bootstrap asks at each registration); each answer is reused for
    ``refresh_s``, so heartbeats every few seconds do not read the chain each time."""

    def __init__(self, chain: Chain, refresh_s: float = ADMISSION_REFRESH_S, max_kept: int = 10_000):
        self.chain, self.refresh_s, self.max_kept = chain, refresh_s, max_kept
        self._answers: dict[str, tuple[bool, float]] = {}  # hotkey -> (admitted, time.monotonic() asked)

    def __call__(self, hotkey: str) -> bool:
        now = time.monotonic()
        held = self._answers.get(hotkey)
        if held is not None and now - held[1] < self.refresh_s:
            return held[0]
        try:
            admitted = hotkey in self.chain.admitted({hotkey})
        except Exception as error:  # Redis or the chain (network boundaries): the peer retries at its next beat
            raise Refused(
                f"could not ask the chain whether {hotkey} is admitted: {type(error).__name__}", 503
            ) from None
        if len(self._answers) >= self.max_kept:
            self._answers.clear()
        self._answers[hotkey] = (admitted, now)
        return admitted


def registration_gate(settings: ServiceSettings) -> HotkeyGate | None:
    """What the bootstrap asks before it stores a registration: None (anyone) when admission is open."""
    if admission_mode(settings) == "open":
        return None
    chain = _chain_of(settings, connect_redis(settings.redis_url))
    return HotkeyGate(chain, ADMISSION_REFRESH_S if isinstance(chain, LocalChain) else CHAIN_REFRESH_S)


def _network(settings: ServiceSettings) -> str:
    return getattr(settings, "subtensor_network", "finney")  # a peer's setting; the bootstrap's default network


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hivetrain.admission admit|revoke|list``: the local chain's admission list."""
    parser = argparse.ArgumentParser(
        prog="python -m hivetrain.admission",
        description="Admit hotkeys to a local-chain swarm's training (HIVE_ADMISSION=chain), take them back, list "
        "them. Reads HIVE_REDIS_URL (a credential that writes the run's keys: the admin's, not a miner's) and "
        "HIVE_RUN_ID.",
    )
    parser.add_argument("action", choices=("admit", "revoke", "list"))
    parser.add_argument("hotkeys", nargs="*", help="ss58 addresses (admit, revoke)")
    args = parser.parse_args(argv)
    settings = load_settings(ServiceSettings, [])
    if settings.chain != "local":
        parser.error("on a Bittensor subnet the chain admits: a hotkey is admitted by registering it (btcli)")
    if args.action != "list" and not args.hotkeys:
        parser.error(f"{args.action} needs at least one hotkey")
    chain = LocalChain(connect_redis(settings.redis_url), settings.run_id)
    if args.action == "admit":
        for hotkey in args.hotkeys:
            chain.admit(hotkey)
        print(f"admitted {len(args.hotkeys)} hotkey(s) to run {settings.run_id} at {redacted(settings.redis_url)}")
    elif args.action == "revoke":
        for hotkey in args.hotkeys:
            print(f"{hotkey}: {'revoked' if chain.revoke(hotkey) else 'was not admitted'}")
    else:
        for hotkey, at in sorted(chain.admitted_hotkeys().items(), key=lambda item: item[1]):
            print(hotkey)
    return 0


if __name__ == "__main__":
    sys.exit(main())
