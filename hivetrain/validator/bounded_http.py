"""HTTP to a miner with hard bounds: one deadline for the whole exchange, a byte cap, no redirects, vetted URLs.

``requests`` applies its timeout to each socket read, so a miner dripping a byte a second kept a
spot check open for as long as it liked; it also followed redirects wherever a miner pointed, and
the validator published whatever a non-200 body said. Here:

* a watchdog shuts the socket down when the deadline passes, whatever the exchange is doing then
  (connecting, sending, waiting for the status line, reading the body);
* any status but 200 is an answer in itself: never followed, its body never read or repeated;
* the body is read up to a cap, and a declared length over the cap is refused before reading;
* the URL is vetted before anything is sent: http or https, a host, no credentials, no query;
  the host is resolved once and the connection pinned to that address (a second DNS answer
  cannot point elsewhere), and link-local (cloud metadata), multicast, unspecified and reserved
  addresses are refused. With ``allow_private`` (a swarm on one machine: ``make swarm``, the
  tests) loopback and private networks are allowed. Without it (the default), a URL must resolve
  to the address its miner's registration came from (``PeerRecord.registered_from``, as the
  bootstrap saw it) and never to loopback: a registration can point the validator at the machine
  that sent it and nowhere else, so it cannot make the validator a scanner of internal services
  or of anyone else's. Compose and Kubernetes miners register from the address they serve on.

Failures raise ``RequestFailed`` whose message names the cause (a status code, an error class,
the deadline), never text the peer sent.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass


class RequestFailed(Exception):
    """No usable answer; the message says why in the validator's words, never in the peer's."""


class NoAnswer(RequestFailed):
    """The peer did not answer: no connection, or no complete answer by the deadline (it stalled)."""


@dataclass(frozen=True)
class Target:
    """A vetted URL: where to connect (``address``, pinned) and what to ask for."""

    scheme: str
    host: str
    port: int
    address: str
    path: str


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``address`` as an IP (IPv4-mapped IPv6 as IPv4, no zone); None when it is none."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    return getattr(ip, "ipv4_mapped", None) or ip


def _refused_address(address: str, allow_private: bool, registered_from: str) -> str | None:
    """Why the validator will not send a request to ``address``; None when it will."""
    ip = _ip(address)
    if ip is None:
        return "not an IP address"
    if ip.is_loopback:  # before the reserved ranges, which hold ::1
        return None if allow_private else "a loopback address (allowed with HIVE_SPOT_CHECK_PRIVATE_URLS=true)"
    if ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved:
        return "a link-local, multicast, unspecified or reserved address"
    if allow_private:
        return None
    if ip != _ip(registered_from):  # never the address itself: score reasons are public
        return "not the address the miner's registration came from"
    return None


def vet_url(url: str, allow_private: bool = True, registered_from: str = "") -> Target:
    """``url`` parsed, checked and resolved; ``RequestFailed`` naming what is wrong with it.

    ``registered_from``: where the miner's registration came from; without ``allow_private`` the URL must
    resolve to it and only to it."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise RequestFailed("refused URL: it does not parse") from None
    if parts.scheme not in ("http", "https"):
        raise RequestFailed("refused URL: not http or https")
    if not parts.hostname:
        raise RequestFailed("refused URL: no host")
    if parts.username is not None or parts.password is not None:
        raise RequestFailed("refused URL: it carries credentials")
    if parts.query or parts.fragment:
        raise RequestFailed("refused URL: it has a query or fragment")
    try:
        found = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as error:
        raise RequestFailed(f"refused URL: its host does not resolve ({type(error).__name__})") from None
    addresses = [info[4][0] for info in found]
    for address in addresses:
        reason = _refused_address(address, allow_private, registered_from)
        if reason is not None:
            raise RequestFailed(f"refused URL: its host is {reason}")
    if not addresses:
        raise RequestFailed("refused URL: its host does not resolve")
    return Target(parts.scheme, parts.hostname, port, addresses[0], parts.path or "/")


class _Exchange:
    """One request's socket, and the watchdog that cuts it when the deadline passes (armed on creation)."""

    def __init__(self, deadline_s: float):
        self.deadline = time.monotonic() + deadline_s
        self.expired = False
        self._sock: socket.socket | None = None
        self._finished = False
        self._lock = threading.Lock()
        self._timer = threading.Timer(deadline_s, self._cut)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return max(0.001, self.deadline - time.monotonic())

    def open(self, target: Target) -> socket.socket:
        """A socket to the pinned address (TLS verified against the URL's host for https), watched from now on."""
        sock = socket.create_connection((target.address, target.port), self.remaining())
        if target.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(
                sock, server_hostname=target.host, do_handshake_on_connect=False
            )
        with self._lock:
            self._sock = sock
            expired = self.expired
        if expired:
            sock.close()
            raise TimeoutError("the deadline passed while connecting")
        if target.scheme == "https":
            sock.do_handshake()
        return sock

    def _cut(self) -> None:
        with self._lock:
            self.expired = True
            if self._sock is not None and not self._finished:
                try:
                    # the plain socket's shutdown, also under TLS: it wakes a blocked read without touching TLS state
                    socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
                except OSError:
                    pass

    def finish(self) -> None:
        self._timer.cancel()
        with self._lock:  # waits for a cut in progress, so a socket is never shut down after it is closed
            self._finished = True


class _PinnedConnection(http.client.HTTPConnection):
    """``http.client`` speaking to the vetted address through the exchange's watched socket."""

    def __init__(self, target: Target, exchange: _Exchange):
        super().__init__(target.host, target.port, timeout=exchange.remaining())
        self.target, self.exchange = target, exchange

    def connect(self) -> None:
        self.sock = self.exchange.open(self.target)


def post_json(
    url: str, payload: dict, deadline_s: float, max_bytes: int, allow_private: bool = True, registered_from: str = ""
) -> bytes:
    """POST ``payload`` as JSON to ``url``; the body of a 200 answer of at most ``max_bytes``, received
    (resolution, connection, request and the whole body) within ``deadline_s``. ``RequestFailed`` otherwise.
    ``allow_private`` and ``registered_from``: which addresses it may go to (``vet_url``)."""
    if deadline_s <= 0 or max_bytes < 1:
        raise ValueError(f"need deadline_s > 0 and max_bytes >= 1, got {deadline_s} and {max_bytes}")
    exchange = _Exchange(deadline_s)
    conn = None
    try:
        target = vet_url(url, allow_private, registered_from)
        conn = _PinnedConnection(target, exchange)
        conn.request(
            "POST",
            target.path,
            body=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json", "Connection": "close"},
        )
        response = conn.getresponse()
        if response.status != 200:
            raise RequestFailed(f"answered HTTP {response.status}")
        declared = response.getheader("Content-Length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise RequestFailed(f"answer of {int(declared)} bytes, over the cap of {max_bytes}")
        body = response.read(max_bytes + 1)
        if len(body) > max_bytes:
            raise RequestFailed(f"answer over the cap of {max_bytes} bytes")
        if exchange.expired:  # a body without a declared length ends early, without an error, when the socket is cut
            raise TimeoutError("the deadline passed while reading")
        return body
    except RequestFailed:
        raise
    except (OSError, http.client.HTTPException, ValueError) as error:
        if exchange.expired or isinstance(error, TimeoutError):  # the socket's own timeout is the time left, too
            raise NoAnswer(f"no complete answer within the deadline of {deadline_s:g}s") from None
        raise NoAnswer(f"no answer: {type(error).__name__}") from None
    finally:
        exchange.finish()
        if conn is not None:
            conn.close()
