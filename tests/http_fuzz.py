"""What the HTTP fuzz suite (tests/test_fuzz_http.py) draws, sends and requires of every answer.

Strategies (Hypothesis) for requests to any Flask route: its path with junk in its variables, junk queries,
bodies and content types, and the signed envelopes only a miner's endpoint reads; ``check`` says what no answer
may be; ``SlowClients`` hold connections the way slowloris clients do.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import quote

from bound_peers import KeyWallet
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from hivetrain.identity import Domain, sign
from hivetrain.miner.challenge import ChallengeLimits

METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
#: Rules the fuzzer leaves alone, by (service, rule), with the reason (none so far: every route is fuzzed).
SKIPPED: dict[tuple[str, str], str] = {}


# --- sending ---------------------------------------------------------------------------------------


@dataclass
class Service:
    """One server under fuzz: where it listens, its Flask routes, and what was sent to it."""

    name: str
    port: int
    rules: list = field(default_factory=list)  # werkzeug Rules of its url_map
    popen: object = None  # gunicorn's master (None for the miner's in-process waitress)
    body_limit: int | None = None  # bodies over this are refused by the server itself (413), before the app
    workers: frozenset = frozenset()
    sent: Counter = field(default_factory=Counter)  # requests by status class ("2xx", ...) or "no answer"
    hits: Counter = field(default_factory=Counter)  # fuzz requests by rule

    def fuzzed_rules(self) -> list:
        return [rule for rule in self.rules if (self.name, rule.rule) not in SKIPPED]

    def count(self, status: int | None) -> None:
        self.sent["no answer" if status is None else f"{status // 100}xx"] += 1


@dataclass
class Reply:
    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


def send(
    service: Service,
    method: str,
    target: str,
    headers: dict | None = None,
    body: bytes | None = None,
    timeout: float = 60.0,
) -> Reply:
    """One request on a fresh connection; counted against ``service``."""
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=timeout)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        response = conn.getresponse()
        reply = Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    except BaseException:
        service.count(None)
        raise
    finally:
        conn.close()
    service.count(reply.status)
    return reply


def wait_healthy(port: int, popen=None, timeout: float = 180.0) -> None:
    """Until ``/healthz`` answers 200 (servers start slowly on a busy CI machine); fails if gunicorn exits."""
    deadline = time.monotonic() + timeout
    while True:
        assert popen is None or popen.poll() is None, f"gunicorn exited with {popen.returncode}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"port {port} did not answer /healthz in {timeout:.0f}s"
        time.sleep(0.2)


# --- what is drawn ------------------------------------------------------------------------------------

VARIABLE = re.compile(
    r"<(?:(?P<converter>[a-zA-Z_][a-zA-Z0-9_]*)(?:\((?P<args>.*?)\))?:)?(?P<name>[a-zA-Z_][a-zA-Z0-9_]*)>"
)
_JUNK_SEGMENTS = [
    "",
    ".",
    "..",
    "%2e%2e",
    "%00",
    "%ff",
    "%",
    "%zz",
    "%2F",
    "\x00",
    "dashboard.html",
    "../../../../etc/passwd",
    "..%2f..%2fetc%2fpasswd",
    "a" * 300,
    "\u202e\u0000\uffff",
    "😀",
    "index.html%00.js",
    "~",
    "\\..\\",
]
#: Query values: huge and odd numbers, NUL bytes, unicode digits, broken escapes, the hotkeys the apps know.
_ODD_VALUES = [
    "",
    "0",
    "-1",
    "1",
    "32",
    "1000",
    "1e999",
    "NaN",
    "Infinity",
    "-0",
    " 5",
    "5 ",
    "1_0",
    "0x10",
    "\u0663",
    "\uff11\uff12",
    "9" * 400,
    "%00",
    "\x00",
    "%",
    "%zz",
    "true",
    "null",
    "[]",
    "{}",
    "a" * 1000,
    str(2**64),
    str(-(2**63)),
]
_QUERY_NAMES = ["limit", "validator", "peer", "count", "since", "format", "callback", "", "\x00", "limit[]", "%", "ü"]
_CONTENT_TYPES = [
    None,
    "application/json",
    "application/json; charset=utf-16",
    "text/plain",
    "text/html",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "multipart/form-data",
    "application/octet-stream",
    "application/json; charset=\x7f",
    "*/*",
    "",
    ";;;",
    "a" * 500,
]
#: Bodies no generator is likely to hit: deep nesting, Python's int-digit limit, literals JSON does not have.
_SPECIAL_BODIES = [
    b"[" * 60_000,
    b'{"a":' * 20_000,
    b"1" * 5000,
    b"NaN",
    b"-Infinity",
    b'{"hotkey": 1e999}',
    b"\x00",
    b'"\\ud800"',
    b"\xff\xfe{\x00}\x00",
    b'{"hotkey": "' + b"5" * 60_000 + b'"}',
    b"[]" * 1000,
    b"{}",
    b'{"hotkey": "' + b"\xc3\x28" * 10 + b'"}',
    b'{"payload": {}, "hotkey": null}',
    b" " * 60_000,
]


def _quote(text: str) -> str:
    """Percent-encode everything but ``%`` itself, so broken escapes (``%zz``, a lone ``%``) reach the server as
    sent."""
    return quote(text, safe="%/")


def segment(converter: str | None) -> st.SearchStrategy[str]:
    """Junk for a path variable of werkzeug ``converter``; LookupError for a converter it does not know."""
    if converter in (None, "default", "string"):
        return st.one_of(st.sampled_from(_JUNK_SEGMENTS), st.text(max_size=20)).map(
            lambda s: _quote(s.replace("/", "")) or "x"
        )
    if converter == "path":
        return st.one_of(
            st.sampled_from(_JUNK_SEGMENTS + ["dashboard.js", "dashboard.css", "a/b/c"]),
            st.lists(st.text(max_size=12), min_size=1, max_size=4).map("/".join),
        ).map(lambda s: _quote(s) or "x")
    if converter == "int":
        return st.one_of(
            st.integers(min_value=-(2**70), max_value=2**70).map(str), st.sampled_from(["00", "-0", "1e3"])
        )
    if converter == "float":
        return st.one_of(st.floats().map(repr), st.sampled_from(["nan", "inf", "1e999"]))
    if converter == "uuid":
        return st.one_of(st.uuids().map(str), st.sampled_from(["0" * 36, "not-a-uuid"]))
    raise LookupError(converter)


def path_for(rule) -> st.SearchStrategy[str]:
    """``rule``'s path with each variable drawn (junk included), sometimes with junk segments around it."""
    parts: list = []
    position = 0
    for match in VARIABLE.finditer(rule.rule):
        parts.append(st.just(rule.rule[position : match.start()]))
        parts.append(segment(match.group("converter")))
        position = match.end()
    parts.append(st.just(rule.rule[position:]))
    base = st.tuples(*parts).map("".join)
    # most probes reach the route (its handler is what is fuzzed), some miss it by a junk segment
    junk = st.sampled_from(
        [""] * 30 + ["/", "//", "/x", "/%00", "/..", "/%ff", "?", "#frag", "/" + "a" * 50, ";jsessionid=1"]
    )
    return st.tuples(st.sampled_from([""] * 15 + ["/"]), base, junk).map("".join)


