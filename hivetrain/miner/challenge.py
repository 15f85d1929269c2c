"""The miner's spot-check endpoint: validators send signed challenges, the training loop answers them.

A challenge names a batch of this miner's own shard and a projection seed. The HTTP thread only
checks and queues it; a thread of its own reads the batch; the training loop computes the
projected gradient between two steps, at the parameters it trains with, so nothing races the
optimizer and a miner cannot answer without doing the work on the model it actually has. The
answer is signed with the miner's hotkey and names the challenge's nonce, so it cannot be reused
for another challenge.

What is refused, cheapest check first: a body over ``MAX_BODY_BYTES`` (413, by the server before
the app runs, chunked or not); a hotkey the chain does not list as a validator (403, before its
signature is even checked: ``hivetrain.miner.validators``); a body nested deeper than
``MAX_NESTING`` (400: re-encoding it to check its signature could exhaust the stack); a bad
signature, a replay (401); a challenge for another miner (403); a batch, projection or block
beyond ``ChallengeLimits`` (400, naming the bound); more than ``rate`` per second from one
validator (429); more than ``pending`` of one validator's challenges waiting (503), so one
validator, or a flood, cannot take another's place in the queue. Served by waitress in a thread
of the miner: a fixed pool of threads, and requests are read whole by its event loop before a
thread sees them, so slow clients hold none.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Callable

import waitress
from flask import Flask, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from waitress import wasyncore
from werkzeug.exceptions import HTTPException

from hivetrain.identity import Domain, VerificationError, Verifier, sign
from hivetrain.log import get_logger
from hivetrain.miner.health import TrainingHealth
from hivetrain.miner.metrics import MinerMetrics
from hivetrain.miner.validators import ValidatorList
from hivetrain.protocol.spotcheck import Challenge, SpotCheckAnswer
from hivetrain.webapp import nests_deeper

logger = get_logger(__name__)

#: A signed challenge is about 600 bytes; anything much larger is not one.
MAX_BODY_BYTES = 64 * 1024
#: A challenge envelope nests two levels deep (envelope, payload); anything much deeper is not one.
MAX_NESTING = 8
#: Threads that run requests (each accepted challenge holds one until the training loop answers).
SERVER_THREADS = 8
#: Open connections at most, and seconds before an idle or half-sent one is closed.
MAX_CONNECTIONS = 100
CONNECTION_TIMEOUT_S = 30


class TokenBucket:
    """``rate`` requests per second with bursts of ``burst``, per key."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self._levels: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        with self._lock:
            level, last = self._levels.get(key, (float(self.burst), now))
            level = min(float(self.burst), level + (now - last) * self.rate)
            allowed = level >= 1.0
            self._levels[key] = (level - 1.0 if allowed else level, now)
            if len(self._levels) > 10_000:  # bounded memory under a flood of fresh hotkeys
                self._levels.pop(next(iter(self._levels)))
            return allowed


@dataclass(frozen=True)
class ChallengeLimits:
    """What one validator may ask of this miner: the cost of one challenge, how often, how many at once."""

    max_dim: int = 128
    max_batch: int = 4
    block_limit: int = 64  # block_index must be below this (the miner derives it from its shard)
    rate: float = 2.0
    burst: int = 4
    pending: int = 2
    timeout_s: float = 30.0

    def refusal(self, asked: Challenge) -> str | None:
        """Why ``asked`` is beyond these limits (naming the bound), or None."""
        if asked.dim > self.max_dim:
            return f"dim {asked.dim} is over this miner's bound: dim <= {self.max_dim}"
        if asked.batch_size > self.max_batch:
            return f"batch_size {asked.batch_size} is over this miner's bound: batch_size <= {self.max_batch}"
        if asked.block_index >= self.block_limit:
            return f"block_index {asked.block_index} is over this miner's bound: block_index < {self.block_limit}"
        return None


@dataclass
class PendingChallenge:
    challenge: Challenge
    validator: str
    nonce: str
    batch: Any = None  # what ``prepare`` read for it
    future: Future = field(default_factory=Future)


