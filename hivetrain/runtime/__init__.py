"""One way to run a service: settings, stop signals, supervised children, exit codes, cleanup.

Every ``python -m hivetrain.<role>`` is ``run_service(Settings, body, argv, name=...)``. The runner
loads the settings, makes SIGTERM/SIGINT set ``runtime.stop``, gives forked children the default
handlers back, calls ``body(runtime)``, and always runs the cleanup: supervised API children
first, then what the body registered with ``runtime.on_cleanup`` (last registered, first run).

Exit codes, decided here only:

* 0 — stopped cleanly (a signal, or the body returned);
* 1 — something the service supervises failed (``runtime.fail``), e.g. its gunicorn child kept
  dying; the orchestrator (compose ``restart: unless-stopped``, Kubernetes) restarts us;
* 2 — configuration error: invalid settings or an unknown flag (``ConfigError``), ``BootstrapUnavailable``,
  or a ``ValueError`` raised by the body.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Generic, Literal, TypeVar

from pydantic_settings import BaseSettings

from hivetrain.log import get_logger
from hivetrain.runtime.gunicorn import start_gunicorn, stop_gunicorn
from hivetrain.settings import ConfigError, load_settings

logger = get_logger(__name__)
S = TypeVar("S", bound=BaseSettings)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2

#: A child that exits more than this many times within RESTART_WINDOW_S is not coming back by
#: itself (a port taken, an app that cannot import): we give up and exit 1, and the orchestrator,
#: which can back off and alert, restarts the whole service instead of us looping forever.
RESTART_LIMIT = 3
RESTART_WINDOW_S = 60.0
#: How often the watcher looks at a child: a dead API is noticed within this, at no measurable cost.
POLL_INTERVAL_S = 0.5

#: What a SIGINT does once the service is stopping: "interrupt" raises KeyboardInterrupt (a person
#: pressing Ctrl-C twice wants out now); "ignore" lets the clean stop finish (a swarm stopping its
#: miners must not be cut short, or they lose their checkpoints).
RepeatSigint = Literal["interrupt", "ignore"]

_fork_reset_registered = False
_fork_reset_lock = threading.Lock()


def install_stop_handlers(
    stop: threading.Event, repeat_sigint: RepeatSigint = "interrupt", log: logging.Logger | None = None
) -> None:
    """SIGTERM/SIGINT set ``stop``; once stopping, a SIGINT does what ``repeat_sigint`` says.

    Call from the main thread (Python runs signal handlers there only).
    """
    if repeat_sigint not in ("interrupt", "ignore"):
        raise ValueError(f"repeat_sigint must be 'interrupt' or 'ignore', got {repeat_sigint!r}")
    log = log or logger

    def _handle(signum, _frame):
        name = signal.Signals(signum).name
        if stop.is_set():
            if signum == signal.SIGINT and repeat_sigint == "interrupt":
                raise KeyboardInterrupt
            log.info(f"{name} received again; already stopping cleanly")
            return
        log.info(
            f"{name} received; stopping cleanly"
            + (" (Ctrl-C again to interrupt)" if repeat_sigint == "interrupt" else "")
        )
        stop.set()

    signal.signal(signal.SIGTERM, _handle)
    signal.signal(signal.SIGINT, _handle)


def reset_signal_handlers_in_children() -> None:
    """Give processes forked from this one the default SIGTERM and an ignored SIGINT.

    hivemind forks its DHT and averagers; they would inherit our Python handlers, which set an
    event nobody in the child reads, so SIGTERM would no longer stop them. Ctrl-C reaches the
    whole terminal process group, so children ignore SIGINT and let the parent shut them down in
    order. Registered at most once per process (the registration survives fork, too).
    """
    global _fork_reset_registered
    with _fork_reset_lock:
        if _fork_reset_registered:
            return
        os.register_at_fork(after_in_child=_defaults_in_child)
        _fork_reset_registered = True


def _defaults_in_child() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its CPU affinity, capped by its cgroup's CPU quota (compose's
    ``cpus:``, a Kubernetes CPU limit), which torch's default thread count does not see: a miner
    limited to 2 CPUs on a 64-core host would otherwise run 32 threads and be throttled."""
    cpus = len(os.sched_getaffinity(0))
    quota = _cgroup_cpu_quota(cgroup)
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def _cgroup_cpu_quota(root: Path) -> float | None:
    """The CPU quota in CPUs (cgroup v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``); None if
    unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def set_torch_threads(configured: int) -> int:
    """``configured`` threads, or torch's default capped at ``usable_cpus()``; returns the number set."""
    import torch

    threads = configured or min(torch.get_num_threads(), usable_cpus())
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads


