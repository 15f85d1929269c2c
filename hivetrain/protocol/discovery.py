"""Finding the swarm: initial peers from the bootstrap's HTTP API."""

from __future__ import annotations

import time
from threading import Event

import requests

from hivetrain.log import get_logger

logger = get_logger(__name__)


class BootstrapUnavailable(RuntimeError):
    """The bootstrap never gave us peers to dial."""


def fetch_initial_peers(bootstrap_url: str, wait_s: float = 120.0, stop: Event | None = None,
                        first_delay_s: float = 0.5, max_delay_s: float = 10.0) -> list[str]:
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
                "Check that the bootstrap runs and HIVE_BOOTSTRAP_URL points at it, or set HIVE_INITIAL_PEERS")
        logger.info(f"waiting for the bootstrap at {url} (attempt {attempt}: {last_error}); retrying in {delay:.1f}s")
        if stop is not None:
            if stop.wait(min(delay, remaining)):
                continue
        else:
            time.sleep(min(delay, remaining))
        delay = min(delay * 2, max_delay_s)
