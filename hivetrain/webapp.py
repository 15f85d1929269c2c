"""What every HiveMiner Flask app shares: JSON errors, per-route request metrics, settings from the env."""

from __future__ import annotations

import re
import threading
import time
from typing import Any, TypeVar

import redis
from flask import Flask, g, jsonify, request
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import ValidationError
from werkzeug.exceptions import BadRequest, HTTPException

from hivetrain.log import get_logger
from hivetrain.settings import ServiceSettings, format_errors

logger = get_logger(__name__)
S = TypeVar("S", bound=ServiceSettings)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_INT = re.compile(r"[0-9]{1,6}")  # plain ASCII digits: int() would also take " 2" and "1_0"


def int_arg(name: str, default: int, low: int, high: int) -> int:
    """Query parameter ``name`` as an integer in [low, high]; a JSON 400 that says so otherwise."""
    raw = request.args.get(name)
    if raw is None:
        return default
    if not _INT.fullmatch(raw) or not low <= int(raw) <= high:
        raise BadRequest(f"{name} must be an integer from {low} to {high}, got {raw[:40]!r}")
    return int(raw)


def nests_deeper(value: Any, limit: int) -> bool:
    """Whether JSON ``value`` has lists or dicts nested more than ``limit`` deep (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def json_body(max_nesting: int) -> Any:
    """The request's JSON body, or a 400 that says why not (not JSON, nested deeper than ``max_nesting``)."""
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # nested deeper than Python's stack
        body = None
    if body is None or nests_deeper(body, max_nesting):
        raise BadRequest(f"the body must be JSON nested at most {max_nesting} levels deep")
    return body


#: How long a worker reuses a computed answer of a read-only route (registrations live 30 s and beat every 10 s).
ANSWER_CACHE_S = 1.0


class AnswerCache:
    """Answers computed at most once per ``ttl_s`` per worker, by key; concurrent requests for a
    stale answer wait for the one request computing it, so a burst costs one Redis read, not one each."""

    def __init__(self, ttl_s: float = ANSWER_CACHE_S, max_keys: int = 256):
        self.ttl_s, self.max_keys = ttl_s, max_keys
        self._answers: dict = {}
        self._lock = threading.Lock()

    def get(self, key, compute):
        if self.ttl_s <= 0:
            return compute()
        with self._lock:
            now = time.monotonic()
            cached = self._answers.get(key)
            if cached is not None and now - cached[0] < self.ttl_s:
                return cached[1]
            value = compute()  # under the lock: one computation per stale key, the others wait for it
            if len(self._answers) >= self.max_keys:
                self._answers.clear()
            self._answers[key] = (time.monotonic(), value)
            return value


class HttpMetrics:
    """Requests by route and status, latency, and Redis failures, in a registry of the app's own
    (so tests can build many apps; each gunicorn worker counts its own requests)."""

    def __init__(self, prefix: str) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            f"{prefix}_http_requests",
            "HTTP requests answered, by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            f"{prefix}_http_request_duration_seconds",
            "time to answer an HTTP request",
            ["route"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.redis_errors = Counter(
            f"{prefix}_redis_errors", "requests that failed because Redis did not answer", registry=self.registry
        )


def settings_or_exit(model: type[S], settings: S | None) -> S:
    """``settings`` as given, or read from the ``HIVE_*`` environment (exits with a fix-it message if invalid)."""
    if settings is not None:
        return settings
    try:
        return model()
    except ValidationError as error:
        raise SystemExit(format_errors(model, error)) from None


def install(app: Flask, metrics: HttpMetrics, service: str) -> None:
    """``/healthz``, JSON for every error (4xx as the request deserves, 503 while Redis is away), request metrics."""

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        response = error.get_response()  # keeps headers such as Allow on a 405
        response.set_data(app.json.dumps({"error": error.name, "message": error.description}))
        response.content_type = "application/json"
        return response

    @app.errorhandler(redis.RedisError)
    def redis_down(error: redis.RedisError):
        metrics.redis_errors.inc()
        logger.warning(f"{request.path}: redis did not answer ({error!r})")
        return jsonify(error="redis unavailable", message=f"the {service}'s Redis is unreachable; retry shortly"), 503

    @app.errorhandler(Exception)
    def unexpected(error: Exception):
        logger.exception(f"{request.method} {request.path} failed")
        return jsonify(error="internal error", message=f"unexpected server error; see the {service}'s log"), 500

    @app.get("/healthz")
    def healthz():
        return jsonify(status="ok")  # the process answers; /readyz says whether it can serve

    @app.before_request
    def _start_timer():
        g.hive_started = time.perf_counter()

    @app.after_request
    def _count(response):
        # the matched rule, not the raw path, so unknown paths cannot blow up label cardinality
        route = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
        metrics.requests.labels(route=route, status=str(response.status_code)).inc()
        started = g.get("hive_started")
        if started is not None:
            metrics.latency.labels(route=route).observe(time.perf_counter() - started)
        return response
