"""Serve a service's Flask app with gunicorn as a child process (the bootstrap's and the validator's APIs).

The service process keeps its own work (a DHT peer, a validation loop) and starts
``python -m gunicorn ... '<module>:create_app()'`` next to it. Settings reach the workers as
``HIVE_*`` environment variables, so a value given as a command-line flag to the service is
seen by ``create_app()`` in every worker too. Services do not call these directly:
``hivetrain.runtime.Runtime.serve`` starts gunicorn, restarts it if it dies, and stops it first at shutdown.
Its workers are ``HeadFirstWorker``: gthread, with slow clients kept off its threads.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import sys
import time
from functools import partial

from gunicorn import util
from gunicorn.workers import gthread
from pydantic_settings import BaseSettings

from hivetrain.log import get_logger
from hivetrain.settings import service_env

logger = get_logger(__name__)

#: How long gunicorn gets after SIGTERM (its workers finish their requests) before SIGKILL.
STOP_TIMEOUT_S = 10.0
#: Threads per worker: requests wait on Redis, not on the CPU.
THREADS = 4
#: A client has this long to send a whole request head (from connecting, or from a kept-alive connection's next byte).
HEAD_TIMEOUT_S = 15.0
#: A request head larger than this is refused (431) before a thread sees it.
MAX_HEAD_BYTES = 64 * 1024
#: After the answer, a request body the app did not read is drained this long at most; then the connection closes.
BODY_DRAIN_S = 0.5
#: A closing connection waits this long at most for the client to close first (so its last bytes reset nothing).
LINGER_S = 2.0
WORKER_CLASS = "hivetrain.runtime.gunicorn.HeadFirstWorker"


def gunicorn_argv(app_spec: str, host: str, port: int, workers: int, log_level: str = "INFO") -> list[str]:
    """The command line that serves ``app_spec`` (e.g. ``'hivetrain.bootstrap.app:create_app()'``) on ``host:port``."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    bind_host = f"[{host}]" if ":" in host else host  # IPv6 literals need brackets
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        f"{bind_host}:{port}",
        "--workers",
        str(workers),
        "--worker-class",
        WORKER_CLASS,
        "--threads",
        str(THREADS),
        "--graceful-timeout",
        "5",
        "--timeout",
        "30",
        "--no-control-socket",
        "--log-level",
        log_level.lower(),
    ]
    if os.path.isdir("/dev/shm"):  # worker heartbeats off disk-backed /tmp (containers)
        argv += ["--worker-tmp-dir", "/dev/shm"]
    return argv + [app_spec]


def settings_env(settings: BaseSettings) -> dict[str, str]:
    """This process's environment with ``settings`` as the ``HIVE_*`` variables ``create_app()`` reads.

    Other ``HIVE_*`` variables are dropped, so the workers see exactly these settings.
    """
    prefix = type(settings).model_config.get("env_prefix", "")
    env = {key: value for key, value in os.environ.items() if not (prefix and key.startswith(prefix))}
    env.update(service_env(type(settings), **settings.model_dump()))
    return env


def start_gunicorn(app_spec: str, settings: BaseSettings, host: str, port: int, workers: int) -> subprocess.Popen:
    """Start gunicorn serving ``app_spec`` in our process group, so stopping the group stops it too."""
    argv = gunicorn_argv(app_spec, host, port, workers, getattr(settings, "log_level", "INFO"))
    popen = subprocess.Popen(argv, env=settings_env(settings), stdin=subprocess.DEVNULL)
    logger.info(f"serving {app_spec} on {argv[4]} with gunicorn (pid {popen.pid}, {workers} workers)")
    return popen


