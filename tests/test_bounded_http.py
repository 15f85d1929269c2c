"""The validator's HTTP to miners, attacked by real servers on 127.0.0.1: each exchange ends by its
deadline as a failure that names the cause (never the server's text), redirects are not followed,
bodies are capped, and URLs that point where a miner has no business are refused before any byte is sent.
"""

from __future__ import annotations

import functools

import pytest
from post_server import PostServer

from hivetrain.validator.bounded_http import RequestFailed, post_json, vet_url

CAP = 64 * 1024
OK = b'HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{"ok": true}'


class AttackServer(PostServer):
    """A real HTTP server whose POST handler is ``respond(handler, server)``; it counts requests and bytes sent."""

    def __init__(self, respond):
        self._respond = respond
        super().__init__()

    def respond(self, handler, body: bytes) -> None:
        self._respond(handler, self)


@pytest.fixture
def serve(start_server):
    """``serve(respond)``: an AttackServer, stopped after the test."""
    return functools.partial(start_server, AttackServer)


def _drip(prefix: bytes, dripped: bytes):
    """Send ``prefix`` at once, then ``dripped`` one byte every 0.2 s (the whole drip takes seconds)."""

    def respond(handler, server):
        if prefix and not server.write(handler, prefix):
            return
        for byte in dripped:
            if server.stopping.wait(0.2) or not server.write(handler, bytes([byte])):
                return
        server.finished.set()

    return respond


@pytest.mark.parametrize(
    "prefix, dripped",
    [
        (b"", OK),  # the status line itself, a byte at a time
        (b"HTTP/1.0 200 OK\r\nContent-Length: 40\r\n\r\n", b'{"padding": "' + b"x" * 25 + b'"}'),  # a declared body
        (
            b"HTTP/1.0 200 OK\r\n\r\n",
            b'{"padding": "' + b"x" * 25 + b'"}',
        ),  # no length: the body ends when the socket does
    ],
    ids=["status-line", "body", "body-without-length"],
)
def test_a_dripping_miner_fails_at_the_deadline_while_it_still_drips(serve, prefix, dripped):
    server = serve(_drip(prefix, dripped))
    with pytest.raises(RequestFailed, match="no complete answer within the deadline of 1s") as failed:
        post_json(server.url + "/challenge", {"q": 1}, deadline_s=1.0, max_bytes=CAP)
    assert server.sent >= 1 and not server.finished.is_set()  # the verdict came while the miner was still dripping
    assert "padding" not in str(failed.value)


def test_a_silent_miner_fails_at_the_deadline(serve):
    server = serve(lambda handler, server: server.stopping.wait(30))
    with pytest.raises(RequestFailed, match="within the deadline"):
        post_json(server.url + "/challenge", {}, deadline_s=0.5, max_bytes=CAP)
    assert server.hits == 1


def test_a_redirect_is_an_answer_not_a_direction(serve):
    target = serve(lambda handler, server: server.write(handler, OK))
    redirect = (
        f"HTTP/1.0 307 Temporary Redirect\r\nLocation: {target.url}/internal\r\nContent-Length: 0\r\n\r\n".encode()
    )
    server = serve(lambda handler, server: server.write(handler, redirect))
    with pytest.raises(RequestFailed, match="^answered HTTP 307$"):
        post_json(server.url + "/challenge", {}, deadline_s=5.0, max_bytes=CAP)
    assert server.hits == 1 and target.hits == 0


def test_an_error_page_is_named_by_its_status_never_repeated(serve):
    page = b"INTERNAL ERROR: the admin password is hunter2 " * 50
    error = b"HTTP/1.0 500 Internal Server Error\r\nContent-Length: %d\r\n\r\n%s" % (len(page), page)
    server = serve(lambda handler, server: server.write(handler, error))
    with pytest.raises(RequestFailed) as failed:
        post_json(server.url + "/challenge", {}, deadline_s=5.0, max_bytes=CAP)
    assert str(failed.value) == "answered HTTP 500"


def _flood(headers: bytes, total: int):
    def respond(handler, server):
        if not server.write(handler, headers):
            return
        chunk = b"x" * 65536
        while server.sent < total:
            if server.stopping.is_set() or not server.write(handler, chunk):
                return
        server.finished.set()

    return respond