def describe_exit(returncode: int | None) -> str:
    """``'code 3'`` or ``'signal SIGKILL'`` for a ``Popen.returncode``."""
    if returncode is not None and returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"code {returncode}"


class RestartBudget:
    """At most ``limit`` restarts within any ``window_s`` seconds."""

    def __init__(self, limit: int = RESTART_LIMIT, window_s: float = RESTART_WINDOW_S):
        if limit < 0 or window_s <= 0:
            raise ValueError(f"need limit >= 0 and window_s > 0, got limit={limit}, window_s={window_s}")
        self.limit, self.window_s = limit, window_s
        self._times: deque[float] = deque()

    def spend(self, now: float | None = None) -> bool:
        """Take one restart if the window has one left; False when the budget is spent."""
        now = time.monotonic() if now is None else now
        while self._times and now - self._times[0] >= self.window_s:
            self._times.popleft()
        if len(self._times) >= self.limit:
            return False
        self._times.append(now)
        return True

    @property
    def used(self) -> int:
        """Restarts counted in the current window."""
        return len(self._times)


class SupervisedChild:
    """A child process kept running while the service runs: restarted when it exits on its own.

    A watcher thread polls it. While the service is not stopping, an exit is logged as an error
    and the child is started again, within a :class:`RestartBudget`; past the budget the runtime
    is failed (its stop event is set and the service exits 1). ``close()`` stops the watcher,
    then the child.
    """

    def __init__(
        self,
        name: str,
        start: Callable[[], subprocess.Popen],
        stop: Callable[[subprocess.Popen | None], None],
        runtime: "Runtime",
        budget: RestartBudget | None = None,
        poll_s: float = POLL_INTERVAL_S,
    ):
        self.name, self._start, self._stop, self._runtime = name, start, stop, runtime
        self._budget = budget or RestartBudget()
        self._poll_s = poll_s
        self._lock = threading.Lock()  # guards _popen between the watcher and close()
        self._closing = threading.Event()
        self._popen = start()
        self._thread = threading.Thread(target=self._watch, name=f"watch-{name}", daemon=True)
        self._thread.start()

    @property
    def popen(self) -> subprocess.Popen:
        """The child now running (a new object after each restart)."""
        with self._lock:
            return self._popen

    @property
    def restarts(self) -> int:
        """Restarts within the current window."""
        return self._budget.used

    def _watch(self) -> None:
        while not self._closing.wait(self._poll_s):
            popen = self.popen
            if popen.poll() is None:
                continue
            if self._runtime.stop.is_set():  # stopping anyway (Ctrl-C reaches our children too)
                how = describe_exit(popen.returncode)
                self._runtime.log.info(f"{self.name} (pid {popen.pid}) exited with {how} while the service stops")
                return
            if not self._restart(popen):
                return

    def _restart(self, dead: subprocess.Popen) -> bool:
        """Start the child again; False (and the runtime failed) when the budget is spent or it cannot start."""
        how = describe_exit(dead.returncode)
        if not self._budget.spend():
            self._runtime.fail(
                f"{self.name} exited with {how}, after {self._budget.limit} restarts within "
                f"{self._budget.window_s:.0f}s; giving up (see its log above)"
            )
            return False
        self._runtime.log.error(
            f"{self.name} (pid {dead.pid}) exited with {how}; restarting it ({self._budget.used} "
            f"of {self._budget.limit} restarts allowed within {self._budget.window_s:.0f}s)"
        )
        with self._lock:
            if self._closing.is_set() or self._runtime.stop.is_set():  # the service began stopping meanwhile
                return False
            try:
                self._popen = self._start()
            except Exception as error:  # e.g. OSError: the interpreter or the binary went away
                self._runtime.fail(f"could not restart {self.name}: {error!r}")
                return False
        return True

    def close(self) -> None:
        """Stop watching, then stop the child (the watcher never restarts it after this)."""
        self._closing.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            self._stop(self._popen)


