"""Process groups and tags: what a stopped service leaves running (nothing), with real processes."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from hivetrain.swarm import procs

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


# a service that shares tensors the way hivemind does (the file_system strategy: torch_shm_manager
# keeps track of the segments), with a forked child holding them
SHARES_TENSORS = """
import sys, time, torch, torch.multiprocessing as mp
mp.set_sharing_strategy("file_system")
context = mp.get_context("fork")
def child(queue):
    tensors = [queue.get() for _ in range(4)]
    open(sys.argv[1], "w").write("ready")
    time.sleep(300)
if __name__ == "__main__":
    queue = context.Queue()
    tensors = [torch.zeros(1000).share_memory_() for _ in range(4)]
    context.Process(target=child, args=(queue,)).start()
    for tensor in tensors:
        queue.put(tensor)
    time.sleep(300)
"""


def _start_sharer(tmp_path) -> procs.Service:
    ready = tmp_path / "ready"
    service = procs.start("sharer", [sys.executable, "-c", SHARES_TENSORS, str(ready)], log_path=tmp_path / "log")
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert service.alive() and time.monotonic() < deadline, "the service did not share its tensors"
        time.sleep(0.1)
    return service


@pytest.mark.parametrize("crash_first", [False, True], ids=["stopped", "sigkilled-then-stopped"])
def test_stop_leaves_no_shared_memory_segment(tmp_path, crash_first):
    """Killing torch_shm_manager with its service leaked every segment of the service's processes."""
    service = _start_sharer(tmp_path)
    pids = procs.tagged(service.tag)
    assert any(procs.SHM_MANAGER_COMM in Path(f"/proc/{pid}/comm").read_text() for pid in pids)
    segments = _segments_of(pids)
    assert len(segments) >= 4, "the tensors are not in /dev/shm: the test would prove nothing"
    swept = len(procs.LEAKED_SEGMENTS)
    if crash_first:
        service.kill()  # nothing frees the segments but the manager
    service.stop(timeout=5)
    assert procs.tagged(service.tag) == []
    assert _segments_of(pids) == [], "shared-memory segments outlived their service"
    assert procs.LEAKED_SEGMENTS[swept:] == [], "the manager was killed before it could unlink them (stop swept them)"
    del procs.LEAKED_SEGMENTS[swept:]


def _segments_of(pids: list[int]) -> list[str]:
    """torch names a segment after the process that made it: /dev/shm/torch_<pid>_<random>_<n>."""
    return sorted(path.name for pid in pids for path in Path("/dev/shm").glob(f"torch_{pid}_*"))


def test_segments_whose_manager_died_too_are_swept(tmp_path):
    service = _start_sharer(tmp_path)
    pids = procs.tagged(service.tag)
    procs.kill_tagged(service.tag)  # every process at once, the manager included: nothing unlinks the segments
    leaked = _segments_of(pids)
    assert len(leaked) >= 4
    assert procs.remove_segments_of([*pids, service.pid]) != []
    assert _segments_of(pids) == []
    service.stop(timeout=5)
