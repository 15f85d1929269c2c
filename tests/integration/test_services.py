"""The bootstrap and the validator as real services: each keeps its API up when its gunicorn child dies.

One swarm (Redis, the bootstrap, the validator, no miners) for the module. A test SIGKILLs a
service's gunicorn master (what the OOM killer does); the service must start a new one that answers
``/healthz`` while the service itself keeps running, and must still stop cleanly (exit 0) afterwards.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import requests
from swarm_helpers import stop_and_check, wait_until

from hivetrain.settings import SwarmSettings
from hivetrain.swarm import procs
from hivetrain.swarm.launcher import Swarm

pytestmark = pytest.mark.integration

TEST_ENV = {"HIVE_TORCH_THREADS": "1", "HIVE_API_WORKERS": "1", "HIVE_HTTP_WORKERS": "1"}
RESTART_TIMEOUT_S = 60.0


def _gunicorn_child(service: procs.Service) -> int | None:
    """The pid of the gunicorn master that ``service`` started (None while it has none)."""
    for pid in procs.children(service.pid):
        try:
            if b"gunicorn" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    return None


def _healthz(url: str) -> bool:
    try:
        response = requests.get(f"{url}/healthz", timeout=5)
    except requests.RequestException:
        return False
    return response.status_code == 200 and response.json() == {"status": "ok"}


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("services")
    settings = SwarmSettings(
        miners=0,
        workdir=str(workdir),
        preset="tiny",
        bootstrap_port=0,
        validator_port=0,
        run_id="services",
        stop_timeout=45,
    )
    swarm = Swarm(settings, extra_env=TEST_ENV)
    try:
        swarm.start()
        yield swarm
    finally:
        stop_and_check(swarm)
    # a service that restarted its API still stops cleanly
    assert (swarm.bootstrap.popen.returncode, swarm.validator.popen.returncode) == (0, 0)


def _kill_api_and_wait_for_a_new_one(service: procs.Service, url: str) -> None:
    old = wait_until(
        lambda: _gunicorn_child(service), timeout=RESTART_TIMEOUT_S, what=f"{service.name}'s gunicorn", interval=0.2
    )
    workers = procs.children(old)
    assert workers, f"{service.name}'s gunicorn (pid {old}) should have a worker"
    os.kill(old, signal.SIGKILL)
    new = wait_until(
        lambda: (pid := _gunicorn_child(service)) not in (None, old) and pid,
        timeout=RESTART_TIMEOUT_S,
        what=f"a new gunicorn under {service.name}",
        interval=0.2,
    )
    # the dead master's orphaned workers hold the socket until they notice; once they are gone, only the new one answers
    wait_until(
        lambda: not any(procs.is_running(pid) for pid in workers),
        timeout=RESTART_TIMEOUT_S,
        what=f"the workers of the killed gunicorn {old} to exit",
        interval=0.2,
    )
    wait_until(
        lambda: _healthz(url), timeout=RESTART_TIMEOUT_S, what=f"{url}/healthz from gunicorn {new}", interval=0.2
    )
    assert _gunicorn_child(service) == new and service.alive()
    assert "restarting it" in service.log_path.read_text(errors="replace")


def test_the_validator_restarts_its_api(swarm):
    _kill_api_and_wait_for_a_new_one(swarm.validator, swarm.validator_url)


def test_the_bootstrap_restarts_its_api(swarm):
    _kill_api_and_wait_for_a_new_one(swarm.bootstrap, swarm.bootstrap_url)
    peers = wait_until(
        lambda: requests.get(f"{swarm.bootstrap_url}/initial_peers", timeout=10).json()["initial_peers"],
        timeout=RESTART_TIMEOUT_S,
        what="initial peers from the restarted API",
    )
    assert peers
