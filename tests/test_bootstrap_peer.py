"""The bootstrap DHT peer's publisher: survives Redis outages, stops when the DHT dies, keeps the run's shard salt."""

from __future__ import annotations

import threading
import time

import pytest

from hivetrain.bootstrap.peer import publish_until_stopped
from hivetrain.identity import Domain
from hivetrain.protocol.records import Keys
from hivetrain.store import Registry, connect_redis, is_shard_salt, shard_salt
from hivetrain.swarm import procs
from hivetrain.swarm.redis_server import start_redis

ADDR = "/ip4/127.0.0.1/tcp/31337/p2p/QmFake"


class FakeDHT:
    client_mode = False  # the bootstrap's DHT is a full peer

    def __init__(self, alive: bool = True):
        self.alive, self.exitcode = alive, None if alive else -9

    def is_alive(self) -> bool:
        return self.alive

    def get_visible_maddrs(self) -> list[str]:
        return [ADDR]


def test_publisher_rides_out_a_redis_outage(tmp_path):
    port = procs.free_port()
    registry = Registry(connect_redis(f"redis://127.0.0.1:{port}/0", timeout=0.5), Keys("pt"), Domain("pt"))
    stop = threading.Event()
    thread = threading.Thread(
        target=publish_until_stopped, args=(FakeDHT(), registry, "QmFake", stop, 0.3), daemon=True
    )
    thread.start()
    redis_service = None
    try:
        time.sleep(0.6)  # a few failed attempts while nothing listens
        assert thread.is_alive()
        redis_service, _ = start_redis(tmp_path, port=port, persist=False)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not registry.bootstraps():
            time.sleep(0.05)
        assert [b.multiaddrs for b in registry.bootstraps()] == [[ADDR]]
    finally:
        stop.set()
        thread.join(5)
        if redis_service is not None:
            redis_service.stop(timeout=5)
    assert not thread.is_alive()


def test_publisher_raises_when_the_dht_dies(redis_url):
    registry = Registry(connect_redis(redis_url), Keys("pt"), Domain("pt"))
    with pytest.raises(RuntimeError, match="DHT process died"):
        publish_until_stopped(FakeDHT(alive=False), registry, "QmFake", threading.Event(), 0.1)


def _wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    pytest.fail("timed out")


def test_the_bootstrap_creates_the_shard_salt_and_puts_it_back(redis_url):
    """Created at the first publish if the run has none; after a flush, or junk written over it, the same
    salt comes back, so miners that start later read the shards the validators already rebuild."""
    registry = Registry(connect_redis(redis_url), Keys("pt"), Domain("pt"))
    client, key = registry.client, registry.keys.shard_salt
    stop = threading.Event()
    thread = threading.Thread(
        target=publish_until_stopped, args=(FakeDHT(), registry, "QmFake", stop, 0.1), daemon=True
    )
    thread.start()
    try:
        salt = _wait_for(lambda: client.get(key))
        assert is_shard_salt(salt.decode()) and client.ttl(key) == -1
        client.flushall()
        assert _wait_for(lambda: client.get(key)) == salt
        client.set(key, "junk")
        assert _wait_for(lambda: shard_salt(client, registry.keys, create=False)) == salt.decode()
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()


def test_a_restarted_bootstrap_keeps_the_runs_salt(redis_url):
    registry = Registry(connect_redis(redis_url), Keys("pt"), Domain("pt"))
    first = shard_salt(registry.client, registry.keys, create=True)  # e.g. the bootstrap's last run, or a validator
    stop = threading.Event()
    thread = threading.Thread(
        target=publish_until_stopped, args=(FakeDHT(), registry, "QmFake", stop, 0.1), daemon=True
    )
    thread.start()
    try:
        _wait_for(registry.bootstraps)
        assert shard_salt(registry.client, registry.keys, create=False) == first
    finally:
        stop.set()
        thread.join(5)
