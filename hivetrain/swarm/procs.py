"""Start and stop service processes as process groups, the way hivemind needs it.

A hivemind service forks children (the DHT, two averagers) and runs ``p2pd``. SIGTERM to the
whole group kills p2pd first and breaks the shutdown, and SIGKILL to the parent alone leaves the
children orphaned. So: start each service in its own session, SIGTERM the parent only, wait,
then SIGKILL whatever is left of the group.

Some descendants leave the group: torch's ``torch_shm_manager`` (shared-memory tensors between a
miner and its averagers) calls ``setsid`` and outlives the service. Every process started here
carries ``HIVETRAIN_PROC_TAG`` in its environment, which descendants inherit whatever their
session or parent, so ``stop`` also kills the tagged processes outside the group. It kills the
shared-memory manager last: the manager unlinks the segments (``/dev/shm/torch_*``) of clients that died
without freeing them, 2 s after its last client has gone; killed before that, it leaks them (12 GB
of them after a day of test runs on one machine).
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from hivetrain.log import get_logger

logger = get_logger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the usual race applies; callers retry on bind errors)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class Service:
    """A process started in its own session (so its pid is its process group id)."""

    name: str
    popen: subprocess.Popen
    log_path: Path | None = None
    tag: str = ""
    _log_file: object = field(default=None, repr=False)
    _terminated: bool = field(default=False, repr=False)
    _members: list[int] = field(default_factory=list, repr=False)  # its processes when it was asked to stop

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def group_alive(self) -> bool:
        """True while any process of the group is left (children outlive a SIGKILLed parent)."""
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return _group_has_live_members(self.pid)

    def kill(self) -> None:
        """SIGKILL the parent alone: what a crash looks like to the rest of the swarm."""
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait()

    def terminate(self) -> None:
        """SIGTERM the parent once (a second SIGTERM may mean 'hurry' to the service)."""
        if self.alive() and not self._terminated:
            self.popen.send_signal(signal.SIGTERM)
            self._terminated = True

    def stop(self, timeout: float = 45.0) -> int | None:
        """SIGTERM the parent, wait up to ``timeout`` s, then SIGKILL the whole group; then let torch's
        shared-memory manager clean up and kill what is left of the tagged descendants. Returns the exit code."""
        self._end(timeout)
        if self.tag:
            let_shm_managers_finish([self.tag])
        return self._reap()

    def _end(self, timeout: float) -> None:
        """The parent asked to stop, waited for, and its group killed."""
        if self.tag:
            self._members = sorted({self.pid, *tagged(self.tag)})
        if self.alive():
            self.terminate()
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning(f"{self.name} (pid {self.pid}) ignored SIGTERM for {timeout:.0f}s; killing its group")
        kill_group(self.pid)

    def _reap(self) -> int | None:
        """Kill the tagged descendants left outside the group, close the log; the exit code."""
        if self.tag:
            kill_tagged(self.tag)
            if leaked := remove_segments_of(self._members):
                logger.warning(f"{self.name}: removed {len(leaked)} shared-memory segments its processes left behind")
                LEAKED_SEGMENTS.extend(leaked)
        self.popen.wait()
        if self._log_file is not None:
            self._log_file.close()
        return self.popen.returncode


def stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: state, ppid, pgrp, ... ([] once the process is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat[stat.rindex(")") + 2 :].split()  # after the ')' that closes the command name


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def is_running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    fields = stat_fields(pid)
    return bool(fields) and fields[0] != "Z"


def children(pid: int) -> list[int]:
    """The running processes whose parent is ``pid``."""
    return [child for child in _pids() if stat_fields(child)[1:2] == [str(pid)] and is_running(child)]


def _group_has_live_members(pgid: int) -> bool:
    """Whether /proc lists a non-zombie process in group ``pgid``."""
    return any((fields := stat_fields(pid))[2:3] == [str(pgid)] and fields[0] != "Z" for pid in _pids())


def kill_group(pgid: int, wait_s: float = 5.0) -> None:
    """SIGKILL every process of group ``pgid`` and wait until none is left (or ``wait_s`` passes)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + wait_s
    while _group_has_live_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)


