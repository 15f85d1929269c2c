"""``python -m hivetrain.bootstrap``: the DHT peer in this process, the HTTP API in a gunicorn child.

Process tree: this process (supervisor + the thread that publishes the DHT's addresses) forks
the hivemind DHT (which runs p2pd) and starts ``python -m gunicorn ... 'hivetrain.bootstrap.app:create_app()'``
with the settings passed as ``HIVE_*`` environment variables. SIGTERM or SIGINT: stop gunicorn,
remove the bootstrap record, shut the DHT and p2pd down, exit 0. If gunicorn or the DHT dies on
its own, the rest is stopped the same way and the exit code is 1, so an orchestrator restarts us.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import threading

from hivetrain.dht import reset_signal_handlers_in_children
from hivetrain.gunicorn import start_gunicorn, stop_gunicorn
from hivetrain.log import get_logger
from hivetrain.settings import BootstrapSettings, load_settings

logger = get_logger("hivetrain.bootstrap")  # __name__ is "__main__" under -m

APP_SPEC = "hivetrain.bootstrap.app:create_app()"
PEER_STOP_TIMEOUT_S = 20.0


def main(argv: list[str] | None = None) -> None:
    """Parse settings, run the DHT peer and gunicorn until a signal or a failure, then stop both."""
    from hivetrain.bootstrap.peer import start_peer_thread  # imports hivemind: only when we run

    settings = load_settings(BootstrapSettings, argv)
    logging.getLogger("hivetrain").setLevel(settings.log_level)
    stop, peer_stop = threading.Event(), threading.Event()
    _stop_on_signals(stop)
    reset_signal_handlers_in_children()  # the forked DHT must not inherit our handlers
    gunicorn, peer, failed = None, None, True
    try:
        gunicorn = start_gunicorn(APP_SPEC, settings, settings.http_host, settings.http_port, settings.http_workers)
        peer = start_peer_thread(settings, peer_stop)
        failed = _supervise(stop, gunicorn, peer)
    finally:
        # gunicorn first (no more answers naming us), then the record and the DHT
        stop_gunicorn(gunicorn)
        peer_stop.set()
        if peer is not None:
            peer.join(PEER_STOP_TIMEOUT_S)
            if peer.is_alive():
                logger.error(f"the DHT peer did not stop within {PEER_STOP_TIMEOUT_S:.0f}s")
                failed = True
    if failed:
        raise SystemExit(1)
    logger.info("bootstrap stopped cleanly")


def _stop_on_signals(stop: threading.Event) -> None:
    def _handler(signum, _frame):
        logger.info(f"{signal.Signals(signum).name} received; shutting down")
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)


def _supervise(stop: threading.Event, gunicorn: subprocess.Popen, peer) -> bool:
    """Wait for a stop signal; True when a child failed first."""
    while not stop.wait(0.5):
        if gunicorn.poll() is not None:
            logger.error(f"gunicorn exited with code {gunicorn.returncode}; stopping the bootstrap")
            return True
        if not peer.is_alive():
            logger.error(f"the DHT peer stopped ({peer.error!r}); stopping the bootstrap")
            return True
    return False


if __name__ == "__main__":
    main()
