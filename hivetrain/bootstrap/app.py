"""The bootstrap's HTTP API: a stateless Flask app that answers from Redis alone.

Served by ``gunicorn 'hivetrain.bootstrap.app:create_app()'`` with settings from ``HIVE_*``
environment variables. Every worker reads the same Redis, so workers (and bootstrap replicas)
need no shared memory. Prometheus metrics are per worker: each gunicorn worker has its own
counters, so a scrape sees the worker that answered it; sum over scrapes or run one worker
where exact totals matter. The live-peer gauges are read from Redis on every scrape and so
agree across workers.
"""

from __future__ import annotations

import re
import time

import redis
from flask import Flask, Response, g, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import ValidationError
from werkzeug.exceptions import BadRequest, HTTPException

from hivetrain.contracts import Keys
from hivetrain.logging import get_logger
from hivetrain.settings import BootstrapSettings, format_errors
from hivetrain.store import Registry, connect

logger = get_logger(__name__)

#: Roles whose addresses /initial_peers hands out; bootstraps come from their own records.
SERVED_ROLES = ("miner", "validator")
_LIMIT = re.compile(r"[0-9]{1,6}")


class Metrics:
    """This app's Prometheus metrics, in a registry of their own so tests can build many apps."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("hive_bootstrap_http_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("hive_bootstrap_http_request_duration_seconds", "time to answer an HTTP request",
                                 ["route"], registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
        self.redis_errors = Counter("hive_bootstrap_redis_errors", "requests that failed because Redis did not answer",
                                    registry=self.registry)
        self.live_peers = Gauge("hive_bootstrap_live_peers", "peers whose registration has not expired",
                                registry=self.registry)
        self.live_bootstraps = Gauge("hive_bootstrap_live_bootstraps", "bootstrap DHTs whose record has not expired",
                                     registry=self.registry)


def gather_initial_peers(registry: Registry, limit: int) -> list[str]:
    """Live bootstraps' addresses first, then the freshest miners' and validators', deduplicated, at most ``limit``."""
    addrs: list[str] = []
    for record in registry.bootstraps():
        addrs.extend(record.multiaddrs)
    for peer in registry.live_peers(limit=limit):
        if peer.role in SERVED_ROLES:
            addrs.extend(peer.multiaddrs)
    return list(dict.fromkeys(addrs))[:limit]


def create_app(settings: BootstrapSettings | None = None) -> Flask:
    """Build the app; with no ``settings`` they come from the ``HIVE_*`` environment (exits with a fix-it message if invalid)."""
    if settings is None:
        try:
            settings = BootstrapSettings()
        except ValidationError as error:
            raise SystemExit(format_errors(BootstrapSettings, error)) from None
    app = Flask(__name__)
    registry = Registry(connect(settings.redis_url), Keys(settings.run_id))
    metrics = Metrics()
    app.extensions["hivetrain.bootstrap"] = {"settings": settings, "registry": registry, "metrics": metrics}
    _register_metrics_hooks(app, metrics)
    _register_error_handlers(app, metrics)
    _register_routes(app, settings, registry, metrics)
    return app


def _register_routes(app: Flask, settings: BootstrapSettings, registry: Registry, metrics: Metrics) -> None:
    def initial_peers():
        limit = _parse_limit(request.args.get("limit"), settings.max_initial_peers)
        response = jsonify(initial_peers=gather_initial_peers(registry, limit))
        response.headers["Cache-Control"] = "no-store"
        return response

    # /return_dht_address is the path the original HiveMiner miners call; same answer
    app.add_url_rule("/initial_peers", "initial_peers", initial_peers, methods=["GET"])
    app.add_url_rule("/return_dht_address", "return_dht_address", initial_peers, methods=["GET"])

    @app.get("/healthz")
    def healthz():
        return jsonify(status="ok")

    @app.get("/readyz")
    def readyz():
        try:
            registry.client.ping()
            bootstraps = registry.bootstraps()
        except redis.RedisError as error:
            metrics.redis_errors.inc()
            return jsonify(status="unavailable", reason=f"redis did not answer: {error}"), 503
        if not bootstraps:
            return jsonify(status="unavailable", reason="no live bootstrap record: the DHT peer has not published its addresses"), 503
        return jsonify(status="ok", bootstraps=[b.peer_id for b in bootstraps])

    @app.get("/metrics")
    def prometheus_metrics():
        try:
            metrics.live_peers.set(registry.client.zcount(registry.keys.peer_index, time.time() - registry.ttl_s, "+inf"))
            metrics.live_bootstraps.set(len(registry.bootstraps()))
        except redis.RedisError:  # the gauges keep their last values; the counters still matter
            metrics.redis_errors.inc()
        return Response(generate_latest(metrics.registry), mimetype=CONTENT_TYPE_LATEST)


def _parse_limit(raw: str | None, maximum: int) -> int:
    if raw is None:
        return maximum
    if not _LIMIT.fullmatch(raw) or not 1 <= int(raw) <= maximum:
        raise BadRequest(f"limit must be an integer from 1 to {maximum}, got {raw[:40]!r}")
    return int(raw)


def _register_error_handlers(app: Flask, metrics: Metrics) -> None:
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
        return jsonify(error="redis unavailable", message="the peer registry is unreachable; retry shortly"), 503

    @app.errorhandler(Exception)
    def unexpected(error: Exception):
        logger.exception(f"{request.method} {request.path} failed")
        return jsonify(error="internal error", message="unexpected server error; see the bootstrap's log"), 500


def _register_metrics_hooks(app: Flask, metrics: Metrics) -> None:
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