def stop_gunicorn(popen: subprocess.Popen | None, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM (graceful: workers finish their requests), then SIGKILL after ``timeout`` seconds."""
    if popen is None or popen.poll() is not None:
        return
    popen.terminate()
    try:
        popen.wait(timeout)
    except subprocess.TimeoutExpired:
        logger.warning(f"gunicorn (pid {popen.pid}) ignored SIGTERM for {timeout:.0f}s; killing it")
        popen.kill()
        popen.wait()


def _error(status: str, message: str) -> bytes:
    """A whole HTTP answer with a JSON error, as the apps give them, for what is refused before an app runs."""
    body = json.dumps({"error": status.split(" ", 1)[1], "message": message}).encode()
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: "
        "close\r\n\r\n"
    )
    return head.encode() + body


_HEAD_TOO_LARGE = _error("431 Request Header Fields Too Large", f"the request head is over {MAX_HEAD_BYTES} bytes")
_HEAD_TOO_SLOW = _error("408 Request Timeout", f"the request head did not arrive within {HEAD_TIMEOUT_S:g}s")


class HeadFirstWorker(gthread.ThreadWorker):
    """gunicorn's gthread worker, with slow clients kept off its threads and its event loop.

    Stock gthread (27.0) gives a connection a thread as soon as it is accepted. The thread waits up to
    5 s for a first byte, then reads the request head with blocking calls and no deadline, and after
    the answer drains an unread body for up to 5 s; the event loop itself lingers up to 2 s on every
    connection it closes. So a client that sends half a head and dribbles holds a thread for as long
    as it likes (``threads x workers`` of them stall the service), and a few idle, slow-body or
    never-closing clients delay every other request by seconds (tests/test_fuzz_http.py).

    Here the event loop reads each request head without blocking and hands the connection to a
    thread only once the head is complete: at most ``MAX_HEAD_BYTES`` (431 beyond) within
    ``HEAD_TIMEOUT_S`` (408 after; closed without an answer if not one byte came). An unread body
    is drained for ``BODY_DRAIN_S`` at most, and a closing connection lingers in the event loop's
    poller rather than blocking it. Plain HTTP/1.1 only (TLS and h2c, which these services do not
    use, take the stock path). Relies on gthread 27.0's internals (gunicorn is pinned).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._heads: dict = {}  # connection -> deadline of its request head; oldest first
        self._lingering: dict = {}  # closing socket -> when to close it anyway; oldest first

    def _heads_first(self) -> bool:
        return not self.cfg.is_ssl and getattr(self.cfg, "http2_cleartext", "off") == "off"

    # --- the event loop reads request heads ----------------------------------------------------

    def enqueue_req(self, conn) -> None:
        """A new connection, a kept-alive one that turned readable, or one with a pipelined request: read its head
        first."""
        if not self._heads_first():
            super().enqueue_req(conn)
            return
        conn.hive_head = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        if self._head_read(conn, 0):  # a pipelined request, already whole
            return
        conn.sock.setblocking(False)
        self._heads[conn] = time.monotonic() + HEAD_TIMEOUT_S
        self._on_head_bytes(conn)  # the head is usually there already: then it never waits in the poller
        if conn in self._heads:
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_head_bytes, conn))

    def _on_head_bytes(self, conn, _sock=None) -> None:
        try:
            data = conn.sock.recv(MAX_HEAD_BYTES + 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client left before its request was whole
            self._stop_reading(conn)
            self.nr_conns -= 1
            util.close(conn.sock)
            return
        searched = max(0, len(conn.hive_head) - 3)
        conn.hive_head += data
        if conn.hive_head.find(b"\r\n\r\n", searched) >= 0 or len(conn.hive_head) > MAX_HEAD_BYTES:
            self._stop_reading(conn)
            self._head_read(conn, searched)

    def _head_read(self, conn, searched: int) -> bool:
        """Hand ``conn`` to a thread if its head is whole, refuse it if too large; False while the head is
        incomplete."""
        if conn.hive_head.find(b"\r\n\r\n", searched) >= 0:
            conn.data_ready = True
            super().enqueue_req(conn)
            return True
        if len(conn.hive_head) > MAX_HEAD_BYTES:
            self._refuse(conn, _HEAD_TOO_LARGE)
            return True
        return False

    def _stop_reading(self, conn) -> None:
        self._heads.pop(conn, None)
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _refuse(self, conn, answer: bytes) -> None:
        try:
            conn.sock.send(answer)  # non-blocking: a small answer fits the socket's buffer
        except OSError:
            pass
        self.nr_conns -= 1
        self._linger(conn.sock)

    def murder_pending(self) -> None:
        """Every turn of the event loop: close heads past their deadline (all of them when stopping) and lingerers."""
        super().murder_pending()
        now = time.monotonic()
        while self._heads:
            conn, deadline = next(iter(self._heads.items()))
            if deadline > now and self.alive:
                break
            self._stop_reading(conn)
            if conn.hive_head:
                self._refuse(conn, _HEAD_TOO_SLOW)
            else:  # it never sent a byte: nothing to answer
                self.nr_conns -= 1
                util.close(conn.sock)
        while self._lingering:
            sock, deadline = next(iter(self._lingering.items()))
            if deadline > now:
                break
            self._close_lingering(sock)

    # --- threads get whole heads; bodies and closing connections are bounded -------------------

    def handle(self, conn):
        """On a thread: give the parser the head the event loop read, then serve as gthread does."""
        head = getattr(conn, "hive_head", None)
        if head is not None:
            conn.hive_head = None
            conn.init()  # the parser of a new connection (plain HTTP/1.1: reads nothing)
            conn.parser.unreader.unread(head)
        return super().handle(conn)

    def _keepalive_after(self, conn, keepalive):
        if not keepalive:
            return False
        return bool(conn.parser.finish_body(deadline=time.monotonic() + BODY_DRAIN_S))

    def finish_request(self, conn, fs) -> None:
        if fs.cancelled() or fs.exception() is not None or fs.result() is not False:
            super().finish_request(conn, fs)
            return
        self.nr_conns -= 1
        self._linger(conn.sock)

    def _linger(self, sock: socket.socket) -> None:
        """Close ``sock`` as RFC 9112 9.6 asks (our side first, then read until the client closes) from the poller."""
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
            self.poller.register(sock, selectors.EVENT_READ, self._on_linger_bytes)
        except (OSError, ValueError, KeyError):
            util.close(sock)
            return
        self._lingering[sock] = time.monotonic() + LINGER_S

    def _on_linger_bytes(self, sock: socket.socket) -> None:
        try:
            if sock.recv(65536):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._close_lingering(sock)

    def _close_lingering(self, sock: socket.socket) -> None:
        self._lingering.pop(sock, None)
        try:
            self.poller.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass
        util.close(sock)
