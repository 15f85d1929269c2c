"""The validator's HTTP API: a stateless Flask app that answers from Redis alone.

The validator service process writes everything this app reads (its score board, evaluations,
its alive key); miners write registrations and telemetry. Served by
``gunicorn 'hivetrain.validator.app:create_app()'`` (a child the validator supervises: ``Runtime.serve``) with
settings from ``HIVE_*`` environment variables, so workers share nothing but Redis.

Telemetry is attributed with care: a miner's latest step counts only if it was signed by the
hotkey the miner registered with, so a record signed by anyone else cannot speak for it.
The dashboard (``GET /``, its data at ``/api/dashboard``) remembers, per worker, the telemetry it
has read (``hivetrain.validator.dashboard``), so each poll reads and verifies only what is new.
Prometheus counters are per worker (as in the bootstrap); the gauges are read from Redis on
every scrape and so agree across workers.
"""

from __future__ import annotations

import math
import re
import time

import redis
from flask import Flask, Response, jsonify, request, send_from_directory
from flask.json.provider import DefaultJSONProvider
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest
from werkzeug.exceptions import BadRequest, NotFound

from hivetrain.identity import Domain, load_or_create_wallet
from hivetrain.log import get_logger
from hivetrain.protocol.envelopes import decode_entry
from hivetrain.protocol.records import (
    EVALS_STREAM_MAXLEN,
    EvalRecord,
    Keys,
    PeerRecord,
    RoundRecord,
    ScoreBoard,
    StepRecord,
    ValidatorStatus,
)
from hivetrain.protocol.rounds import rounds_from_records
from hivetrain.settings import ValidatorSettings, domain_of
from hivetrain.store import Registry, connect_redis, read_stream
from hivetrain.validator.dashboard import EVALS_SHOWN as DASHBOARD_EVALS
from hivetrain.validator.dashboard import TelemetryHistory
from hivetrain.webapp import ANSWER_CACHE_S, AnswerCache, HttpMetrics, install, int_arg, settings_or_exit

logger = get_logger(__name__)

#: Newest step and round records each /api/swarm request reads (the streams hold up to 100k).
RECORDS_READ = 2000
#: Averaging rounds /api/swarm lists, newest last.
ROUNDS_SHOWN = 20
#: Live peers listed at most.
MAX_PEERS = 1000
DEFAULT_EVALS = 100
MAX_EVALS = EVALS_STREAM_MAXLEN
STEP_FIELDS = ("step", "local_epoch", "global_epoch", "loss", "samples", "tokens_per_s", "time")
PEER_FIELDS = ("peer_id", "role", "hotkey", "device", "preset", "multiaddrs", "last_seen")
_HOTKEY = re.compile(r"[A-Za-z0-9]{40,60}")
#: The page loads only its own script, style and data: no CDN, no inline code, no framing.
DASHBOARD_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


class Metrics(HttpMetrics):
    """The validator API's Prometheus metrics: requests, plus gauges read from Redis at scrape time."""

    def __init__(self) -> None:
        super().__init__("hive_validator")
        self.eval_loss = Gauge(
            "hive_validator_latest_eval_loss",
            "loss of the newest evaluation in the evals stream (NaN before the first)",
            registry=self.registry,
        )
        self.eval_loss.set(math.nan)
        self.scored_miners = Gauge(
            "hive_validator_scored_miners", "miners on this validator's score board", registry=self.registry
        )
        self.live_miners = Gauge(
            "hive_validator_live_miners", "miners whose signed registration has not expired", registry=self.registry
        )


