"""The service runner with real processes: gunicorn children killed and restarted, real signals, real exit codes.

``run_service`` installs signal handlers and a fork hook, so it runs in a child interpreter here
(``_PROBE``); pytest's own process keeps its handlers. The supervisor runs in-process against a
real gunicorn serving the bootstrap app.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from hivetrain.runtime import RESTART_LIMIT, RestartBudget, Runtime, describe_exit, install_stop_handlers, usable_cpus
from hivetrain.settings import BootstrapSettings
from hivetrain.swarm import procs

APP_SPEC = "hivetrain.bootstrap.app:create_app()"
BROKEN_SPEC = "hivetrain.no_such_module:create_app()"  # a worker cannot import it: gunicorn exits on boot
WAIT_S = 60.0

# A service whose body the test picks: argv[1] = what the body does, argv[2] = repeat_sigint.
_PROBE = r"""
import os, signal, sys
from hivetrain.discovery import BootstrapUnavailable
from hivetrain.runtime import run_service
from hivetrain.settings import ServiceSettings

def say(text):
    print(text, flush=True)

def body(runtime):
    runtime.on_cleanup(lambda: say("cleaned up"))
    what = sys.argv[1]
    if what == "config":
        raise ValueError("HIVE_SOMETHING is wrong; set it to 3")
    if what == "bootstrap":
        raise BootstrapUnavailable("no initial peers from http://127.0.0.1:9/initial_peers")
    if what == "code":
        return 7
    if what == "crashloop":
        runtime.serve(sys.argv[3], "127.0.0.1", int(sys.argv[4]), 1)
        runtime.stop.wait(120)
        return None
    if what == "fork":
        pid = os.fork()
        if pid == 0:
            ok = (signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
                  and signal.getsignal(signal.SIGINT) is signal.SIG_IGN)
            os._exit(0 if ok else 1)
        say(f"child exit {os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}")
        return None
    say("ready")
    runtime.stop.wait(120)
    say("stopping")
    sys.stdin.readline()  # the test sends a second signal, then a line
    say("done")

