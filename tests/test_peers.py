"""Initial peers over real HTTP: retries with backoff, a clear error when the bootstrap never answers."""

from __future__ import annotations

import threading

import pytest
from flask import Flask, jsonify
from werkzeug.serving import make_server

from hivetrain.discovery import BootstrapUnavailable, fetch_initial_peers
from hivetrain.swarm import procs


@pytest.fixture
def bootstrap():
    """A stand-in bootstrap on loopback that answers empty twice, then with a peer."""
    calls = []
    app = Flask("bootstrap")

    @app.get("/initial_peers")
    def initial_peers():
        calls.append(1)
        return jsonify(initial_peers=[] if len(calls) < 3 else ["/ip4/127.0.0.1/tcp/1/p2p/QmX"])

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", calls
    server.shutdown()
    thread.join()


def test_retries_until_peers_arrive(bootstrap):
    url, calls = bootstrap
    assert fetch_initial_peers(url, wait_s=20, first_delay_s=0.05) == ["/ip4/127.0.0.1/tcp/1/p2p/QmX"]
    assert len(calls) == 3


def test_gives_up_with_the_url_and_the_fix():
    url = f"http://127.0.0.1:{procs.free_port()}"
    with pytest.raises(BootstrapUnavailable, match="HIVE_BOOTSTRAP_URL") as error:
        fetch_initial_peers(url, wait_s=0.5, first_delay_s=0.05)
    assert url in str(error.value)


def test_stop_event_ends_the_wait():
    stop = threading.Event()
    stop.set()
    with pytest.raises(BootstrapUnavailable):
        fetch_initial_peers(f"http://127.0.0.1:{procs.free_port()}", wait_s=60, stop=stop)