class _FiniteJSON(DefaultJSONProvider):
    """Non-finite floats (a diverged loss, an overflowed perplexity) become null: NaN is not JSON."""

    def dumps(self, obj, **kwargs) -> str:
        return super().dumps(_finite(obj), **kwargs)


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def create_app(settings: ValidatorSettings | None = None, cache_s: float = ANSWER_CACHE_S) -> Flask:
    """Build the app; with no ``settings`` they come from the ``HIVE_*`` environment (exits with a fix-it message if
    invalid).

    ``/api/swarm`` answers (thousands of signature checks each) are reused for ``cache_s`` seconds per worker.
    """
    settings = settings_or_exit(ValidatorSettings, settings)
    hotkey = load_or_create_wallet(
        settings.wallet_dir, settings.wallet_name, settings.wallet_hotkey
    ).hotkey.ss58_address
    app = Flask(__name__)
    app.json = _FiniteJSON(app)
    registry = Registry(connect_redis(settings.redis_url), Keys(settings.run_id), domain_of(settings))
    metrics = Metrics()
    app.extensions["hivetrain.validator"] = {
        "settings": settings,
        "hotkey": hotkey,
        "registry": registry,
        "metrics": metrics,
    }
    install(app, metrics, "validator")
    app.after_request(_no_store)
    _register_api_routes(app, registry, hotkey, AnswerCache(cache_s))
    _register_dashboard_routes(app, registry, hotkey)
    _register_ops_routes(app, registry, hotkey, metrics)
    return app


# --- what the routes answer -----------------------------------------------------------------


def signed_steps(client: redis.Redis, keys: Keys, domain: Domain, count: int) -> list[tuple[StepRecord, str]]:
    """The last ``count`` steps signed in ``domain``, with the hotkey that signed each, oldest first."""
    entries = reversed(client.xrevrange(keys.steps, count=count))
    decoded = (decode_entry(StepRecord, fields, domain) for _, fields in entries)
    return [d for d in decoded if d is not None]


def swarm_view(registry: Registry, records_read: int = RECORDS_READ, rounds_shown: int = ROUNDS_SHOWN) -> dict:
    """Live peers, each miner's latest step, the swarm's epoch and throughput, the latest averaging rounds."""
    client, keys, domain = registry.client, registry.keys, registry.domain
    peers = registry.live_peers(limit=MAX_PEERS)
    registered = {peer.peer_id: peer.hotkey for peer in peers if peer.role == "miner"}
    latest: dict[str, StepRecord] = {}
    for step, signer in signed_steps(client, keys, domain, records_read):  # oldest first: the newest wins
        if registered.get(step.peer_id) == signer:
            latest[step.peer_id] = step
    rounds = rounds_from_records(read_stream(client, keys, domain, RoundRecord, count=records_read))
    return {
        "run_id": keys.run_id,
        "validator_time": time.time(),
        "peers": [_peer_view(peer, latest.get(peer.peer_id)) for peer in peers],
        "global_epoch": max((step.global_epoch for step in latest.values()), default=None),
        "throughput_tokens_per_s": sum(step.tokens_per_s for step in latest.values()),
        "rounds": rounds[-rounds_shown:],
    }


def _peer_view(peer: PeerRecord, step: StepRecord | None) -> dict:
    view = peer.model_dump(mode="json", include=set(PEER_FIELDS))
    view["latest_step"] = None if step is None else step.model_dump(mode="json", include=set(STEP_FIELDS))
    return view


def read_board(client: redis.Redis, keys: Keys, validator: str) -> ScoreBoard | None:
    """``validator``'s score board, or None before it first set weights."""
    raw = client.get(keys.scores(validator))
    return None if raw is None else ScoreBoard.from_json(raw)


