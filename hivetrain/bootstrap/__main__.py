"""``python -m hivetrain.bootstrap``: the DHT peer in this process, the HTTP API in a gunicorn child.

Process tree: this process (supervisor + the thread that publishes the DHT's addresses) forks
the hivemind DHT (which runs p2pd) and starts ``python -m gunicorn ... 'hivetrain.bootstrap.app:create_app()'``
with the settings passed as ``HIVE_*`` environment variables. SIGTERM or SIGINT: stop gunicorn,
remove the bootstrap record, shut the DHT and p2pd down, exit 0. If gunicorn or the DHT dies on
its own, the rest is stopped the same way and the exit code is 1, so an orchestrator restarts us.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading

from hivetrain.dht import reset_signal_handlers_in_children
from hivetrain.logging import get_logger
from hivetrain.settings import BootstrapSettings, load_settings

logger = get_logger("hivetrain.bootstrap")  # __name__ is "__main__" under -m

APP_SPEC = "hivetrain.bootstrap.app:create_app()"
GUNICORN_STOP_TIMEOUT_S = 10.0
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
        gunicorn = start_gunicorn(settings)
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


def gunicorn_argv(settings: BootstrapSettings) -> list[str]:
    """The command line that serves the app."""
    host = f"[{settings.http_host}]" if ":" in settings.http_host else settings.http_host
    argv = [sys.executable, "-m", "gunicorn", "--bind", f"{host}:{settings.http_port}",
            "--workers", str(settings.http_workers), "--worker-class", "gthread", "--threads", "4",
            "--graceful-timeout", "5", "--timeout", "30", "--no-control-socket", "--log-level", settings.log_level.lower()]
    if os.path.isdir("/dev/shm"):  # worker heartbeats off disk-backed /tmp (containers)
        argv += ["--worker-tmp-dir", "/dev/shm"]
    return argv + [APP_SPEC]


def settings_env(settings: BootstrapSettings) -> dict[str, str]:
    """``settings`` as the ``HIVE_*`` variables create_app() reads, so flags reach the workers too."""
    prefix = BootstrapSettings.model_config["env_prefix"]
    env = {key: value for key, value in os.environ.items() if not key.startswith(prefix)}
    for name, value in settings.model_dump(mode="json").items():
        env[f"{prefix}{name}".upper()] = value if isinstance(value, str) else json.dumps(value)
    return env


def start_gunicorn(settings: BootstrapSettings) -> subprocess.Popen:
    """Start gunicorn in our process group, so stopping the group stops it too."""
    argv = gunicorn_argv(settings)
    popen = subprocess.Popen(argv, env=settings_env(settings), stdin=subprocess.DEVNULL)
    logger.info(f"serving http://{argv[4]}/initial_peers with gunicorn (pid {popen.pid}, {settings.http_workers} workers)")
    return popen


def stop_gunicorn(popen: subprocess.Popen | None) -> None:
    """SIGTERM (graceful: workers finish their requests), then SIGKILL after GUNICORN_STOP_TIMEOUT_S."""
    if popen is None or popen.poll() is not None:
        return
    popen.terminate()
    try:
        popen.wait(GUNICORN_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        logger.warning(f"gunicorn ignored SIGTERM for {GUNICORN_STOP_TIMEOUT_S:.0f}s; killing it")
        popen.kill()
        popen.wait()


if __name__ == "__main__":
    main()
