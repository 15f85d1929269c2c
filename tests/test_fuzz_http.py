"""Every HTTP route of the bootstrap, the validator API and the miner's challenge endpoint, fuzzed over real HTTP.

The real servers: both Flask apps under real gunicorn (2 workers each), the miner's ``ChallengeServer`` (waitress)
with a stand-in training loop, against the session's redis-server holding a small live swarm (bound and signed
registrations, signed steps and rounds, evaluations, a score board, a bootstrap record). Routes come from each
app's ``url_map``, so a new route is fuzzed without a change here; one the fuzzer cannot build a path for fails
``test_every_route_is_fuzzed`` until it is listed in ``http_fuzz.SKIPPED`` with a reason.

Hypothesis draws the method, the path (the rule with junk in its variables, junk segments around it), the query
(junk, huge numbers, unicode, NUL bytes, repeated keys, broken escapes), the body (JSON of random shapes with huge
ints and NaN/Infinity literals, deep nesting, binary, strings near the size limits; for the miner, envelopes signed
by the validator around junk or challenge-shaped payloads) and the content type; runs are derandomized, so the same
requests are sent every time. No answer may be a 5xx other than the 503s a service gives on purpose (``on_purpose``),
every error an app answers is JSON, and afterwards every service is healthy, gunicorn replaced no worker, and the
miner still answers a validator's genuine challenge. Slow clients (idle, half a head dribbling, a body dribbling)
hold nothing that other requests need; multi-megabyte bodies get a 4xx. How many requests were sent is printed at
the end of the module.
"""

from __future__ import annotations

import json
import math
import socket
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass

import pytest
from bound_peers import KeyWallet, bound
from bound_peers import peer_id as bound_peer_id
from http_fuzz import (
    VARIABLE,
    Probe,
    Service,
    SlowClients,
    envelopes,
    fuzz,
    fuzz_test,
    probes,
    raw_exchange,
    read_answer,
    segment,
    send,
    status_of,
    wait_healthy,
)

from hivetrain.bootstrap.__main__ import APP_SPEC as BOOTSTRAP_SPEC
from hivetrain.bootstrap.app import create_app as create_bootstrap_app
from hivetrain.chain import LocalChain
from hivetrain.identity import Domain, load_or_create_wallet, sign
from hivetrain.miner.challenge import MAX_BODY_BYTES, ChallengeLimits, ChallengeServer
from hivetrain.miner.health import TrainingHealth
from hivetrain.miner.metrics import MinerMetrics
from hivetrain.miner.validators import ValidatorList
from hivetrain.protocol.records import (
    VALIDATOR_TTL_S,
    BootstrapRecord,
    EvalRecord,
    Keys,
    MinerScore,
    PeerRecord,
    RoundRecord,
    ScoreBoard,
    StepRecord,
    ValidatorStatus,
)
from hivetrain.runtime.gunicorn import THREADS, start_gunicorn, stop_gunicorn
from hivetrain.settings import BootstrapSettings, ValidatorSettings
from hivetrain.store import Registry, append, connect_redis
from hivetrain.swarm import procs
from hivetrain.validator.__main__ import APP_SPEC as VALIDATOR_SPEC
from hivetrain.validator.app import create_app as create_validator_app

pytestmark = pytest.mark.integration

RUN = "fuzz"
KEYS = Keys(RUN)
DOMAIN = Domain(RUN)
MINERS = 12
WORKERS = 2
#: Examples per service in the main fuzz, and while slow clients hold connections open.
EXAMPLES = 400
EXAMPLES_WHILE_SLOW = 25
#: Slow clients per service: more than a gunicorn service has threads, so each would starve it if it held one.
SLOW_CLIENTS = WORKERS * THREADS + 2
OVERSIZED = 4 * 1024 * 1024
LIMITS = ChallengeLimits(max_dim=64, max_batch=2, block_limit=100, rate=1000.0, burst=1000, pending=2, timeout_s=20.0)


# --- the services ---------------------------------------------------------------------------------