def queries(hotkeys: list[str]) -> st.SearchStrategy[str]:
    """Query strings: known and junk names, repeated keys, odd values (``hotkeys`` among them), broken escapes."""
    value = st.one_of(
        st.sampled_from(_ODD_VALUES + hotkeys),
        st.integers(min_value=-(2**80), max_value=2**80).map(str),
        st.text(max_size=30),
    )
    pair = st.tuples(st.one_of(st.sampled_from(_QUERY_NAMES), st.text(max_size=8)), value)
    encoded = st.lists(pair, max_size=5).map(lambda pairs: "&".join(f"{_quote(k)}={_quote(v)}" for k, v in pairs))
    raw = st.sampled_from(
        ["&&", "=", "==&=", "limit", "limit=1&limit=2&limit=x", "a=%", "%=%", "&limit=1;limit=2", "+" * 10]
    )
    return st.one_of(st.just(""), encoded, raw).map(lambda q: q[:2500])


#: JSON of random shapes: huge ints, non-finite floats (written as NaN/Infinity literals), unicode, nesting.
_JSON = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=-(10**40), max_value=10**40),
        st.floats(),
        st.text(max_size=30),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
#: What a signed payload can hold (the signer refuses NaN): the same shapes with finite floats.
_SIGNABLE = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(10**40), max_value=10**40),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=30),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)