class Runtime(Generic[S]):
    """What a service body gets: its settings, the stop event, and ways to supervise and fail.

    ``serve()`` starts a supervised gunicorn child; ``fail(reason)`` marks the service failed and
    stops it; ``on_cleanup(fn)`` runs ``fn`` at shutdown. ``close()`` runs the shutdown: supervised
    children first (no more answers naming a service that is going away), then the cleanups,
    last registered first. A cleanup that raises is logged and fails the service; the rest still run.
    """

    def __init__(self, settings: S, stop: threading.Event | None = None, name: str = "service"):
        self.settings, self.name = settings, name
        self.stop = stop or threading.Event()
        self.failure: str | None = None
        self.children: list[SupervisedChild] = []
        self._cleanups: list[Callable[[], object]] = []
        self.log = get_logger(f"hivetrain.{name}")

    @property
    def failed(self) -> bool:
        return self.failure is not None

    def fail(self, reason: str) -> None:
        """Mark the service failed (exit code 1) and set ``stop``; the first reason is kept and logged."""
        if self.failure is None:
            self.failure = reason
            self.log.error(f"{reason}; stopping the {self.name} (exit code 1)")
        self.stop.set()

    def serve(
        self,
        app_spec: str,
        host: str,
        port: int,
        workers: int,
        budget: RestartBudget | None = None,
        poll_s: float = POLL_INTERVAL_S,
    ) -> SupervisedChild:
        """Serve ``app_spec`` with a gunicorn child (settings passed as ``HIVE_*``), restarted if it dies."""
        child = SupervisedChild(
            f"gunicorn {app_spec}",
            lambda: start_gunicorn(app_spec, self.settings, host, port, workers),
            stop_gunicorn,
            self,
            budget,
            poll_s,
        )
        self.children.append(child)
        return child

    def on_cleanup(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` when the service stops, after the supervised children; last registered runs first."""
        self._cleanups.append(fn)

    def close(self) -> None:
        """Set ``stop``, stop the supervised children, then run the cleanups. KeyboardInterrupt is not caught."""
        self.stop.set()
        steps = [child.close for child in self.children] + list(reversed(self._cleanups))
        self.children, self._cleanups = [], []
        for step in steps:
            try:
                step()
            except Exception as error:  # one failing part must not leave the others running
                self.log.exception(f"stopping failed in {getattr(step, '__qualname__', step)!s}")
                self.fail(f"cleanup failed: {error!r}")


def run_service(
    model: type[S],
    body: Callable[[Runtime[S]], int | None],
    argv: list[str] | None = None,
    *,
    name: str,
    repeat_sigint: RepeatSigint = "interrupt",
) -> int:
    """Run ``body(runtime)`` as the service ``name`` and return its exit code (0, 1 or 2, see the module doc).

    ``body`` returns when the service is done (usually once ``runtime.stop`` is set) or returns a
    non-zero exit code of its own. Settings come from ``HIVE_*`` variables and ``argv`` flags.
    """
    try:
        settings = load_settings(model, argv)
    except ConfigError as error:  # before logging is set up: the message alone, on stderr
        print(error, file=sys.stderr)
        return EXIT_CONFIG
    from hivetrain.discovery import BootstrapUnavailable  # imports hivemind: not before --help and --version

    logging.getLogger("hivetrain").setLevel(settings.log_level)
    runtime = Runtime(settings, threading.Event(), name)
    install_stop_handlers(runtime.stop, repeat_sigint, runtime.log)
    reset_signal_handlers_in_children()
    code = EXIT_OK
    try:
        code = body(runtime) or EXIT_OK
    except BootstrapUnavailable as error:
        runtime.log.error(str(error))
        code = EXIT_CONFIG
    except ValueError as error:  # bad configuration found while building: say it plainly
        runtime.log.error(f"configuration error: {error}")
        code = EXIT_CONFIG
    finally:
        runtime.close()
    return _exit_code(runtime, code)


def _exit_code(runtime: Runtime, code: int) -> int:
    if code == EXIT_OK and runtime.failed:
        code = EXIT_FAILED
    if code == EXIT_OK:
        runtime.log.info(f"{runtime.name} stopped cleanly")
    else:
        runtime.log.info(f"{runtime.name} stopped with exit code {code}")
    return code