def _register_api_routes(app: Flask, registry: Registry, hotkey: str, cache: AnswerCache) -> None:
    client, keys, domain = registry.client, registry.keys, registry.domain

    @app.get("/api/swarm")
    def swarm():
        return jsonify(cache.get("swarm", lambda: swarm_view(registry)))

    @app.get("/api/scores")
    def scores():
        validator = request.args.get("validator", hotkey)
        if not _HOTKEY.fullmatch(validator):
            raise BadRequest(f"validator must be an ss58 hotkey (40 to 60 letters and digits), got {validator[:80]!r}")
        try:
            board = read_board(client, keys, validator)
        except ValueError as error:  # a writer bug, not the caller's: say so without a 500
            logger.error(f"score board of {validator} in Redis does not match ScoreBoard: {error}")
            return jsonify(
                error="score board unreadable",
                message="the stored score board is malformed; it is rewritten when weights are next set",
            ), 503
        if board is None:
            raise NotFound(
                f"validator {validator} has not scored yet in run {keys.run_id}: "
                "its score board appears once it first sets weights"
            )
        return jsonify(board.model_dump(mode="json"))

    @app.get("/api/evals")
    def evals():
        limit = int_arg("limit", DEFAULT_EVALS, 1, MAX_EVALS)
        records = [
            record.model_dump(mode="json") for record in read_stream(client, keys, domain, EvalRecord, count=limit)
        ]
        return jsonify(evals=records, latest=records[-1] if records else None, count=len(records))


def read_status(client: redis.Redis, keys: Keys, validator: str) -> ValidatorStatus | None:
    """``validator``'s status while it runs (None once its heartbeat lapsed, or if the record is unreadable)."""
    raw = client.get(keys.validator_alive(validator))
    try:
        return None if raw is None else ValidatorStatus.from_json(raw)
    except ValueError:
        return None


def _register_dashboard_routes(app: Flask, registry: Registry, hotkey: str) -> None:
    client, keys, domain = registry.client, registry.keys, registry.domain
    history = TelemetryHistory(client, keys, domain)

    @app.get("/")
    def dashboard_page():
        response = send_from_directory(app.static_folder, "dashboard.html", max_age=0)
        response.headers["Content-Security-Policy"] = DASHBOARD_CSP
        return response

    @app.get("/api/dashboard")
    def dashboard():
        history.refresh()
        try:
            board = read_board(client, keys, hotkey)
        except ValueError:  # a malformed board is logged by /api/scores; the page shows no scores meanwhile
            board = None
        evals = [
            e for e in read_stream(client, keys, domain, EvalRecord, count=DASHBOARD_EVALS) if e.validator == hotkey
        ]
        peers = registry.live_peers(limit=MAX_PEERS)
        return jsonify(history.view(peers, board, evals, read_status(client, keys, hotkey), hotkey))


def _register_ops_routes(app: Flask, registry: Registry, hotkey: str, metrics: Metrics) -> None:
    client, keys = registry.client, registry.keys

    @app.get("/readyz")
    def readyz():
        try:
            client.ping()
            alive = client.exists(keys.validator_alive(hotkey))
        except redis.RedisError as error:
            metrics.redis_errors.inc()
            return jsonify(status="unavailable", reason=f"redis did not answer: {error}"), 503
        if not alive:
            return jsonify(
                status="unavailable",
                reason=f"validator {hotkey} is not running: its alive key has expired or was never set",
            ), 503
        return jsonify(status="ok", validator=hotkey)

    @app.get("/metrics")
    def prometheus_metrics():
        try:
            latest = read_stream(client, keys, registry.domain, EvalRecord, count=1)
            metrics.eval_loss.set(latest[-1].loss if latest else math.nan)
            board = read_board(client, keys, hotkey)
            metrics.scored_miners.set(0 if board is None else len(board.miners))
            metrics.live_miners.set(len(registry.live_peers(limit=MAX_PEERS, role="miner")))
        except redis.RedisError:  # the gauges keep their last values; the counters still matter
            metrics.redis_errors.inc()
        except ValueError as error:
            logger.error(f"score board of {hotkey} in Redis does not match ScoreBoard: {error}")
        return Response(generate_latest(metrics.registry), mimetype=CONTENT_TYPE_LATEST)


def _no_store(response):
    """API answers are live state: no cache may keep them."""
    if request.path.startswith("/api/"):
        response.headers["Cache-Control"] = "no-store"
    return response