def bodies() -> st.SearchStrategy[bytes | None]:
    """No body, JSON of random shapes, binary, text, or one of the special bodies."""
    return st.one_of(
        st.none(),
        _JSON.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=200),
        st.text(max_size=100).map(lambda s: s.encode("utf-8", "surrogatepass")),
        st.sampled_from(_SPECIAL_BODIES),
    )


def envelopes(validator, miner: str, domain: Domain, limits: ChallengeLimits) -> st.SearchStrategy[bytes]:
    """What only a miner's endpoint reads: envelopes signed by ``validator`` (one the miner ``miner`` answers), by a
    stranger, for another run, tampered with, unsigned; around junk and challenge-shaped payloads."""
    number = st.one_of(
        st.integers(min_value=-5, max_value=200),
        st.integers(min_value=-(2**80), max_value=2**80),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=5),
        st.none(),
    )
    challenge = st.fixed_dictionaries(
        {
            "miner_hotkey": st.one_of(st.just(miner), st.just(validator.hotkey.ss58_address), st.text(max_size=60)),
            "block_index": number,
            "batch_size": number,
            "seed": number,
            "dim": number,
            "epoch": number,
        },
        optional={"extra": _SIGNABLE},
    )
    near_the_bounds = (
        st.fixed_dictionaries(  # around the limits and the wire format's bounds: answered, or refused by one
            {
                "miner_hotkey": st.sampled_from([miner, miner, miner, validator.hotkey.ss58_address]),
                "block_index": st.integers(0, limits.block_limit + 5),
                "batch_size": st.integers(1, limits.max_batch + 1),
                "seed": st.integers(0, 2**63),
                "dim": st.integers(8, limits.max_dim + 5),
                "epoch": st.integers(0, 2**63),
            }
        )
    )
    payload = st.one_of(near_the_bounds, challenge, st.dictionaries(st.text(max_size=12), _SIGNABLE, max_size=6))
    signer = st.sampled_from([validator, validator, KeyWallet(4242)])
    signed = st.tuples(signer, payload).map(lambda sp: sign(sp[0], domain, sp[1]))
    other_run = payload.map(lambda p: sign(validator, Domain("another-run"), p))
    tampered = st.tuples(
        signed, st.sampled_from(["payload", "hotkey", "timestamp", "nonce", "signature", "extra"]), _JSON
    ).map(lambda t: {**t[0], t[1]: t[2]})
    unsigned = st.dictionaries(st.sampled_from(["payload", "hotkey", "timestamp", "nonce", "signature"]), _JSON).map(
        lambda d: {**d, "hotkey": validator.hotkey.ss58_address}
    )
    return st.one_of(signed, other_run, tampered, unsigned).map(lambda e: json.dumps(e).encode())


@dataclass
class Probe:
    rule: str
    method: str
    target: str
    headers: dict
    body: bytes | None

    def __repr__(self) -> str:  # what a failure prints: bodies run to megabytes
        body = None if self.body is None else f"{self.body[:120]!r}... ({len(self.body)} bytes)"
        return f"Probe({self.method} {self.target[:300]!r}, headers={self.headers!r}, body={body})"


