"""``python -m hivetrain.bootstrap``: the DHT peer in this process, the HTTP API in a gunicorn child.

Process tree: this process (supervisor + the thread that publishes the DHT's addresses) forks
the hivemind DHT (which runs p2pd) and starts ``python -m gunicorn ... 'hivetrain.bootstrap.app:create_app()'``
with the settings passed as ``HIVE_*`` environment variables (``hivetrain.runtime`` supervises it).
SIGTERM or SIGINT: stop gunicorn, remove the bootstrap record, shut the DHT and p2pd down, exit 0.
If gunicorn keeps dying (see ``hivetrain.runtime.RESTART_LIMIT``) or the DHT peer dies, the rest
is stopped the same way and the exit code is 1, so an orchestrator restarts us.
"""

from __future__ import annotations

import threading

from hivetrain.runtime import Runtime, run_service
from hivetrain.settings import BootstrapSettings

APP_SPEC = "hivetrain.bootstrap.app:create_app()"
PEER_STOP_TIMEOUT_S = 20.0
#: How often the body checks that the DHT peer thread still runs.
PEER_POLL_S = 0.5


def main(argv: list[str] | None = None) -> int:
    """Run the DHT peer and gunicorn until a signal or a failure, then stop both; return the exit code."""
    return run_service(BootstrapSettings, _run, argv, name="bootstrap", repeat_sigint="ignore")


def _run(runtime: Runtime[BootstrapSettings]) -> None:
    from hivetrain.bootstrap.peer import start_peer_thread  # imports hivemind: only when we run

    settings = runtime.settings
    # the runtime stops gunicorn before any cleanup: no more answers naming us, then the record and the DHT
    runtime.serve(APP_SPEC, settings.http_host, settings.http_port, settings.http_workers)
    peer_stop = threading.Event()
    peer = start_peer_thread(settings, peer_stop)
    runtime.on_cleanup(lambda: _stop_peer(runtime, peer, peer_stop))
    while not runtime.stop.wait(PEER_POLL_S):
        if not peer.is_alive():
            runtime.fail(f"the DHT peer stopped ({peer.error!r})")


def _stop_peer(runtime: Runtime, peer, peer_stop: threading.Event) -> None:
    """Withdraw the bootstrap record and shut the DHT down; a peer that does not stop fails the service."""
    peer_stop.set()
    peer.join(PEER_STOP_TIMEOUT_S)
    if peer.is_alive():
        runtime.fail(f"the DHT peer did not stop within {PEER_STOP_TIMEOUT_S:.0f}s")


if __name__ == "__main__":
    raise SystemExit(main())
