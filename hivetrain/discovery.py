"""Finding the swarm: initial peers from the bootstrap's HTTP API, and the run's shard salt once it is published.

Both wait, with backoff and a deadline, for a bootstrap that may still be starting; both raise
``BootstrapUnavailable`` (the runtime's exit code 2) naming what to check when it never shows.
"""

from __future__ import annotations

import threading
import time

import redis
import requests

from hivetrain.log import get_logger
from hivetrain.protocol.records import Keys
from hivetrain.store import shard_salt

logger = get_logger(__name__)


class BootstrapUnavailable(RuntimeError):
    """The bootstrap never gave us peers to dial."""


def fetch_initial_peers(
    bootstrap_url: str,
    wait_s: float = 120.0,
    stop: threading.Event | None = None,
    first_delay_s: float = 0.5,
    max_delay_s: float = 10.0,
) -> list[str]:
    """GET ``/initial_peers`` until it lists at least one multiaddr, with exponential backoff.

    Raises ``BootstrapUnavailable`` after ``wait_s`` seconds, naming the URL and the last failure.
    """
    url = f"{bootstrap_url.rstrip('/')}/initial_peers"
    deadline = time.monotonic() + wait_s
    delay, attempt, last_error = first_delay_s, 0, "no attempt"
    while True:
        attempt += 1
        try:
            response = requests.get(url, timeout=min(10.0, max(1.0, wait_s)))
            if response.status_code == 200:
                peers = response.json().get("initial_peers", [])
                if isinstance(peers, list) and peers and all(isinstance(p, str) for p in peers):
                    logger.info(f"bootstrap {url} gave {len(peers)} initial peers")
                    return peers
                last_error = "it answered with no peers yet (is its DHT up? see its /readyz)"
            else:
                last_error = f"HTTP {response.status_code}: {response.text[:200]}"
        except (requests.RequestException, ValueError) as error:
            last_error = repr(error)
        remaining = deadline - time.monotonic()
        if remaining <= 0 or (stop is not None and stop.is_set()):
            raise BootstrapUnavailable(
                f"no initial peers from {url} after {attempt} attempts in {wait_s:.0f}s; last: {last_error}. "
                "Check that the bootstrap runs and HIVE_BOOTSTRAP_URL points at it, or set HIVE_INITIAL_PEERS"
            )
        logger.info(f"waiting for the bootstrap at {url} (attempt {attempt}: {last_error}); retrying in {delay:.1f}s")
        if stop is not None:
            if stop.wait(min(delay, remaining)):
                continue
        else:
            time.sleep(min(delay, remaining))
        delay = min(delay * 2, max_delay_s)


def wait_for_shard_salt(
    client: redis.Redis, keys: Keys, wait_s: float, stop: threading.Event | None = None, poll_s: float = 1.0
) -> str:
    """The run's shard salt, read every ``poll_s`` until the bootstrap (or a validator) has published it.

    Redis errors count as not published yet. Raises ``BootstrapUnavailable`` after ``wait_s`` seconds,
    or when ``stop`` is set, saying what to check.
    """
    deadline, waiting, last = time.monotonic() + wait_s, False, "nothing there"
    stop = stop or threading.Event()
    while True:
        try:
            salt = shard_salt(client, keys, create=False)
            last = "nothing there, or junk (see the warnings above)"
        except redis.RedisError as error:  # Redis boundary: unreachable is the same as not published yet
            salt, last = None, f"Redis: {type(error).__name__}: {error}"
        if salt is not None:
            return salt
        remaining = deadline - time.monotonic()
        if remaining <= 0 or stop.is_set():
            raise BootstrapUnavailable(
                f"no shard salt at {keys.shard_salt} after {wait_s:.0f}s ({last}). The bootstrap publishes it when it "
                "starts: check that it runs with this HIVE_REDIS_URL and HIVE_RUN_ID, or wait longer with "
                "HIVE_BOOTSTRAP_WAIT_S"
            )
        if not waiting:
            logger.info(
                f"waiting for the bootstrap to publish the run's shard salt at {keys.shard_salt} (up to {wait_s:.0f}s)"
            )
            waiting = True
        stop.wait(min(poll_s, remaining))