def probes(
    service: Service, hotkeys: list[str], extra_bodies: st.SearchStrategy | None = None, only: str | None = None
) -> st.SearchStrategy[Probe]:
    """Requests to ``service``'s routes (``only`` that rule, with its own methods: a deep fuzz of one handler)."""
    rules = [rule for rule in service.fuzzed_rules() if only in (None, rule.rule)]
    body = bodies() if extra_bodies is None else st.one_of(extra_bodies, bodies())

    @st.composite
    def probe(draw) -> Probe:
        rule = draw(st.sampled_from(rules))
        methods = st.sampled_from(sorted(rule.methods - {"HEAD", "OPTIONS"}))
        method = draw(methods if only else st.one_of(methods, st.sampled_from(METHODS)))
        path = draw(path_for(rule))
        query = draw(queries(hotkeys))
        headers = {}
        content_type = draw(st.one_of(st.just("application/json"), st.sampled_from(_CONTENT_TYPES)))
        if content_type is not None:
            headers["Content-Type"] = content_type
        sent = draw(body) if method not in ("GET", "HEAD") or draw(st.integers(0, 3)) == 0 else None
        return Probe(rule.rule, method, path + ("?" + query if query else ""), headers, sent)

    return probe()


# --- what every answer must be ------------------------------------------------------------------------


def on_purpose(service: Service, reply: Reply) -> bool:
    """The 503s a service gives by design, by the reason it names in its JSON: not a failure of the service.
    (Redis stays up during the fuzz, so the apps' "redis unavailable" 503 is not among them.)"""
    if reply.status != 503 or "json" not in reply.headers.get("content-type", ""):
        return False
    body = reply.json()
    if service.name == "miner":  # its queue share is full or the training loop did not answer in time
        return body.get("error") in ("busy", "timeout")
    return body.get("status") == "unavailable"  # /readyz: not ready (no live bootstrap record, validator stopped)


#: Header values HTTP does not allow (control characters): the server refuses these before the app sees them.
_NOT_HTTP = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def check(service: Service, probe: Probe, reply: Reply) -> None:
    """No 5xx but those on purpose; a request HTTP does not allow gets a 400, a body over the server's limit a 413;
    every other error is the app's, and JSON with an ``error``."""
    where = f"{service.name}: {probe!r}"
    assert reply.status < 500 or on_purpose(service, reply), f"{where} -> {reply.status} {reply.body[:300]!r}"
    if any(_NOT_HTTP.search(value) for value in probe.headers.values()):
        assert reply.status == 400, f"{where} -> {reply.status}: a header HTTP does not allow must be refused"
    elif service.body_limit is not None and len(probe.body or b"") > service.body_limit:
        assert reply.status == 413, (
            f"{where} -> {reply.status}: the server refuses bodies over its limit before the app"
        )
    elif reply.status >= 400 and probe.method != "HEAD":
        assert reply.headers.get("content-type", "").startswith("application/json"), (
            f"{where} -> non-JSON {reply.status}"
        )
        assert on_purpose(service, reply) or isinstance(reply.json().get("error"), str), (
            f"{where} -> {reply.body[:300]!r}"
        )


def fuzz(service: Service, probe: Probe, timeout: float = 60.0) -> None:
    """Send ``probe`` and check the answer."""
    service.hits[probe.rule] += 1
    check(service, probe, send(service, probe.method, probe.target, probe.headers, probe.body, timeout))


def fuzz_test(
    service: Service, strategy: st.SearchStrategy[Probe], examples: int, shrink: bool = True, timeout: float = 60.0
):
    """A Hypothesis test sending ``examples`` probes drawn from ``strategy`` to ``service`` (call it to run them);
    the same probes on every run (derandomized, no example database)."""

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        phases=[Phase.explicit, Phase.generate] + ([Phase.shrink] if shrink else []),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(probe=strategy)
    def run(probe: Probe) -> None:
        fuzz(service, probe, timeout)

    return run