class LiveData:
    """A small live swarm in Redis: bound and signed registrations, three steps each, rounds, evals, a score board,
    a bootstrap record and the validator's alive key; ``beat()`` refreshes what expires, as the real services do."""

    def __init__(self, redis_url: str, validator: str):
        self.db, self.validator = connect_redis(redis_url), validator
        self.registry = Registry(self.db, KEYS, DOMAIN)
        self.wallets = [KeyWallet(i + 1) for i in range(MINERS)]
        self.ids = [bound_peer_id(f"fuzz-miner-{i}") for i in range(MINERS)]
        self.records = [
            bound(self._record(i), w.hotkey.ss58_address, DOMAIN, name=f"fuzz-miner-{i}")
            for i, w in enumerate(self.wallets)
        ]
        self.beat()
        self._telemetry(time.time())
        self._scores(time.time())

    def _record(self, i: int) -> PeerRecord:
        return PeerRecord(
            peer_id=self.ids[i],
            role="miner",
            multiaddrs=[f"/ip4/127.0.0.1/tcp/{4000 + i}/p2p/{self.ids[i]}"],
            challenge_url=f"http://127.0.0.1:{5000 + i}/challenge",
            device="cpu",
            preset="tiny",
            started_at=time.time() - 600,
        )

    def _telemetry(self, now: float) -> None:
        for i, w in enumerate(self.wallets):
            for k in range(3):
                step = StepRecord(
                    peer_id=self.ids[i],
                    step=k,
                    local_epoch=k,
                    global_epoch=k,
                    loss=6.0 - k,
                    samples=8 * (k + 1),
                    samples_per_s=1.0,
                    tokens_per_s=100.0 + i,
                    checkpoint_epoch=k - 1,
                    time=now - 20 + 10 * k,
                )
                append(self.db, KEYS, DOMAIN, step, signer=w)
        for epoch in range(1, 3):
            round_ = RoundRecord(
                peer_id=self.ids[0],
                epoch=epoch,
                group_size=3,
                duration_s=0.2,
                group=self.ids[:3],
                success=True,
                time=now - 10 + epoch,
            )
            append(self.db, KEYS, DOMAIN, round_, signer=self.wallets[0])

    def _scores(self, now: float) -> None:
        evidence = [
            {
                "claimed_samples": 24,
                "verified_samples": 24,
                "reasons": ["claim: ok"],
                "checks": [{"verdict": "pass", "cosine": 0.98}],
            }
        ]
        miners = [
            MinerScore(
                hotkey=w.hotkey.ss58_address,
                uid=i,
                peer_id=self.ids[i],
                score=1.0 / (i + 1),
                weight=1.0 / MINERS,
                evidence=evidence,
            )
            for i, w in enumerate(self.wallets)
        ]
        board = ScoreBoard(validator=self.validator, uid=0, epoch=2, rounds=4, weights_set_at=now - 3, miners=miners)
        self.db.set(KEYS.scores(self.validator), board.to_json())
        for k in range(3):
            evaluation = EvalRecord(
                validator=self.validator,
                epoch=k,
                loss=7.0 - k,
                perplexity=math.exp(7.0 - k),
                blocks=4,
                tokens=1024,
                duration_s=0.5,
                time=now - 30 + 10 * k,
            )
            append(self.db, KEYS, DOMAIN, evaluation)

    def beat(self) -> None:
        for record, w in zip(self.records, self.wallets):
            self.registry.register(record, w)
        self.registry.set_bootstrap(
            BootstrapRecord(peer_id="QmFuzzBoot", multiaddrs=["/ip4/127.0.0.1/tcp/31337/p2p/QmFuzzBoot"])
        )
        status = ValidatorStatus(
            validator=self.validator, preset="tiny", parameters=3_300_000, epoch=2, synced_at=time.time() - 4
        )
        self.db.set(KEYS.validator_alive(self.validator), status.to_json(), ex=VALIDATOR_TTL_S)


class Heartbeat:
    """Calls ``beat`` every few seconds from a thread of its own, as long-lived services keep their records alive."""

    def __init__(self, beat, every_s: float = 5.0):
        self.beat, self.every_s = beat, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fuzz-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.beat()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class Miner:
    """The miner's real ChallengeServer on loopback, with a stand-in training loop that answers between steps."""

    def __init__(self, wallet, validators: ValidatorList):
        self.health = TrainingHealth()
        self.server = ChallengeServer(
            wallet,
            "127.0.0.1",
            0,
            validators,
            LIMITS,
            domain=DOMAIN,
            window_s=60.0,
            health=self.health,
            metrics=MinerMetrics(),
        ).start()
        self._stop = threading.Event()
        self._loop = threading.Thread(target=self._train, name="fuzz-training-loop", daemon=True)
        self._loop.start()

    def _train(self) -> None:
        while not self._stop.wait(0.01):
            self.server.answer_pending(lambda asked, batch: (5, [0.5] * asked.dim))
            self.health.step_done()

    def stop(self) -> None:
        self._stop.set()
        self._loop.join(timeout=5)
        self.server.stop()