@pytest.mark.parametrize(
    "headers, named",
    [
        (b"HTTP/1.0 200 OK\r\nContent-Length: 1000000000\r\n\r\n", "answer of 1000000000 bytes, over the cap of 65536"),
        (b"HTTP/1.0 200 OK\r\n\r\n", "answer over the cap of 65536 bytes"),  # no length declared: read up to the cap
    ],
    ids=["declared", "undeclared"],
)
def test_a_huge_answer_is_cut_at_the_cap(serve, headers, named):
    server = serve(_flood(headers, total=10**9))
    with pytest.raises(RequestFailed, match=f"^{named}$"):
        post_json(server.url + "/challenge", {}, deadline_s=30.0, max_bytes=CAP)
    assert not server.finished.is_set()


def test_an_honest_answer_is_read(serve):
    server = serve(lambda handler, server: server.write(handler, OK))
    assert post_json(server.url + "/challenge", {"q": 1}, deadline_s=5.0, max_bytes=CAP) == b'{"ok": true}'


@pytest.mark.parametrize(
    "url, named",
    [
        ("ftp://127.0.0.1/challenge", "not http or https"),
        ("http:///challenge", "no host"),
        ("http://user:secret@127.0.0.1:9/", "carries credentials"),
        ("http://127.0.0.1:9/?next=http://elsewhere", "query or fragment"),
        ("http://127.0.0.1:99999/", "does not parse"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),  # a cloud's metadata service
        ("http://[::ffff:169.254.169.254]/", "link-local"),
        ("http://0.0.0.0:8100/", "unspecified"),
        ("http://224.0.0.1/", "multicast"),
        ("http://no-such-host.invalid/", "does not resolve"),
    ],
)
def test_urls_a_miner_has_no_business_registering_are_refused(url, named):
    with pytest.raises(RequestFailed, match=named):
        vet_url(url)


def test_any_loopback_or_private_address_only_where_allowed(serve):
    assert vet_url("http://127.0.0.1:8080/miner", allow_private=True).address == "127.0.0.1"
    assert vet_url("http://10.1.2.3:8080", allow_private=True).path == "/"
    for url in ("http://10.1.2.3", "http://8.8.8.8/"):  # registered from nowhere known
        with pytest.raises(RequestFailed, match="not the address the miner's registration came from"):
            vet_url(url, allow_private=False)
    for url in ("http://127.0.0.1:8080", "http://[::1]:80", "http://localhost:80"):
        with pytest.raises(RequestFailed, match="loopback"):
            vet_url(url, allow_private=False, registered_from="127.0.0.1")  # not even from loopback itself
    server = serve(lambda handler, server: server.write(handler, OK))
    with pytest.raises(RequestFailed, match="refused URL"):
        post_json(server.url + "/challenge", {}, deadline_s=5.0, max_bytes=CAP, allow_private=False)
    assert server.hits == 0  # refused before a byte was sent


@pytest.mark.parametrize(
    "url, registered_from",
    [
        ("http://10.1.2.3:8200", "10.1.2.3"),  # a compose or Kubernetes miner, seen by the bootstrap as it serves
        ("http://8.8.8.8/", "8.8.8.8"),  # a miner on a public address (vetted here, never contacted)
        ("http://10.1.2.3:8200", "::ffff:10.1.2.3"),  # the bootstrap listening on IPv6 sees IPv4 mapped
        ("http://[2001:db8::7]:8200", "2001:db8:0::7"),
    ],
)
def test_a_url_on_the_address_the_registration_came_from_is_vetted(url, registered_from):
    assert vet_url(url, allow_private=False, registered_from=registered_from).port in (80, 8200)


@pytest.mark.parametrize(
    "url, registered_from",
    [
        ("http://10.0.0.5:6379/", "10.0.0.9"),  # another machine of the miner's network: Redis, say
        ("http://8.8.8.8/", "10.0.0.9"),  # somebody else's server on the internet
        ("http://10.0.0.5/", "not an address"),
    ],
)
def test_a_url_elsewhere_than_the_registration_came_from_is_refused_without_naming_it(url, registered_from):
    with pytest.raises(RequestFailed) as refused:
        vet_url(url, allow_private=False, registered_from=registered_from)
    assert str(refused.value) == "refused URL: its host is not the address the miner's registration came from"
