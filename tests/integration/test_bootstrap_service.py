"""``python -m hivetrain.bootstrap`` as a real process: readiness, a DHT that peers can use, restarts, clean stops,
exit 1 when its API cannot come up (the runtime's gunicorn restarts run out)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import hivemind
import pytest
from hivemind.utils import get_dht_time

from hivetrain.identity import Domain
from hivetrain.protocol.records import Keys
from hivetrain.runtime import RESTART_LIMIT
from hivetrain.store import Registry, connect_redis
from hivetrain.swarm import procs

pytestmark = pytest.mark.integration

READY_TIMEOUT_S = 90.0
#: gunicorn tries to bind for ~5 s before it exits; RESTART_LIMIT + 1 of those, plus the DHT's start and stop
GIVE_UP_TIMEOUT_S = 180.0


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _start(tmp_path: Path, redis_url: str, http_port: int, dht_port: int) -> procs.Service:
    env = {
        **os.environ,
        "HIVE_REDIS_URL": redis_url,
        "HIVE_RUN_ID": "it",
        "HIVE_HTTP_HOST": "127.0.0.1",
        "HIVE_HTTP_PORT": str(http_port),
        "HIVE_HTTP_WORKERS": "1",
        "HIVE_IDENTITY_PATH": str(tmp_path / "bootstrap.id"),
        "HIVE_HOST_MADDRS": json.dumps([f"/ip4/127.0.0.1/tcp/{dht_port}"]),
    }
    return procs.start(
        "bootstrap", [sys.executable, "-m", "hivetrain.bootstrap"], env=env, log_path=tmp_path / "bootstrap.log"
    )


def _wait_ready(service: procs.Service, base: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        assert service.alive(), f"bootstrap exited early:\n{service.log_path.read_text()[-3000:]}"
        try:
            if _get(f"{base}/readyz")[0] == 200:
                return
        except (OSError, ValueError):  # not listening yet
            pass
        time.sleep(0.25)
    pytest.fail(f"bootstrap not ready after {READY_TIMEOUT_S:.0f}s:\n{service.log_path.read_text()[-3000:]}")


def _p2pd_pids(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[2]) == pgid and b"p2pd" in cmd:
            pids.append(int(entry.name))
    return pids


def _stop_and_check(service: procs.Service) -> None:
    p2pds = _p2pd_pids(service.pid)
    assert p2pds, "the bootstrap's p2pd should run in its process group"
    assert service.stop(timeout=30) == 0, service.log_path.read_text()[-3000:]
    assert not service.group_alive()
    assert not [pid for pid in p2pds if Path(f"/proc/{pid}").exists()]


def _peer_id(addrs: list[str]) -> str:
    return addrs[0].rsplit("/p2p/", 1)[1]


def test_bootstrap_serves_a_usable_dht_and_keeps_its_identity(tmp_path, redis_url):
    http_port, dht_port = procs.free_port(), procs.free_port()
    base = f"http://127.0.0.1:{http_port}"
    service = _start(tmp_path, redis_url, http_port, dht_port)
    dhts: list[hivemind.DHT] = []
    try:
        _wait_ready(service, base)
        status, body = _get(f"{base}/initial_peers")
        addrs = body["initial_peers"]
        assert status == 200 and addrs and all(f"/tcp/{dht_port}/p2p/" in a for a in addrs)
        first_id = _peer_id(addrs)
        assert _get(f"{base}/return_dht_address") == (200, body)

        for _ in range(2):  # one stores, the other reads: the value travels through the bootstrap
            dhts.append(hivemind.DHT(initial_peers=addrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True))
        assert dhts[0].store("hivetrain-it", "hello", get_dht_time() + 60)
        found = dhts[1].get("hivetrain-it", latest=True)
        assert found is not None and found.value == "hello"
        for dht in dhts:
            dht.shutdown()
        dhts.clear()

        _stop_and_check(service)
        assert Registry(connect_redis(redis_url), Keys("it"), Domain("it")).bootstraps() == []  # withdrawn on stop

        service = _start(tmp_path, redis_url, http_port, dht_port)
        _wait_ready(service, base)
        assert _peer_id(_get(f"{base}/initial_peers")[1]["initial_peers"]) == first_id
        _stop_and_check(service)
    finally:
        for dht in dhts:
            dht.shutdown()
        service.stop(timeout=10)


def test_bootstrap_exits_1_when_its_api_cannot_come_up(tmp_path, redis_url):
    # another program holds the HTTP port: every gunicorn gives up binding, the restarts run out
    http_port, dht_port = procs.free_port(), procs.free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", http_port))
        squatter.listen()
        service = _start(tmp_path, redis_url, http_port, dht_port)
        try:
            code = service.popen.wait(timeout=GIVE_UP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"bootstrap still running after {GIVE_UP_TIMEOUT_S:.0f}s:\n{service.log_path.read_text()[-3000:]}"
            )
        finally:
            service.stop(timeout=10)
    log = service.log_path.read_text()
    assert code == 1, log[-3000:]
    assert f"after {RESTART_LIMIT} restarts" in log and "giving up" in log
    assert "DHT peer" in log and "shut down" in log  # the DHT was still stopped cleanly
    assert not service.group_alive()
    assert Registry(connect_redis(redis_url), Keys("it"), Domain("it")).bootstraps() == []
