"""The miner's spot-check endpoint: validators send signed challenges, the training loop answers them.

A challenge names a batch of this miner's own shard and a projection seed. The HTTP thread only
verifies and queues it; the training loop computes the projected gradient between two steps, at
the parameters it trains with, so nothing races the optimizer and a miner cannot answer without
doing the work on the model it actually has. The answer is signed with the miner's hotkey and
names the challenge's nonce, so it cannot be reused for another challenge.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from flask import Flask, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException
from werkzeug.serving import make_server

from hivetrain.identity import VerificationError, Verifier, sign
from hivetrain.log import get_logger
from hivetrain.miner.metrics import MinerMetrics
from hivetrain.protocol.spotcheck import Challenge, SpotCheckAnswer

logger = get_logger(__name__)


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


@dataclass
class PendingChallenge:
    challenge: Challenge
    validator: str
    nonce: str
    future: Future = field(default_factory=Future)


def create_challenge_app(hotkey_ss58: str, verifier: Verifier, limiter: TokenBucket,
                         pending: "queue.Queue[PendingChallenge]", timeout_s: float = 30.0,
                         registry: CollectorRegistry | None = None) -> Flask:
    """Flask app with ``POST /challenge`` (signed requests only), ``GET /healthz`` and, given a
    ``registry``, ``GET /metrics`` (Prometheus text format)."""
    app = Flask("hivetrain.miner.challenge")

    if registry is not None:
        @app.get("/metrics")
        def prometheus_metrics():
            return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException):
        return jsonify(error=error.name, detail=error.description), error.code

    @app.get("/healthz")
    def healthz():
        return jsonify(status="ok", hotkey=hotkey_ss58)

    @app.post("/challenge")
    def challenge():
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            return jsonify(error="body must be a signed JSON envelope"), 400
        try:
            payload = verifier.verify(body)
            asked = Challenge.model_validate(payload)
        except VerificationError as error:
            return jsonify(error="rejected", detail=f"{type(error).__name__}: {error}"), 401
        except ValidationError as error:
            return jsonify(error="bad challenge", detail=error.errors()[0]["msg"]), 400
        validator = body["hotkey"]
        if asked.miner_hotkey != hotkey_ss58:
            return jsonify(error="wrong miner", detail=f"this is {hotkey_ss58}"), 403
        if not limiter.allow(validator):
            return jsonify(error="rate limited", detail="too many challenges from this hotkey"), 429
        item = PendingChallenge(asked, validator, body["nonce"])
        try:
            pending.put_nowait(item)
        except queue.Full:
            return jsonify(error="busy", detail="too many challenges waiting"), 503
        try:
            answer = item.future.result(timeout=timeout_s)
        except TimeoutError:
            item.future.cancel()
            return jsonify(error="timeout", detail="the training loop did not answer in time"), 503
        except Exception as error:  # the computation failed on our side (logged where it ran)
            return jsonify(error="spot check failed", detail=repr(error)), 500
        return jsonify(answer)

    return app


class ChallengeServer:
    """Serves the challenge app from a thread; the training loop drains ``pending`` between steps."""

    def __init__(self, wallet, host: str, port: int, rate: float, burst: int, window_s: float, timeout_s: float = 30.0,
                 metrics: MinerMetrics | None = None):
        self.wallet = wallet
        self.hotkey = wallet.hotkey.ss58_address
        self.metrics = metrics
        self.pending: queue.Queue[PendingChallenge] = queue.Queue(maxsize=32)
        app = create_challenge_app(self.hotkey, Verifier.in_memory(window_s=window_s), TokenBucket(rate, burst),
                                   self.pending, timeout_s, registry=None if metrics is None else metrics.registry)
        self._server = make_server(host, port, app, threaded=True)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="challenge-http", daemon=True)

    def start(self) -> "ChallengeServer":
        self._thread.start()
        logger.info(f"spot-check endpoint listening on port {self.port}")
        return self

    def answer_pending(self, compute) -> int:
        """Answer every queued challenge with ``compute(challenge) -> (epoch, projection list)``; returns how many."""
        answered = 0
        while True:
            try:
                item = self.pending.get_nowait()
            except queue.Empty:
                return answered
            if item.future.cancelled():
                continue
            try:
                epoch, projection = compute(item.challenge)
                answer = SpotCheckAnswer(challenge_nonce=item.nonce, validator=item.validator, epoch=epoch,
                                         block_index=item.challenge.block_index, projection=projection)
                item.future.set_result(sign(self.wallet, answer.model_dump(mode="json")))
                outcome = "answered"
            except Exception as error:  # a bad challenge must not stop training
                logger.exception("spot check failed")
                item.future.set_exception(error)
                outcome = "failed"
            if self.metrics is not None:
                self.metrics.challenges.labels(outcome=outcome).inc()
            answered += 1

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=5)