#: The environment variable that marks every process a Service started, and all their descendants.
TAG_VARIABLE = "HIVETRAIN_PROC_TAG"
_started = itertools.count()


def tagged(prefix: str) -> list[int]:
    """Running processes whose ``HIVETRAIN_PROC_TAG`` starts with ``prefix`` (a whole tag, or ``f"{pid}-"``
    for everything process ``pid`` started)."""
    wanted = f"{TAG_VARIABLE}={prefix}".encode()
    found = []
    for pid in _pids():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if any(item.startswith(wanted) for item in environ.split(b"\0")) and is_running(pid):
            found.append(pid)
    return found


def kill_tagged(prefix: str, wait_s: float = 5.0) -> list[int]:
    """SIGKILL every process tagged ``prefix`` (see ``tagged``) and wait for them; returns the pids killed."""
    pids = [pid for pid in tagged(prefix) if pid != os.getpid()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + wait_s
    while any(is_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


#: torch's shared-memory manager as /proc/<pid>/comm names it (cut to 15 characters).
SHM_MANAGER_COMM = "torch_shm_manag"
#: How long to let the managers clean up: libshm's manager exits 2 s after its last client goes.
SHM_MANAGER_GRACE_S = 5.0


def let_shm_managers_finish(prefixes: list[str], wait_s: float = SHM_MANAGER_GRACE_S) -> None:
    """Wait (at most ``wait_s``) until the ``torch_shm_manager`` processes tagged with one of ``prefixes``
    have exited by themselves, unlinking the shared-memory segments their dead clients left behind."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and any(
        _command_name(pid) == SHM_MANAGER_COMM for prefix in prefixes for pid in tagged(prefix)
    ):
        time.sleep(0.1)


#: Segments ``remove_segments_of`` had to remove in this process (the test suite asserts there are none).
LEAKED_SEGMENTS: list[str] = []


def remove_segments_of(pids: list[int]) -> list[str]:
    """Remove the torch segments made by ``pids`` once they are all gone (torch names each
    ``/dev/shm/torch_<pid>_<random>_<n>`` after its maker); the names removed."""
    if any(is_running(pid) for pid in pids):
        return []
    removed = []
    for pid in pids:
        for path in Path("/dev/shm").glob(f"torch_{pid}_*"):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def _command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def start(
    name: str,
    argv: list[str],
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
    cwd: str | Path | None = None,
) -> Service:
    """Start ``argv`` in a new session, its stdout and stderr appended to ``log_path`` (or inherited).

    The process and its descendants are tagged ``<our pid>-<n>-<name>`` (``TAG_VARIABLE``).
    """
    tag = f"{os.getpid()}-{next(_started)}-{name}"
    env = {**(os.environ if env is None else env), TAG_VARIABLE: tag}
    log_file = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "ab")
    popen = subprocess.Popen(
        argv,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=log_file if log_file else None,
        stderr=subprocess.STDOUT if log_file else None,
        start_new_session=True,
    )
    logger.info(f"started {name} (pid {popen.pid})" + (f", log {log_path}" if log_path else ""))
    return Service(name=name, popen=popen, log_path=log_path, tag=tag, _log_file=log_file)


def stop_all(services: list[Service], timeout: float = 45.0) -> None:
    """Stop services in reverse start order, SIGTERMing all parents first so they shut down in parallel."""
    for service in reversed(services):
        service.terminate()
    deadline = time.monotonic() + timeout
    for service in reversed(services):
        service._end(timeout=max(0.1, deadline - time.monotonic()))
    let_shm_managers_finish([service.tag for service in services if service.tag])
    for service in reversed(services):
        service._reap()