# --- raw connections ---------------------------------------------------------------------------------


def raw_exchange(port: int, head: bytes, body: bytes = b"", timeout: float = 60.0, body_parts=()) -> bytes:
    """Send ``head``, ``body`` and then each of ``body_parts`` on one connection; whatever the server
    answered before it closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        try:
            conn.sendall(head + body)
            for part in body_parts:
                conn.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused while we were still sending: its answer is what counts
        answer = b""
        try:
            while chunk := conn.recv(65536):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        return answer


def status_of(answer: bytes) -> int:
    """The status code of a raw HTTP answer."""
    assert answer.startswith(b"HTTP/1."), answer[:200]
    return int(answer.split(b" ", 2)[1])


def read_answer(reader) -> bytes:
    """One whole answer (head and Content-Length body) from ``reader``, a ``conn.makefile("rb")``: what arrives after
    it (the next answer on a kept-alive connection) stays buffered there for the next call."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = reader.readline(65537)
        assert line, f"closed before a whole answer: {head[:200]!r}"
        head += line
    length = int(re.search(rb"(?im)^content-length: *([0-9]+)", head).group(1))
    return head + reader.read(length)


class SlowClients:
    """Connections holding what a naive server gives each request: half a head dribbling a byte at a time (on a new
    connection, or on a kept-alive one after a first answer), idle ones that send nothing, and whole heads whose body
    dribbles. ``peek`` tells what the server did with one without reading from it."""

    def __init__(self, service: Service, count: int, method: str, path: str):
        self.service, self.method, self.path = service, method, path
        self.heads, self.idle, self.bodies = [], [], []
        for i in range(count):
            conn = socket.create_connection(("127.0.0.1", service.port), timeout=30)
            kind = ("head", "idle", "body", "kept-alive head")[i % 4]
            if kind == "kept-alive head":  # a first request answered on it: the half head is the next request
                conn.sendall(f"{method} {path} HTTP/1.1\r\nHost: fuzz\r\nContent-Length: 2\r\n\r\n{{}}".encode())
                service.count(status_of(read_answer(conn.makefile("rb"))))
            if kind == "idle":
                self.idle.append(conn)
            elif kind == "body":
                conn.sendall(f"{method} {path} HTTP/1.1\r\nHost: fuzz\r\nContent-Length: 1000\r\n\r\n{{".encode())
                self.bodies.append(conn)
            else:
                conn.sendall(f"{method} {path} HTTP/1.1\r\nHost: fuzz\r\nX-Dribble: ".encode())
                self.heads.append(conn)
            service.sent["slow"] += 1
        self._stop = threading.Event()
        self._dribbler = threading.Thread(target=self._dribble, name="fuzz-dribbler", daemon=True)
        self._dribbler.start()

    def _dribble(self) -> None:
        while not self._stop.wait(0.1):
            for conn in self.heads + self.bodies:
                try:
                    conn.sendall(b"a" if conn in self.heads else b" ")
                except OSError:
                    pass  # the server closed it: peek() tells

    @staticmethod
    def peek(conn: socket.socket) -> str:
        """``waiting`` (open, nothing sent back yet), ``answered <status>``, or ``closed`` (without an answer)."""
        timeout = conn.gettimeout()
        conn.settimeout(0)  # with a timeout, recv() would wait for data whatever its flags
        try:
            data = conn.recv(16, socket.MSG_PEEK)
        except BlockingIOError:
            return "waiting"
        except OSError:
            return "closed"
        finally:
            conn.settimeout(timeout)
        return f"answered {status_of(data)}" if data else "closed"

    def stop_dribbling(self) -> None:
        self._stop.set()
        self._dribbler.join(timeout=5)

    def close(self) -> None:
        self.stop_dribbling()
        for conn in self.heads + self.idle + self.bodies:
            conn.close()
