"""The bootstrap's HTTP API: a stateless Flask app that answers from Redis alone.

Served by ``gunicorn 'hivetrain.bootstrap.app:create_app()'`` with settings from ``HIVE_*``
environment variables. Every worker reads the same Redis, so workers (and bootstrap replicas)
need no shared memory; each reuses its ``/initial_peers`` answer for a second (``AnswerCache``),
so a burst of joining miners costs one Redis read per worker per second. Prometheus metrics are per worker: each
gunicorn worker has its own
counters, so a scrape sees the worker that answered it; sum over scrapes or run one worker
where exact totals matter. The live-peer gauges are read from Redis on every scrape and so
agree across workers.
"""

from __future__ import annotations

import time

import redis
from flask import Flask, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, generate_latest

from hivetrain.admission import HotkeyGate, registration_gate
from hivetrain.bootstrap.ingest import TelemetryIngest
from hivetrain.log import get_logger
from hivetrain.protocol.records import MAX_REGISTRATION_BYTES, Keys
from hivetrain.settings import BootstrapSettings, domain_of
from hivetrain.store import Refused, Registry, connect_redis
from hivetrain.webapp import ANSWER_CACHE_S, AnswerCache, HttpMetrics, install, int_arg, json_body, settings_or_exit

logger = get_logger(__name__)

#: Roles whose addresses /initial_peers hands out; bootstraps come from their own records.
SERVED_ROLES = ("miner", "validator")
#: Addresses one miner or validator may put in an answer (a peer has a few: TCP, QUIC, IPv4/IPv6).
ADDRS_PER_PEER = 4
#: The largest body a POST may have: a full telemetry batch of typical entries (about 1 kB each) fits twice.
MAX_BODY_BYTES = 1024 * 1024


class Metrics(HttpMetrics):
    """The bootstrap's Prometheus metrics: requests, plus the registry's size read at scrape time."""

    def __init__(self) -> None:
        super().__init__("hive_bootstrap")
        self.live_peers = Gauge(
            "hive_bootstrap_live_peers", "peers whose registration has not expired", registry=self.registry
        )
        self.ingested = Counter(
            "hive_bootstrap_ingest_entries",
            "telemetry entries peers posted, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.live_bootstraps = Gauge(
            "hive_bootstrap_live_bootstraps", "bootstrap DHTs whose record has not expired", registry=self.registry
        )


def gather_initial_peers(registry: Registry, limit: int) -> list[str]:
    """Live bootstraps' addresses first, then the freshest miners' and validators', deduplicated, at most ``limit``.

    A peer contributes at most ``ADDRS_PER_PEER`` addresses, so one registration cannot fill the answer.
    """
    addrs: list[str] = []
    for record in registry.bootstraps():
        addrs.extend(record.multiaddrs)
    for peer in registry.live_peers(limit=limit):
        if peer.role in SERVED_ROLES:
            addrs.extend(peer.multiaddrs[:ADDRS_PER_PEER])
    return list(dict.fromkeys(addrs))[:limit]


def create_app(settings: BootstrapSettings | None = None, cache_s: float = ANSWER_CACHE_S) -> Flask:
    """Build the app; with no ``settings`` they come from the ``HIVE_*`` environment (exits with a fix-it message if
    invalid).

    ``/initial_peers`` answers are reused for ``cache_s`` seconds per worker (0: every request reads Redis).
    """
    settings = settings_or_exit(BootstrapSettings, settings)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    registry = Registry(connect_redis(settings.redis_url), Keys(settings.run_id), domain_of(settings))
    metrics = Metrics()
    app.extensions["hivetrain.bootstrap"] = {"settings": settings, "registry": registry, "metrics": metrics}
    install(app, metrics, "bootstrap")
    _register_routes(app, settings, registry, metrics, AnswerCache(cache_s))
    ingest = TelemetryIngest(registry, settings.ingest_per_minute)
    _register_ingest(app, registry, ingest, metrics, registration_gate(settings))
    return app


def _register_ingest(
    app: Flask, registry: Registry, ingest: TelemetryIngest, metrics: Metrics, admits: HotkeyGate | None = None
) -> None:
    """Where miners write: they hold no Redis credential that writes (the registry's keys, its index and the
    telemetry streams are the bootstrap's to write), so every write is checked here first. ``admits``: the
    hotkeys whose registrations are stored (None: any hotkey)."""

    def refused(error: Refused):
        return jsonify(error="refused", message=str(error)), error.status

    @app.post("/v1/peers")
    def register_peer():
        try:
            record = registry.store_signed(
                request.get_data(cache=False)[: MAX_REGISTRATION_BYTES + 1],
                source=request.remote_addr or "",
                admits=admits,
            )
        except Refused as error:
            return refused(error)
        return jsonify(status="registered", peer_id=record.peer_id, ttl_s=registry.ttl_s)

    @app.post("/v1/peers/leave")
    def leave():
        try:
            peer_id = registry.remove_signed(request.get_data(cache=False)[: MAX_REGISTRATION_BYTES + 1])
        except Refused as error:
            return refused(error)
        return jsonify(status="removed", peer_id=peer_id)

    @app.post("/v1/telemetry")
    def telemetry():
        body = json_body(max_nesting=3)
        try:
            answer = ingest.accept(body)
        except Refused as error:
            metrics.ingested.labels(outcome=f"deferred {error.status}").inc()
            return refused(error)
        metrics.ingested.labels(outcome="stored").inc(answer["stored"])
        metrics.ingested.labels(outcome="refused").inc(len(answer["refused"]))
        metrics.ingested.labels(outcome="duplicate").inc(len(answer["duplicates"]))
        return jsonify(answer)


def _register_routes(
    app: Flask, settings: BootstrapSettings, registry: Registry, metrics: Metrics, cache: AnswerCache
) -> None:
    def initial_peers():
        limit = int_arg("limit", settings.max_initial_peers, 1, settings.max_initial_peers)
        response = jsonify(initial_peers=cache.get(limit, lambda: gather_initial_peers(registry, limit)))
        response.headers["Cache-Control"] = "no-store"
        return response

    # /return_dht_address is the path the original HiveMiner miners call; same answer
    app.add_url_rule("/initial_peers", "initial_peers", initial_peers, methods=["GET"])
    app.add_url_rule("/return_dht_address", "return_dht_address", initial_peers, methods=["GET"])

    @app.get("/readyz")
    def readyz():
        try:
            registry.client.ping()
            bootstraps = registry.bootstraps()
        except redis.RedisError as error:
            metrics.redis_errors.inc()
            return jsonify(status="unavailable", reason=f"redis did not answer: {error}"), 503
        if not bootstraps:
            return jsonify(
                status="unavailable", reason="no live bootstrap record: the DHT peer has not published its addresses"
            ), 503
        return jsonify(status="ok", bootstraps=[b.peer_id for b in bootstraps])

    @app.get("/metrics")
    def prometheus_metrics():
        try:
            metrics.live_peers.set(
                registry.client.zcount(registry.keys.peer_index, time.time() - registry.ttl_s, "+inf")
            )
            metrics.live_bootstraps.set(len(registry.bootstraps()))
        except redis.RedisError:  # the gauges keep their last values; the counters still matter
            metrics.redis_errors.inc()
        return Response(generate_latest(metrics.registry), mimetype=CONTENT_TYPE_LATEST)