def _settle(future: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Complete ``future`` unless its request gave up on it (cancelled) meanwhile."""
    try:
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
    except InvalidStateError:
        pass


class ChallengeQueue:
    """Accepted challenges on their way to the training loop, at most ``per_validator`` of each validator.

    A validator's share is held from ``submit`` until its challenge is answered or dropped, so a
    validator whose requests time out still cannot pile up more. With ``prepare`` (the miner: read
    the challenge's batch of its shard) a thread of its own runs it first, so a slow or stuck read
    of a streamed dataset never blocks the training loop.
    """

    def __init__(self, per_validator: int, prepare: Callable[[Challenge], Any] | None = None):
        if per_validator < 1:
            raise ValueError(f"per_validator must be >= 1, got {per_validator}")
        self.per_validator, self._prepare = per_validator, prepare
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._ready: queue.Queue[PendingChallenge] = queue.Queue()
        self._unprepared: queue.Queue[PendingChallenge | None] = queue.Queue()
        self._closed = False
        self._thread = None
        if prepare is not None:
            self._thread = threading.Thread(target=self._prepare_loop, name="challenge-data", daemon=True)
            self._thread.start()

    def held(self, validator: str) -> int:
        with self._lock:
            return self._held[validator]

    def submit(self, item: PendingChallenge) -> bool:
        """Queue ``item``; False when its validator already has ``per_validator`` waiting (or we are closed)."""
        with self._lock:
            if self._closed or self._held[item.validator] >= self.per_validator:
                return False
            self._held[item.validator] += 1
        (self._ready if self._prepare is None else self._unprepared).put(item)
        return True

    def take(self) -> PendingChallenge | None:
        """The next challenge for the training loop (its share stays held until ``done``), None when there is none."""
        try:
            return self._ready.get_nowait()
        except queue.Empty:
            return None

    def done(self, item: PendingChallenge) -> None:
        with self._lock:
            self._held[item.validator] -= 1
            if self._held[item.validator] <= 0:
                del self._held[item.validator]

    def _prepare_loop(self) -> None:
        while (item := self._unprepared.get()) is not None:
            if item.future.cancelled():
                self.done(item)
                continue
            try:
                item.batch = self._prepare(item.challenge)
            except Exception as error:  # our data failed us: the validator hears so, training goes on
                logger.exception(f"reading the batch of a challenge from {item.validator} failed")
                _settle(item.future, error=error)
                self.done(item)
                continue
            self._ready.put(item)

    def close(self) -> None:
        """Fail everything still waiting (so its requests return) and stop the data thread."""
        with self._lock:
            self._closed = True
        for waiting in (self._unprepared, self._ready):
            while True:
                try:
                    item = waiting.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    _settle(item.future, error=RuntimeError("the miner is stopping"))
                    self.done(item)
        if self._thread is not None:
            self._unprepared.put(None)
            self._thread.join(timeout=5)


def create_challenge_app(
    hotkey_ss58: str,
    verifier: Verifier,
    validators: ValidatorList,
    limits: ChallengeLimits,
    challenges: ChallengeQueue,
    health: TrainingHealth | None = None,
    metrics: MinerMetrics | None = None,
) -> Flask:
    """Flask app with ``POST /challenge`` (listed validators only), ``GET /healthz`` (503 when training
    stalls, given ``health``) and, given ``metrics``, ``GET /metrics`` (Prometheus text format)."""
    app = Flask("hivetrain.miner.challenge")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES  # the server refuses first; this holds under any server
    limiter = TokenBucket(limits.rate, limits.burst)

    def refuse(status: int, outcome: str, error: str, detail: str):
        if metrics is not None:
            metrics.challenges.labels(outcome=outcome).inc()
        return jsonify(error=error, detail=detail), status

    if metrics is not None:

        @app.get("/metrics")
        def prometheus_metrics():
            return Response(generate_latest(metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException):
        return jsonify(error=error.name, detail=error.description), error.code

    @app.get("/healthz")
    def healthz():
        if health is None:
            return jsonify(status="ok", hotkey=hotkey_ss58)
        healthy, report = health.check()
        return jsonify(hotkey=hotkey_ss58, **report), 200 if healthy else 503

    @app.post("/challenge")
    def challenge():
        try:
            body = request.get_json(silent=True)
        except RecursionError:  # JSON nested deeper than Python's stack (60 KB of "["): not a challenge
            body = None
        if not isinstance(body, dict):
            return refuse(400, "invalid", "bad request", "body must be a signed JSON envelope")
        claimed = body.get("hotkey")
        if not isinstance(claimed, str):
            return refuse(401, "invalid", "rejected", "not a signed envelope: no hotkey")
        if not validators.allows(claimed):  # before the signature: costs a set lookup, stores no nonce
            return refuse(
                403,
                "refused",
                "not a validator",
                f"{claimed[:64]!r} is not a validator on the chain; only validators send spot checks",
            )
        if nests_deeper(body, MAX_NESTING):  # parsed, but re-encoding it for the signature check could blow the stack
            return refuse(
                400, "invalid", "bad request", f"body nests deeper than {MAX_NESTING} levels: not a signed challenge"
            )
        try:
            asked = Challenge.model_validate(verifier.verify(body))
        except VerificationError as error:
            return refuse(401, "invalid", "rejected", f"{type(error).__name__}: {error}")
        except ValidationError as error:
            return refuse(400, "invalid", "bad challenge", error.errors()[0]["msg"])
        if asked.miner_hotkey != hotkey_ss58:
            return refuse(403, "refused", "wrong miner", f"this is {hotkey_ss58}")
        if (beyond := limits.refusal(asked)) is not None:
            return refuse(400, "invalid", "bad challenge", beyond)
        if not limiter.allow(claimed):
            return refuse(
                429, "limited", "rate limited", f"more than {limits.rate:g} challenges per second from this validator"
            )
        item = PendingChallenge(asked, claimed, body["nonce"])
        if not challenges.submit(item):
            return refuse(503, "limited", "busy", f"{limits.pending} challenges of this validator are already waiting")
        try:
            answer = item.future.result(timeout=limits.timeout_s)
        except TimeoutError:
            item.future.cancel()
            return refuse(503, "expired", "timeout", "the training loop did not answer in time")
        except Exception as error:  # the computation failed on our side (logged where it ran)
            return jsonify(error="spot check failed", detail=repr(error)[:200]), 500
        return jsonify(answer)

    return app


class ChallengeServer:
    """Serves the challenge app with waitress from a thread; the training loop calls ``answer_pending`` between
    steps."""

    def __init__(
        self,
        wallet,
        host: str,
        port: int,
        validators: ValidatorList,
        limits: ChallengeLimits = ChallengeLimits(),
        *,
        domain: Domain,
        window_s: float = 120.0,
        prepare: Callable[[Challenge], Any] | None = None,
        health: TrainingHealth | None = None,
        metrics: MinerMetrics | None = None,
    ):
        self.wallet = wallet
        self.verifier = Verifier.in_memory(
            domain, window_s=window_s
        )  # challenges of other runs and subnets are refused
        self.hotkey = wallet.hotkey.ss58_address
        self.metrics = metrics
        self.queue = ChallengeQueue(limits.pending, prepare)
        app = create_challenge_app(
            self.hotkey, self.verifier, validators, limits, self.queue, health=health, metrics=metrics
        )
        self.app = app  # what it serves: its routes are in app.url_map
        self._server = waitress.create_server(
            app,
            host=host,
            port=port,
            threads=SERVER_THREADS,
            connection_limit=MAX_CONNECTIONS,
            channel_timeout=CONNECTION_TIMEOUT_S,
            max_request_body_size=MAX_BODY_BYTES,
            max_request_header_size=MAX_BODY_BYTES,
            ident="hivetrain-miner",
            expose_tracebacks=False,
        )
        self.port = self._server.effective_port
        self._thread = threading.Thread(target=self._server.run, name="challenge-http", daemon=True)

    def start(self) -> "ChallengeServer":
        self._thread.start()
        logger.info(f"spot-check endpoint listening on port {self.port}")
        return self

    def answer_pending(self, compute: Callable[[Challenge, Any], tuple[int, list[float]]]) -> int:
        """Answer every queued challenge with ``compute(challenge, batch) -> (epoch, projection list)``; returns how
        many."""
        answered = 0
        while (item := self.queue.take()) is not None:
            try:
                if not item.future.set_running_or_notify_cancel():
                    continue  # its request gave up waiting
                try:
                    epoch, projection = compute(item.challenge, item.batch)
                    answer = SpotCheckAnswer(
                        challenge_nonce=item.nonce,
                        validator=item.validator,
                        epoch=epoch,
                        block_index=item.challenge.block_index,
                        projection=projection,
                    )
                    item.future.set_result(sign(self.wallet, self.verifier.domain, answer.model_dump(mode="json")))
                    outcome = "answered"
                except Exception as error:  # a bad challenge must not stop training
                    logger.exception(f"spot check from {item.validator} failed")
                    item.future.set_exception(error)
                    outcome = "failed"
            finally:
                self.queue.done(item)
            if self.metrics is not None:
                self.metrics.challenges.labels(outcome=outcome).inc()
            answered += 1
        return answered

    def stop(self) -> None:
        """Close every connection, fail what waits, stop the threads."""
        server = self._server
        pulled = False
        if self._thread.is_alive():  # the event loop closes its own sockets, then returns
            try:
                server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map))
                pulled = True
            except OSError:  # the loop already closed its trigger on its way out (seen once in CI: EBADF)
                pass
            self._thread.join(timeout=5)
        if not pulled:
            wasyncore.close_all(server._map)
        self.queue.close()
        server.task_dispatcher.shutdown(timeout=5)