def _gunicorn(name: str, spec: str, settings, port: int, app, stack: ExitStack) -> Service:
    """``spec`` under real gunicorn, stopped when ``stack`` closes; ``app`` (built alike) lists its routes."""
    popen = start_gunicorn(spec, settings, "127.0.0.1", port, WORKERS)
    stack.callback(stop_gunicorn, popen)
    wait_healthy(port, popen)
    return Service(name, port, list(app.url_map.iter_rules()), popen, workers=frozenset(procs.children(popen.pid)))


@dataclass
class Swarm:
    bootstrap: Service
    validator: Service
    miner: Service
    miner_hotkey: str
    validator_wallet: object  # the validator the miner answers: signs the fuzzer's envelopes
    validator_api_hotkey: str  # the hotkey of the validator whose API is fuzzed

    @property
    def services(self) -> list[Service]:
        return [self.bootstrap, self.validator, self.miner]


@pytest.fixture(scope="module")
def swarm(redis_server, wallet, other_wallet, tmp_path_factory, request):
    """Redis with a small live swarm in it; the bootstrap and the validator API under gunicorn; the miner's endpoint.
    At the end: how many requests were sent to each service, in CI's log too (``-q`` shows no captured output)."""
    db = connect_redis(redis_server)
    db.flushall()
    wallet_dir = str(tmp_path_factory.mktemp("fuzz-wallets"))
    api_hotkey = load_or_create_wallet(wallet_dir, "validator").hotkey.ss58_address
    with ExitStack() as stack:
        stack.callback(Heartbeat(LiveData(redis_server, api_hotkey).beat).stop)
        chain = LocalChain(db, RUN)
        chain.register(other_wallet.hotkey.ss58_address, "http://validator", "validator")
        validators = ValidatorList(chain, refresh_s=30.0).start()
        stack.callback(validators.stop)
        miner = Miner(wallet, validators)
        stack.callback(miner.stop)
        miner_service = Service(
            "miner", miner.server.port, list(miner.server.app.url_map.iter_rules()), body_limit=MAX_BODY_BYTES
        )
        port = procs.free_port()
        boot = BootstrapSettings(
            redis_url=redis_server, run_id=RUN, http_host="127.0.0.1", http_port=port, http_workers=WORKERS
        )
        bootstrap = _gunicorn("bootstrap", BOOTSTRAP_SPEC, boot, port, create_bootstrap_app(boot), stack)
        port = procs.free_port()
        api = ValidatorSettings(
            redis_url=redis_server,
            run_id=RUN,
            wallet_dir=wallet_dir,
            wallet_name="validator",
            api_host="127.0.0.1",
            api_port=port,
            api_workers=WORKERS,
        )
        validator = _gunicorn("validator", VALIDATOR_SPEC, api, port, create_validator_app(api), stack)
        yield Swarm(bootstrap, validator, miner_service, wallet.hotkey.ss58_address, other_wallet, api_hotkey)
        summary = ", ".join(
            f"{s.name} {sum(s.sent.values())} ({', '.join(f'{k}: {v}' for k, v in sorted(s.sent.items()))})"
            for s in (bootstrap, validator, miner_service)
        )
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled():  # like capsys.disabled(), for a module-scoped fixture
            print(f"\nHTTP fuzz: requests sent per service: {summary}", flush=True)


# --- the tests ----------------------------------------------------------------------------------------


def test_every_route_is_fuzzed(swarm):
    """Each service's url_map rules: fuzzable (every variable has a drawable converter) or skipped with a reason."""
    for service in swarm.services:
        assert service.rules, f"{service.name} has no routes?"
        for rule in service.fuzzed_rules():
            for match in VARIABLE.finditer(rule.rule):
                try:
                    segment(match.group("converter"))
                except LookupError:
                    pytest.fail(
                        f"{service.name} route {rule.rule}: no junk for converter {match.group('converter')!r}; "
                        "teach http_fuzz.segment() about it or list the route in SKIPPED with a reason"
                    )
    assert {rule.rule for rule in swarm.miner.rules} >= {"/challenge", "/healthz", "/metrics"}
    assert {rule.rule for rule in swarm.validator.rules} >= {
        "/",
        "/api/swarm",
        "/api/scores",
        "/api/evals",
        "/api/dashboard",
    }
    assert {rule.rule for rule in swarm.bootstrap.rules} >= {
        "/initial_peers",
        "/return_dht_address",
        "/readyz",
        "/metrics",
    }


