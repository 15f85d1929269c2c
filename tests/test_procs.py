"""Process groups and tags: what a stopped service leaves running (nothing), with real processes."""

from __future__ import annotations

import sys
import time

import pytest

from hivetrain import procs

# a service whose descendant leaves its session, as torch_shm_manager does
SPAWNS_A_DAEMON = """
import subprocess, sys, time
daemon = subprocess.Popen(["sleep", "300"], start_new_session=True)
open(sys.argv[1], "w").write(str(daemon.pid))
time.sleep(300)
"""


def _daemon_pid(path, service) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return int(path.read_text())
        assert service.alive(), "the service died before starting its daemon"
        time.sleep(0.05)
    pytest.fail("the service did not start its daemon")


@pytest.mark.parametrize("crash_first", [False, True], ids=["stopped", "sigkilled-then-stopped"])
def test_stop_leaves_no_descendant_even_one_that_left_the_session(tmp_path, crash_first):
    pid_file = tmp_path / "daemon.pid"
    service = procs.start("spawner", [sys.executable, "-c", SPAWNS_A_DAEMON, str(pid_file)], log_path=tmp_path / "log")
    daemon = _daemon_pid(pid_file, service)
    assert procs.stat_fields(daemon)[2] != str(service.pid), "the daemon must be outside the service's group"
    assert set(procs.tagged(service.tag)) == {service.pid, daemon}
    if crash_first:
        service.kill()  # the parent dies; the daemon is reparented and keeps running
        assert procs.is_running(daemon)
    service.stop(timeout=5)
    assert not procs.is_running(daemon), "the daemon outlived its service"
    assert procs.tagged(service.tag) == []
