"""Shared fixtures: a real redis-server on a free port, torn down after the test; wallets, and the validator API's
wallet folder and hotkey; real HTTP servers (tests/post_server.py) stopped after the test; a check that nothing is
left running."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis

from hivetrain.swarm import procs
from hivetrain.swarm.redis_server import start_redis


@pytest.fixture(scope="session", autouse=True)
def nothing_left_running():
    """At the very end: every process the tests started through ``hivetrain.swarm.procs`` is gone, with its
    descendants (p2pd, gunicorn, torch_shm_manager, which leaves its session), and no shared-memory segment
    of theirs had to be removed from /dev/shm. Leftovers are killed, then named."""
    yield
    ours = f"{os.getpid()}-"
    leftovers = {pid: _command(pid) for pid in procs.tagged(ours)}
    procs.kill_tagged(ours)
    assert not leftovers, f"processes left running by the tests: {leftovers}"
    assert not procs.LEAKED_SEGMENTS, (
        f"{len(procs.LEAKED_SEGMENTS)} shared-memory segments outlived the services "
        f"that made them, e.g. {procs.LEAKED_SEGMENTS[:3]}"
    )


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server for the whole session; yields its URL."""
    service, url = start_redis(tmp_path_factory.mktemp("redis"), persist=False)
    try:
        yield url
    finally:
        service.stop(timeout=5)


@pytest.fixture
def redis_url(redis_server):
    """The session Redis, emptied before each test."""
    client = redis.Redis.from_url(redis_server)
    client.flushall()
    client.close()
    return redis_server


@pytest.fixture(scope="session")
def wallet(tmp_path_factory):
    """An unencrypted bittensor wallet (sr25519 hotkey) made offline for the session."""
    from hivetrain.identity import load_or_create_wallet

    return load_or_create_wallet(str(tmp_path_factory.mktemp("wallets")), "test")


@pytest.fixture(scope="session")
def other_wallet(tmp_path_factory):
    """A second wallet: another peer, or an impostor."""
    from hivetrain.identity import load_or_create_wallet

    return load_or_create_wallet(str(tmp_path_factory.mktemp("wallets2")), "other")


@pytest.fixture(scope="module")
def wallet_dir(tmp_path_factory) -> str:
    """A wallet folder for the validator's API, one per test module: create_app() finds its wallet there."""
    return str(tmp_path_factory.mktemp("validator-wallets"))


@pytest.fixture(scope="module")
def hotkey(wallet_dir) -> str:
    """The validator's own hotkey, as create_app() will find it under wallet_dir."""
    from hivetrain.identity import load_or_create_wallet

    return load_or_create_wallet(wallet_dir, "validator").hotkey.ss58_address


@pytest.fixture
def start_server():
    """``start_server(kind, *args, **kwargs)``: a real HTTP server of ``kind`` (a tests/post_server.py PostServer),
    stopped after the test."""
    started = []

    def start(kind, *args, **kwargs):
        started.append(kind(*args, **kwargs))
        return started[-1]

    yield start
    for server in started:
        server.stop()