def _hotkeys(swarm: Swarm) -> list[str]:
    return [swarm.validator_api_hotkey, swarm.miner_hotkey, swarm.validator_wallet.hotkey.ss58_address]


def _envelopes(swarm: Swarm):
    return envelopes(swarm.validator_wallet, swarm.miner_hotkey, DOMAIN, LIMITS)


def test_fuzz_bootstrap(swarm):
    fuzz_test(swarm.bootstrap, probes(swarm.bootstrap, _hotkeys(swarm)), EXAMPLES)()
    assert set(swarm.bootstrap.hits) == {rule.rule for rule in swarm.bootstrap.fuzzed_rules()}


def test_fuzz_validator_api(swarm):
    fuzz_test(swarm.validator, probes(swarm.validator, _hotkeys(swarm)), EXAMPLES)()
    assert set(swarm.validator.hits) == {rule.rule for rule in swarm.validator.fuzzed_rules()}


def test_fuzz_miner_endpoint(swarm):
    fuzz_test(swarm.miner, probes(swarm.miner, _hotkeys(swarm), _envelopes(swarm)), EXAMPLES)()
    assert set(swarm.miner.hits) == {rule.rule for rule in swarm.miner.fuzzed_rules()}


def test_fuzz_miner_challenges(swarm):
    """POST /challenge only, mostly with envelopes: signed by the validator around junk and challenge-shaped payloads,
    by a stranger, for another run, tampered with, unsigned."""
    fuzz_test(swarm.miner, probes(swarm.miner, _hotkeys(swarm), _envelopes(swarm), only="/challenge"), EXAMPLES)()


def test_a_validators_envelope_nested_near_the_stack_limit_is_a_4xx(swarm):
    """Regression (found by the fuzzer): a listed validator's envelope whose payload nests just under the depth
    where JSON parsing fails parsed, then blew the stack when re-encoded to check its signature: a 500."""
    validator = swarm.validator_wallet.hotkey.ss58_address
    limit = sys.getrecursionlimit()
    for depth in range(limit - 200, limit + 20):
        body = (
            '{"payload": {"a": %s}, "hotkey": "%s", "timestamp": %f, "nonce": "%s", "signature": "0x%s"}'
            % ("[" * depth + "]" * depth, validator, time.time(), "0" * 32, "0" * 128)
        ).encode()
        probe = Probe("/challenge", "POST", "/challenge", {"Content-Type": "application/json"}, body)
        fuzz(swarm.miner, probe)


# --- oversized and slow ---------------------------------------------------------------------------------


