"""The bootstrap's long-lived hivemind DHT peer, publishing its own addresses and the run's shard salt to Redis.

The DHT keeps its libp2p identity in ``settings.identity_path``, so miners that cached its
multiaddr still reach it after a restart. Redis outages never stop the DHT: publishing is
retried with backoff and the record (which expires after BOOTSTRAP_TTL_S) comes back on recovery.
The shard salt (``hivetrain.store.shard_salt``) is created at the first publish if the run has
none, then kept: every publish puts the same salt back if a flush removed it or junk replaced it.
"""

from __future__ import annotations

import threading
from typing import Protocol

from hivetrain.dht import make_dht, visible_maddrs
from hivetrain.log import get_logger
from hivetrain.protocol.records import BOOTSTRAP_TTL_S, BootstrapRecord, Keys
from hivetrain.settings import BootstrapSettings, domain_of
from hivetrain.store import Registry, connect_redis, shard_salt

logger = get_logger(__name__)

#: Publish this often: several times per TTL, so a missed write or two never drops the record.
PUBLISH_INTERVAL_S = BOOTSTRAP_TTL_S / 6


class StopEvent(Protocol):
    """``threading.Event`` or ``multiprocessing.Event``."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


def run_dht_peer(settings: BootstrapSettings, stop_event: StopEvent, interval_s: float = PUBLISH_INTERVAL_S) -> None:
    """Run the DHT and publish its BootstrapRecord until ``stop_event`` is set.

    Returns after removing the record and shutting the DHT (and its p2pd) down. Raises
    ``RuntimeError`` if the DHT process dies on its own, so the service can exit non-zero.
    Call it in a process that has not initialised CUDA: hivemind forks the DHT from it.
    """
    dht = make_dht(**settings.dht_options())
    registry = Registry(connect_redis(settings.redis_url), Keys(settings.run_id), domain_of(settings))
    peer_id = str(dht.peer_id)
    try:
        logger.info(f"DHT peer {peer_id} is up; multiaddrs: {' '.join(visible_maddrs(dht)) or '(none)'}")
        publish_until_stopped(dht, registry, peer_id, stop_event, interval_s)
    finally:
        _withdraw(registry, peer_id)
        dht.shutdown()
        registry.client.close()
        logger.info(f"DHT peer {peer_id} shut down")


def publish_until_stopped(dht, registry: Registry, peer_id: str, stop_event: StopEvent, interval_s: float) -> None:
    """Refresh ``peer_id``'s BootstrapRecord and the run's shard salt every ``interval_s``; on failure retry
    with backoff (0.5 s doubling up to ``interval_s``)."""
    backoff, failing, salt = 0.5, False, None
    while not stop_event.is_set():
        if not dht.is_alive():
            raise RuntimeError(f"the DHT process died (exit code {dht.exitcode}); see the log above")
        try:
            # the salt we hold goes back if it is missing: miners and validators keep the shards they have
            current = shard_salt(registry.client, registry.keys, create=True, new_salt=salt)
            if salt is not None and current != salt:
                logger.warning(
                    f"the run's shard salt at {registry.keys.shard_salt} was replaced ({salt} -> {current}): "
                    "miners started from now on read other shards than validators that hold the old one"
                )
            salt = current
            registry.set_bootstrap(BootstrapRecord(peer_id=peer_id, multiaddrs=visible_maddrs(dht)))
        except Exception:  # network boundary (Redis, the DHT pipe): log, back off, keep the DHT up
            if not failing:
                logger.exception(f"publishing the bootstrap record failed; retrying every <= {interval_s:.0f}s")
            else:
                logger.warning(f"publishing the bootstrap record still fails; retrying in {backoff:.1f}s")
            failing = True
            stop_event.wait(backoff)
            backoff = min(backoff * 2, interval_s)
            continue
        if failing:
            logger.info("bootstrap record published again")
        backoff, failing = 0.5, False
        stop_event.wait(interval_s)


def _withdraw(registry: Registry, peer_id: str) -> None:
    """Remove our record so /initial_peers stops handing out a bootstrap that is going away."""
    try:
        registry.remove_bootstrap(peer_id)
    except Exception:  # network boundary: the record expires on its own after BOOTSTRAP_TTL_S
        logger.warning(
            f"could not remove the bootstrap record of {peer_id}; it expires within {BOOTSTRAP_TTL_S}s", exc_info=True
        )


def start_peer_thread(settings: BootstrapSettings, stop_event: threading.Event) -> "PeerThread":
    """Run :func:`run_dht_peer` in a thread of this process (hivemind forks the DHT from here)."""
    thread = PeerThread(settings, stop_event)
    thread.start()
    return thread


class PeerThread(threading.Thread):
    """A thread running :func:`run_dht_peer`; ``error`` holds what made it stop early, if anything."""

    def __init__(self, settings: BootstrapSettings, stop_event: threading.Event):
        super().__init__(name="dht-peer", daemon=True)
        self.settings, self.stop_event = settings, stop_event
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            run_dht_peer(self.settings, self.stop_event)
        except BaseException as error:  # reported by the supervisor, which exits non-zero
            self.error = error
            logger.exception("the DHT peer stopped with an error")