raise SystemExit(run_service(ServiceSettings, body, [], name="probe", repeat_sigint=sys.argv[2]))
"""


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("HIVE_")}


def _probe(tmp_path: Path, *args: str) -> subprocess.Popen:
    stderr = open(tmp_path / "probe.log", "wb")
    try:
        return subprocess.Popen(
            [sys.executable, "-c", _PROBE, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=_env(),
        )
    finally:
        stderr.close()


def _read_until(popen: subprocess.Popen, text: str, timeout: float = WAIT_S) -> str:
    """What the probe printed, read until ``text`` appears (fails after ``timeout`` s or at EOF)."""
    seen, deadline = b"", time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(popen.stdout, selectors.EVENT_READ)
        while text.encode() not in seen:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {text!r} from the probe; got {seen!r}"
            if selector.select(remaining):
                chunk = os.read(popen.stdout.fileno(), 4096)
                assert chunk, f"the probe closed its output before {text!r}; got {seen!r}"
                seen += chunk
    return seen.decode()


def _finish(popen: subprocess.Popen, tmp_path: Path) -> tuple[int, str, str]:
    """Wait for the probe (killed if it hangs); its exit code, stdout and log."""
    try:
        out, _ = popen.communicate(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        popen.kill()
        out, _ = popen.communicate()
        pytest.fail(f"the probe did not exit; log:\n{(tmp_path / 'probe.log').read_text()[-3000:]}")
    return popen.returncode, out.decode(), (tmp_path / "probe.log").read_text()


def _run_probe(tmp_path: Path, *args: str) -> tuple[int, str, str]:
    return _finish(_probe(tmp_path, *args), tmp_path)


# --- exit codes -----------------------------------------------------------------------------------


def test_a_value_error_is_a_configuration_error(tmp_path):
    code, out, log = _run_probe(tmp_path, "config", "interrupt")
    assert code == 2 and "configuration error: HIVE_SOMETHING is wrong; set it to 3" in log
    assert "cleaned up" in out


def test_an_unreachable_bootstrap_exits_2_with_its_message(tmp_path):
    code, out, log = _run_probe(tmp_path, "bootstrap", "interrupt")
    assert code == 2 and "no initial peers from http://127.0.0.1:9/initial_peers" in log
    assert "cleaned up" in out


def test_the_body_can_return_its_own_exit_code(tmp_path):
    code, out, _ = _run_probe(tmp_path, "code", "ignore")
    assert code == 7 and "cleaned up" in out


def test_a_child_that_keeps_dying_fails_the_service_with_exit_1(tmp_path):
    code, out, log = _run_probe(tmp_path, "crashloop", "ignore", BROKEN_SPEC, str(procs.free_port()))
    assert code == 1, log[-3000:]
    assert log.count("restarting it") == RESTART_LIMIT and "giving up" in log
    assert "cleaned up" in out


# --- signals --------------------------------------------------------------------------------------


def test_sigterm_stops_cleanly_with_exit_0(tmp_path):
    popen = _probe(tmp_path, "wait", "ignore")
    try:
        _read_until(popen, "ready")
        popen.send_signal(signal.SIGTERM)
        _read_until(popen, "stopping")
        popen.stdin.write(b"go\n")
        popen.stdin.flush()
        code, out, log = _finish(popen, tmp_path)
    finally:
        popen.kill()
    assert code == 0 and "done" in out and "cleaned up" in out
    assert "SIGTERM received; stopping cleanly" in log and "probe stopped cleanly" in log


@pytest.mark.parametrize("repeat_sigint", ["interrupt", "ignore"])
def test_a_second_sigint_interrupts_or_is_ignored(tmp_path, repeat_sigint):
    popen = _probe(tmp_path, "wait", repeat_sigint)
    try:
        _read_until(popen, "ready")
        popen.send_signal(signal.SIGINT)
        _read_until(popen, "stopping")
        popen.send_signal(signal.SIGINT)  # before the line: the read is interrupted by it first
        popen.stdin.write(b"go\n")
        popen.stdin.flush()
        code, out, log = _finish(popen, tmp_path)
    finally:
        popen.kill()
    assert "cleaned up" in out  # the cleanup runs either way
    if repeat_sigint == "interrupt":
        assert code in (-signal.SIGINT, 128 + signal.SIGINT) and "done" not in out
        assert "KeyboardInterrupt" in log
    else:
        assert code == 0 and "done" in out and "SIGINT received again; already stopping" in log


def test_forked_children_get_default_handlers(tmp_path):
    code, out, _ = _run_probe(tmp_path, "fork", "interrupt")
    assert code == 0 and "child exit 0" in out


def test_install_stop_handlers_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="'interrupt' or 'ignore'"):
        install_stop_handlers(threading.Event(), "twice")  # type: ignore[arg-type]


# --- restart budget -------------------------------------------------------------------------------


def test_restart_budget_counts_within_its_window():
    budget = RestartBudget(limit=3, window_s=60)
    assert [budget.spend(now) for now in (0, 1, 2, 3)] == [True, True, True, False]
    assert budget.spend(60.5)  # the restart at 0 left the window
    assert not budget.spend(60.8)  # the ones at 1 and 2 are still in it
    assert RestartBudget(limit=0).spend() is False
    with pytest.raises(ValueError, match="window_s"):
        RestartBudget(limit=1, window_s=0)


def test_describe_exit():
    assert describe_exit(3) == "code 3" and describe_exit(-signal.SIGKILL) == "signal SIGKILL"


# --- supervising a real gunicorn ------------------------------------------------------------------


def _healthz(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return response.status if json.loads(response.read()) == {"status": "ok"} else None
    except OSError:
        return None


def _wait(predicate, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture
def runtime(redis_url):
    port = procs.free_port()
    settings = BootstrapSettings(redis_url=redis_url, http_host="127.0.0.1", http_port=port, http_workers=1)
    runtime = Runtime(settings, name="test")
    try:
        yield runtime
    finally:
        runtime.close()


def test_a_killed_gunicorn_is_restarted_and_answers_again(runtime):
    port = runtime.settings.http_port
    child = runtime.serve(APP_SPEC, "127.0.0.1", port, 1)
    _wait(lambda: _healthz(port) == 200, "the first gunicorn to answer /healthz")
    first = child.popen
    workers = _wait(lambda: procs.children(first.pid), "the first gunicorn's worker")
    os.kill(first.pid, signal.SIGKILL)
    _wait(lambda: child.popen is not first, "a new gunicorn")
    # the orphaned worker still holds the socket until it sees its parent gone; after that, only the new one answers
    _wait(lambda: not any(procs.is_running(pid) for pid in workers), "the dead master's worker to exit")
    _wait(lambda: _healthz(port) == 200, "the new gunicorn to answer /healthz")
    assert first.returncode == -signal.SIGKILL and child.popen.poll() is None
    assert child.restarts == 1 and not runtime.failed and not runtime.stop.is_set()
    second = child.popen
    runtime.close()
    assert second.returncode is not None  # stopped, and not restarted once closing
    assert child.popen is second


def test_a_gunicorn_that_keeps_dying_fails_the_runtime(runtime):
    child = runtime.serve(BROKEN_SPEC, "127.0.0.1", runtime.settings.http_port, 1)
    assert runtime.stop.wait(WAIT_S), "the supervisor should give up and set stop"
    assert runtime.failed and "giving up" in runtime.failure and "code 3" in runtime.failure
    assert child.restarts == RESTART_LIMIT
    runtime.close()
    assert child.popen.poll() is not None


def test_close_runs_children_first_then_cleanups_last_first_and_survives_a_failing_one(runtime):
    order = []
    child = runtime.serve(APP_SPEC, "127.0.0.1", runtime.settings.http_port, 1)
    runtime.on_cleanup(lambda: order.append(("first registered", child.popen.poll() is not None)))
    runtime.on_cleanup(lambda: 1 / 0)
    runtime.on_cleanup(lambda: order.append(("last registered", child.popen.poll() is not None)))
    runtime.close()
    assert order == [("last registered", True), ("first registered", True)]
    assert runtime.failed and "ZeroDivisionError" in runtime.failure and runtime.stop.is_set()


# --- CPUs within a container's limit ---------------------------------------------------------------
def _cgroup(tmp_path, v2: str | None = None, v1: tuple[str, str] | None = None):
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(v1[0] + "\n")
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(v1[1] + "\n")
    return tmp_path


@pytest.mark.parametrize(
    "v2, v1, expected",
    [
        ("150000 100000", None, 2),  # compose `cpus: 1.5` under cgroup v2: 2 threads
        ("100000 100000", None, 1),
        (None, ("50000", "100000"), 1),  # cgroup v1 (this machine's kind), half a CPU
        ("max 100000", None, None),  # no quota: the affinity decides
        (None, ("-1", "100000"), None),
        (None, None, None),  # no cgroup files at all
        ("garbage", None, None),
    ],
)
def test_usable_cpus_respects_a_cgroup_quota(tmp_path, v2, v1, expected):
    affinity = len(os.sched_getaffinity(0))
    got = usable_cpus(_cgroup(tmp_path, v2, v1))
    assert got == (affinity if expected is None else min(affinity, expected))


def test_the_real_cgroup_gives_at_least_one_cpu():
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))