def test_multi_megabyte_bodies_get_a_4xx(swarm):
    """A body far over any limit, to every route of every service: a 4xx (413 where a route reads bodies), never a
    5xx."""
    body = b'{"hotkey": "' + b"5" * OVERSIZED + b'"}'
    for service in swarm.services:
        for rule in service.fuzzed_rules():
            path = rule.rule.replace("<path:filename>", "dashboard.js")
            head = (
                f"POST {path} HTTP/1.1\r\nHost: fuzz\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            answer = raw_exchange(service.port, head, body)
            service.count(status_of(answer) if answer.startswith(b"HTTP/1.") else None)
            status = status_of(answer)
            assert 400 <= status < 500, f"{service.name} POST {path} with {len(body)} bytes -> {answer[:300]!r}"
            if "POST" in rule.methods:
                assert status == 413, f"{service.name} POST {path} with {len(body)} bytes -> {answer[:300]!r}"
        wait_healthy(service.port, service.popen, timeout=30)


def test_oversized_heads_get_a_4xx(swarm):
    """A megabyte-long request line, and a megabyte of headers: refused with a 4xx before any app runs."""
    heads = [
        b"GET /healthz?" + b"a" * OVERSIZED + b" HTTP/1.1\r\nHost: fuzz\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: fuzz\r\n" + b"X-Junk: " + b"b" * OVERSIZED + b"\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: fuzz\r\n" + b"X-Many: c\r\n" * (OVERSIZED // 11) + b"\r\n",
    ]
    for service in swarm.services:
        for head in heads:
            answer = raw_exchange(service.port, head)
            service.count(status_of(answer) if answer.startswith(b"HTTP/1.") else None)
            assert 400 <= status_of(answer) < 500, (
                f"{service.name}: {head[:40]!r}... ({len(head)} bytes) -> {answer[:300]!r}"
            )
        wait_healthy(service.port, service.popen, timeout=30)


def test_pipelined_requests_and_a_dribbled_one_after_them_are_answered(swarm):
    """Two whole requests and half a third in one packet, the rest of the third later: three answers in order."""
    for service in (swarm.bootstrap, swarm.validator):
        with socket.create_connection(("127.0.0.1", service.port), timeout=30) as conn:
            conn.sendall(
                b"GET /healthz HTTP/1.1\r\nHost: fuzz\r\n\r\nGET /nowhere HTTP/1.1\r\nHost: fuzz\r\n\r\n"
                b"GET /healthz HTTP/1.1\r\nHo"
            )
            reader = conn.makefile("rb")
            statuses = [status_of(read_answer(reader)) for _ in range(2)]
            conn.sendall(b"st: fuzz\r\nConnection: close\r\n\r\n")
            statuses.append(status_of(read_answer(reader)))
        for status in statuses:
            service.count(status)
        assert statuses == [200, 404, 200], f"{service.name}: {statuses}"


def test_slow_clients_hold_nothing_the_others_need(swarm):
    """While slow clients hold more connections to each service than it has threads, a fuzz of each service still
    gets every answer; the half-sent heads were still open, neither answered nor cut, when the last answer came, and
    are served once complete. (Stock gunicorn gthread: the bootstrap and the validator API stopped answering.)"""
    asked = {"bootstrap": ("GET", "/healthz"), "validator": ("GET", "/healthz"), "miner": ("POST", "/challenge")}
    slow = {service.name: SlowClients(service, SLOW_CLIENTS, *asked[service.name]) for service in swarm.services}
    try:
        for service in swarm.services:
            extra = _envelopes(swarm) if service.name == "miner" else None
            fuzz_test(
                service, probes(service, _hotkeys(swarm), extra), EXAMPLES_WHILE_SLOW, shrink=False, timeout=30.0
            )()
        for clients in slow.values():
            clients.stop_dribbling()
        for name, clients in slow.items():
            heads = [clients.peek(conn) for conn in clients.heads]
            assert heads == ["waiting"] * len(heads), (
                f"{name}: half-sent requests were answered or cut while being sent: {heads}"
            )
            bodies = [clients.peek(conn) for conn in clients.bodies]  # the apps read no body: answered, or still read
            assert all(b == "waiting" or b.startswith("answered 2") for b in bodies), f"{name}: slow bodies: {bodies}"
        for name, clients in slow.items():
            for conn in clients.heads:  # complete each head: the request is served like any other
                body = b"{}" if clients.method == "POST" else b""
                conn.sendall(b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
                answer = read_answer(conn.makefile("rb"))
                clients.service.count(status_of(answer))
                expected = 400 if clients.method == "POST" else 200  # the miner: "{}" is no signed envelope
                assert status_of(answer) == expected, f"{name}: completed slow request -> {answer[:300]!r}"
    finally:
        for clients in slow.values():
            clients.close()


# --- afterwards ---------------------------------------------------------------------------------------------


def test_every_service_is_healthy_afterwards(swarm):
    """Run last: every /healthz answers, gunicorn replaced no worker, and the miner answers a genuine challenge."""
    for service in swarm.services:
        reply = send(service, "GET", "/healthz")
        assert reply.status == 200 and reply.json()["status"] == "ok", (
            f"{service.name}: {reply.status} {reply.body[:200]!r}"
        )
        if service.popen is not None:
            assert service.popen.poll() is None, f"{service.name}: gunicorn exited"
            assert frozenset(procs.children(service.popen.pid)) == service.workers, (
                f"{service.name}: a worker was replaced"
            )
    peers = send(swarm.bootstrap, "GET", "/initial_peers").json()["initial_peers"]
    assert len(peers) == MINERS + 1, peers  # the swarm's data is still served, not just /healthz
    assert send(swarm.validator, "GET", "/api/scores").json()["validator"] == swarm.validator_api_hotkey
    challenge = {
        "miner_hotkey": swarm.miner_hotkey,
        "block_index": 3,
        "batch_size": 2,
        "seed": 7,
        "dim": 64,
        "epoch": 5,
    }
    reply = send(
        swarm.miner,
        "POST",
        "/challenge",
        {"Content-Type": "application/json"},
        json.dumps(sign(swarm.validator_wallet, DOMAIN, challenge)).encode(),
    )
    assert reply.status == 200 and len(reply.json()["payload"]["projection"]) == 64, reply.body[:300]
