"""Redis access for the registry and telemetry, on top of the contracts in ``hivetrain.protocol.records``.

Peer registrations and telemetry are stored as signed envelopes (``hivetrain.identity``): the
writer's hotkey signs the whole record for the run's ``Domain`` (run id and, on Bittensor, netuid).
Readers verify and drop what fails: a forged or altered record, one signed for another run or
subnet, a registration whose heartbeat stopped, a record whose payload names another hotkey.
Every reader and writer here takes the ``Domain`` along with the run's ``Keys``; the two must name
the same run.

Who writes what: the validator and the bootstrap hold Redis users that may write their run's keys;
a miner's only reads (``hivetrain.redis_server.role_rules``). A miner's registration and telemetry
go to the bootstrap (``BootstrapRegistry``, ``BootstrapSink``), which checks them and stores them
as signed (``Registry.store_signed``, ``TelemetryIngest``).

Training must never wait for Redis or the bootstrap: ``TelemetryWriter`` queues records and writes
them from a background thread, retrying with backoff while its sink is away and dropping the
oldest records once its bounded queue is full.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
import urllib.parse
from typing import Iterable

import redis

from hivetrain.identity import Domain, SignedEnvelope, VerificationError, Verifier, sign, verify_signature
from hivetrain.log import get_logger
from hivetrain.protocol.binding import binding_problem
from hivetrain.protocol.records import (
    BOOTSTRAP_TTL_S,
    EVALS_STREAM_MAXLEN,
    MAX_INGEST_ENTRIES,
    MAX_INGEST_ENTRY_BYTES,
    MAX_PEERS_PER_HOTKEY,
    MAX_REGISTRATION_BYTES,
    OFFENCES_STREAM_MAXLEN,
    PEER_TTL_S,
    ROUNDS_STREAM_MAXLEN,
    STEPS_STREAM_MAXLEN,
    BootstrapRecord,
    Departure,
    EvalRecord,
    Keys,
    OffenceRecord,
    PeerRecord,
    Record,
    RoundRecord,
    StepRecord,
)

logger = get_logger(__name__)


def redacted(url: str) -> str:
    """``url`` with its password replaced by ``***``: what logs and consoles may show."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def connect_redis(url: str, timeout: float = 2.0) -> redis.Redis:
    """A Redis client that fails fast (``timeout`` seconds) instead of hanging on a dead server."""
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=30)


#: Verdicts on peer-key bindings a Registry remembers (a binding costs a public-key signature check).
BINDINGS_KEPT = 10_000


def same_run(keys: Keys, domain: Domain) -> Domain:
    """``domain``, once it is checked to be a ``Domain`` of the run ``keys`` name (a wiring mistake otherwise)."""
    if not isinstance(domain, Domain):
        raise ValueError(f"pass the run's identity.Domain (Domain.of(settings)), not {type(domain).__name__}")
    if domain.run_id != keys.run_id:
        raise ValueError(f"keys of run {keys.run_id!r} with the signature domain of run {domain.run_id!r}: "
                         "build both from the same settings (Keys(s.run_id), Domain.of(s))")
    return domain


class Refused(ValueError):
    """A record the bootstrap's ingest will not store; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def signed_registration(record: PeerRecord, signer, domain: Domain) -> tuple[bytes, float]:
    """(the envelope to store, its time): ``record`` stamped now, with the signer's hotkey, signed for ``domain``."""
    now = time.time()
    record = record.model_copy(update={"last_seen": now, "hotkey": signer.hotkey.ss58_address})
    envelope = sign(signer, domain, record.model_dump(mode="json"), timestamp=now)
    envelope = SignedEnvelope.model_validate(envelope).model_dump_json().encode()
    if len(envelope) > MAX_REGISTRATION_BYTES:
        raise ValueError(f"registration of {record.peer_id} is {len(envelope)} bytes, over {MAX_REGISTRATION_BYTES}: "
                         "readers would drop it; register fewer or shorter addresses")
    return envelope, now


class Registry:
    """Live peers and bootstrap addresses; every entry expires unless its owner keeps beating.

    Trusted services (the validator, tests) write with ``register``; a miner, which holds no Redis
    credential that writes, sends its signed registration to the bootstrap, which checks it and
    stores it with ``store_signed``.
    """

    def __init__(self, client: redis.Redis, keys: Keys, domain: Domain, ttl_s: float = PEER_TTL_S):
        self.client, self.keys, self.ttl_s = client, keys, ttl_s
        self.domain = same_run(keys, domain)
        # registrations are re-read on every request: check signature and age, use up no nonce
        self.verifier = Verifier.in_memory(domain, window_s=ttl_s)
        self._bindings: dict[tuple[str, ...], str | None] = {}  # a peer's binding is checked once, not every read

    def register(self, record: PeerRecord, signer) -> None:
        """Write or refresh a peer's record, signed by ``signer`` (its wallet); call it every heartbeat."""
        envelope, now = signed_registration(record, signer, self.domain)
        self._store(record.peer_id, envelope, now)

    def _store(self, peer_id: str, envelope: bytes, signed_at: float, hotkey: str | None = None) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.peer(peer_id), envelope, ex=int(self.ttl_s))
            pipe.zadd(self.keys.peer_index, {peer_id: signed_at})
            pipe.zremrangebyscore(self.keys.peer_index, "-inf", signed_at - self.ttl_s)
            pipe.expire(self.keys.peer_index, int(self.ttl_s) * 4)
            if hotkey is not None:
                pipe.zadd(self.keys.hotkey_peers(hotkey), {peer_id: signed_at})
                pipe.expire(self.keys.hotkey_peers(hotkey), int(self.ttl_s) * 4)
            pipe.execute()

    def deregister(self, peer_id: str) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.peer(peer_id))
            pipe.zrem(self.keys.peer_index, peer_id)
            pipe.execute()

    def store_signed(self, raw: bytes, roles: tuple[str, ...] = ("miner",)) -> PeerRecord:
        """Store a registration its peer signed (the bootstrap's ``POST /v1/peers``); ``Refused`` says why not.

        Refused: a body over ``MAX_REGISTRATION_BYTES`` (413); a bad, stale or other-run signature,
        a record naming another hotkey, a peer id its libp2p key does not bind (401); a role not in
        ``roles`` (403); a new peer id for a hotkey that already has ``MAX_PEERS_PER_HOTKEY`` live (429).
        A replayed registration is stored as it was signed: it ages out with the signature's window.
        """
        if len(raw) > MAX_REGISTRATION_BYTES:
            raise Refused(f"a registration is at most {MAX_REGISTRATION_BYTES} bytes, got {len(raw)}", 413)
        try:
            envelope = self.verifier.authenticate(raw)
            record = PeerRecord.model_validate(envelope.payload)
        except (VerificationError, ValueError, RecursionError) as error:
            raise Refused(f"registration refused: {error}", 401) from None
        if record.hotkey != envelope.hotkey:
            raise Refused(f"registration refused: signed by {envelope.hotkey} for {record.hotkey}", 401)
        problem = self._binding_problem(record)
        if problem is not None:
            raise Refused(f"registration of {record.peer_id} refused: {problem}", 401)
        if record.role not in roles:
            raise Refused(f"role {record.role!r} cannot register through the bootstrap (only {', '.join(roles)})", 403)
        signed_at = min(envelope.timestamp, time.time())
        live = self.live_peer_ids_of(record.hotkey)
        if record.peer_id not in live and len(live) >= MAX_PEERS_PER_HOTKEY:
            raise Refused(f"hotkey {record.hotkey} already has {len(live)} live peers, the most one hotkey may have; "
                          "stop one or wait for its registration to expire", 429)
        self._store(record.peer_id, raw, signed_at, hotkey=record.hotkey)
        return record

    def remove_signed(self, raw: bytes) -> str:
        """Drop a registration on its own hotkey's signed ``Departure``; the peer id, or ``Refused``."""
        if len(raw) > MAX_REGISTRATION_BYTES:
            raise Refused(f"a departure is at most {MAX_REGISTRATION_BYTES} bytes, got {len(raw)}", 413)
        try:
            envelope = self.verifier.authenticate(raw)
            departure = Departure.model_validate(envelope.payload)
        except (VerificationError, ValueError, RecursionError) as error:
            raise Refused(f"departure refused: {error}", 401) from None
        stored = self._authentic_peer(departure.peer_id, self.client.get(self.keys.peer(departure.peer_id)))
        if stored is not None and stored.hotkey != envelope.hotkey:
            raise Refused(f"departure refused: {departure.peer_id} is registered by another hotkey", 403)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.peer(departure.peer_id))
            pipe.zrem(self.keys.peer_index, departure.peer_id)
            pipe.zrem(self.keys.hotkey_peers(envelope.hotkey), departure.peer_id)
            pipe.execute()
        return departure.peer_id

    def live_peer_ids_of(self, hotkey: str) -> set[str]:
        """The peer ids ``hotkey`` registered through the bootstrap that are still live."""
        key = self.keys.hotkey_peers(hotkey)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(key, "-inf", time.time() - self.ttl_s)
            pipe.zrange(key, 0, -1)
            _, members = pipe.execute()
        return {m.decode() for m in members}

    def live_peers(self, limit: int = 100, role: str | None = None) -> list[PeerRecord]:
        """The freshest live peers first; records that expired or fail validation are skipped."""
        cutoff = time.time() - self.ttl_s
        peer_ids = self.client.zrevrangebyscore(self.keys.peer_index, "+inf", cutoff, start=0, num=max(limit * 2, limit + 8))
        if not peer_ids:
            return []
        raws = self.client.mget([self.keys.peer(pid.decode()) for pid in peer_ids])
        peers = []
        for pid, raw in zip(peer_ids, raws):
            record = self._authentic_peer(pid.decode(), raw)
            if record is not None and (role is None or record.role == role):
                peers.append(record)
            if len(peers) >= limit:
                break
        return peers

    def _authentic_peer(self, peer_id: str, raw: bytes | None) -> PeerRecord | None:
        """The record if its hotkey signed it, it is fresh, and it is stored under its own peer id."""
        if raw is None:
            return None
        if len(raw) > MAX_REGISTRATION_BYTES:  # not even parsed: every reader of the registry would pay for it
            logger.warning(f"dropping registration of {peer_id}: {len(raw)} bytes, over {MAX_REGISTRATION_BYTES}")
            return None
        try:
            envelope = self.verifier.authenticate(raw)
            record = PeerRecord.model_validate(envelope.payload)
        except (VerificationError, ValueError) as error:
            logger.warning(f"dropping registration of {peer_id}: {error}")
            return None
        if record.hotkey != envelope.hotkey or record.peer_id != peer_id:
            logger.warning(f"dropping registration of {peer_id}: signed by {envelope.hotkey} for {record.hotkey}/{record.peer_id}")
            return None
        # the hotkey must prove it holds the peer id's libp2p key: else anyone could claim anyone's peer id
        problem = self._binding_problem(record)
        if problem is not None:
            logger.warning(f"dropping registration of {peer_id} by {record.hotkey}: {problem}")
            return None
        return record

    def _binding_problem(self, record: PeerRecord) -> str | None:
        key = (record.peer_id, record.hotkey, record.peer_key, record.peer_signature)
        if key not in self._bindings:
            if len(self._bindings) >= BINDINGS_KEPT:
                self._bindings.clear()
            self._bindings[key] = binding_problem(self.domain, *key)
        return self._bindings[key]

    def set_bootstrap(self, record: BootstrapRecord, ttl_s: float = BOOTSTRAP_TTL_S) -> None:
        now = time.time()
        record = record.model_copy(update={"last_seen": now})
        with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.bootstrap(record.peer_id), record.to_json(), ex=int(ttl_s))
            pipe.zadd(self.keys.bootstrap_index, {record.peer_id: now})
            pipe.zremrangebyscore(self.keys.bootstrap_index, "-inf", now - ttl_s)
            pipe.expire(self.keys.bootstrap_index, int(ttl_s) * 4)
            pipe.execute()

    def remove_bootstrap(self, peer_id: str) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.bootstrap(peer_id))
            pipe.zrem(self.keys.bootstrap_index, peer_id)
            pipe.execute()

    def bootstraps(self, ttl_s: float = BOOTSTRAP_TTL_S) -> list[BootstrapRecord]:
        """Live bootstrap DHTs, freshest first."""
        ids = self.client.zrevrangebyscore(self.keys.bootstrap_index, "+inf", time.time() - ttl_s)
        if not ids:
            return []
        raws = self.client.mget([self.keys.bootstrap(pid.decode()) for pid in ids])
        return [r for r in (_parse(BootstrapRecord, raw) for raw in raws) if r is not None]


def _parse(model: type[Record], raw: bytes | None):
    if raw is None:
        return None
    if len(raw) > MAX_REGISTRATION_BYTES:
        logger.warning(f"dropping a {model.__name__} of {len(raw)} bytes, over {MAX_REGISTRATION_BYTES}")
        return None
    try:
        return model.from_json(raw)
    except ValueError:
        logger.warning(f"dropping a malformed {model.__name__}: {raw[:200]!r}")
        return None


_STREAMS = {
    StepRecord: ("steps", STEPS_STREAM_MAXLEN, True),
    RoundRecord: ("rounds", ROUNDS_STREAM_MAXLEN, True),
    OffenceRecord: ("offences", OFFENCES_STREAM_MAXLEN, True),
    EvalRecord: ("evals", EVALS_STREAM_MAXLEN, False),  # written by the validator for its own API
}


def _stream_fields(record: Record, domain: Domain, signer=None) -> dict:
    attr, _, signed = _STREAMS[type(record)]
    if signed:
        if signer is None:
            raise ValueError(f"{type(record).__name__} telemetry must be signed: pass the writer's wallet")
        envelope = sign(signer, domain, record.model_dump(mode="json"), timestamp=record.time)
        return {"env": SignedEnvelope.model_validate(envelope).model_dump_json()}
    return {"json": record.to_json()}


def append(client: redis.Redis, keys: Keys, domain: Domain, record: Record, signer=None) -> None:
    """XADD one record to its capped stream (signed by ``signer`` for ``domain`` where the contract asks for it)."""
    attr, maxlen, _ = _STREAMS[type(record)]
    client.xadd(getattr(keys, attr), _stream_fields(record, same_run(keys, domain), signer), maxlen=maxlen, approximate=True)


def decode_entry(model: type[Record], fields: dict, domain: Domain) -> tuple[Record, str] | None:
    """(record, signer hotkey) of one stream entry, or None when it is malformed or not authentic.

    Signed entries are checked by signature alone (history: freshness is not asked), in ``domain``:
    an entry signed for another run or subnet is not authentic here. A consumer that must read each
    entry once (freshness, nonce) uses a ``Verifier`` instead (``hivetrain.validator.claims``).
    """
    _, _, signed = _STREAMS[model]
    if not signed:
        record = _parse(model, fields.get(b"json"))
        return None if record is None else (record, "")
    raw = fields.get(b"env")
    if raw is None:
        return None
    try:
        envelope = verify_signature(raw, domain)
        return model.model_validate(envelope.payload), envelope.hotkey
    except (VerificationError, ValueError) as error:
        logger.debug(f"dropping a {model.__name__}: {error}")
        return None


def read_stream(client: redis.Redis, keys: Keys, domain: Domain, model: type[Record], count: int | None = None) -> list:
    """All (or the last ``count``) authentic records of one stream (signed in ``domain``, where signed), oldest first."""
    same_run(keys, domain)
    attr, _, _ = _STREAMS[model]
    if count is None:
        entries = client.xrange(getattr(keys, attr))
    else:
        entries = list(reversed(client.xrevrange(getattr(keys, attr), count=count)))
    decoded = (decode_entry(model, fields, domain) for _, fields in entries)
    return [d[0] for d in decoded if d is not None]


#: Streams a miner may post to the bootstrap (``POST /v1/telemetry``), by their name on the wire.
INGEST_STREAMS: dict[str, type[Record]] = {"steps": StepRecord, "rounds": RoundRecord, "offences": OffenceRecord}


class TelemetryIngest:
    """The bootstrap's side of ``POST /v1/telemetry``: signed entries from registered peers, stored as signed.

    A body is ``{"entries": [{"stream": "steps", "env": "<signed envelope JSON>"}, ...]}``. Each entry
    is stored byte for byte under a Redis-chosen id (so no writer can pin a stream with an explicit
    one) once: its signature holds in this run, its record names a peer its signer registered, and
    it is newer than the last entry taken from that peer on that stream (a replay is older). An
    entry that fails is left out and named in the answer; a peer that is not registered (yet, or no
    longer) makes the whole post wait (409) so nothing is lost while its heartbeat catches up; more
    than ``quota_per_minute`` entries a minute from one hotkey is 429.
    """

    def __init__(self, registry: Registry, quota_per_minute: int):
        self.registry, self.keys, self.domain = registry, registry.keys, registry.domain
        self.client, self.quota = registry.client, quota_per_minute

    def accept(self, body) -> dict:
        entries = body.get("entries") if isinstance(body, dict) else None
        if not isinstance(entries, list) or not entries:
            raise Refused('the body must be {"entries": [{"stream": ..., "env": ...}, ...]} with at least one entry')
        if len(entries) > MAX_INGEST_ENTRIES:
            raise Refused(f"at most {MAX_INGEST_ENTRIES} entries per request, got {len(entries)}", 413)
        refused, checked = [], []
        for index, entry in enumerate(entries):
            try:
                checked.append((index, *self._check(entry)))
            except Refused as why:
                refused.append({"index": index, "reason": str(why)})
        by_hotkey: dict[str, list] = collections.defaultdict(list)
        for item in checked:
            by_hotkey[item[4]].append(item)
        stored = 0
        for hotkey, items in by_hotkey.items():
            stored += self._store(hotkey, items, refused)
        return {"stored": stored, "refused": sorted(refused, key=lambda r: r["index"])}

    def _check(self, entry) -> tuple[str, str, Record, str, float]:
        if not isinstance(entry, dict) or set(entry) != {"stream", "env"}:
            raise Refused('an entry is {"stream": ..., "env": ...}')
        stream, raw = entry["stream"], entry["env"]
        model = INGEST_STREAMS.get(stream) if isinstance(stream, str) else None
        if model is None:
            raise Refused(f"stream must be one of {sorted(INGEST_STREAMS)}")
        if not isinstance(raw, str) or len(raw) > MAX_INGEST_ENTRY_BYTES:
            raise Refused(f"env must be a signed envelope of at most {MAX_INGEST_ENTRY_BYTES} characters")
        try:
            envelope = verify_signature(raw, self.domain)
            record = model.model_validate(envelope.payload)
        except (VerificationError, ValueError, RecursionError) as error:
            raise Refused(f"not a valid signed {model.__name__}: {error}") from None
        return stream, raw, record, envelope.hotkey, envelope.timestamp

    def _store(self, hotkey: str, items: list, refused: list) -> int:
        live = self.registry.live_peer_ids_of(hotkey)
        strangers = sorted({record.peer_id for _, _, _, record, _, _ in items} - live)
        if strangers:
            raise Refused(f"{', '.join(strangers)} is not registered by {hotkey}: register (or wait for the heartbeat), "
                          "then send again", 409)
        marks_key = self.keys.ingest_marks(hotkey)
        marks = {k.decode(): float(v) for k, v in self.client.hgetall(marks_key).items()}
        fresh, newest = [], {}
        for index, stream, raw, record, _, signed_at in sorted(items, key=lambda item: item[5]):
            mark = f"{record.peer_id}|{stream}"
            if signed_at <= max(marks.get(mark, float("-inf")), newest.get(mark, float("-inf"))):
                refused.append({"index": index, "reason": "not newer than an entry already taken from this peer (a replay?)"})
                continue
            newest[mark] = signed_at
            fresh.append((stream, raw))
        if not fresh:
            return 0
        quota_key = self.keys.ingest_quota(hotkey, int(time.time() // 60))
        with self.client.pipeline(transaction=True) as pipe:
            pipe.incrby(quota_key, len(fresh))
            pipe.expire(quota_key, 120)
            taken, _ = pipe.execute()
        if taken > self.quota:
            self.client.decrby(quota_key, len(fresh))
            raise Refused(f"{hotkey} sent more than {self.quota} telemetry entries this minute; send again later", 429)
        with self.client.pipeline(transaction=True) as pipe:
            for stream, raw in fresh:
                _, maxlen, _ = _STREAMS[INGEST_STREAMS[stream]]
                pipe.xadd(getattr(self.keys, stream), {"env": raw}, maxlen=maxlen, approximate=True)
            pipe.hset(marks_key, mapping=newest)
            pipe.expire(marks_key, 24 * 3600)
            pipe.execute()
        return len(fresh)


class SinkUnavailable(Exception):
    """The sink could not take a batch now (Redis or the bootstrap away, a quota, a peer not yet registered): retry."""


class RedisSink:
    """Telemetry straight into Redis: for trusted writers that hold a credential that may (the validator, tests)."""

    max_batch = 10_000

    def __init__(self, client: redis.Redis, keys: Keys):
        self.client, self.keys = client, keys

    def send(self, entries: list[tuple[str, dict]]) -> list[int]:
        """XADD every ``(stream, fields)``; the indices refused (none here)."""
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for stream, fields in entries:
                    _, maxlen, _ = _STREAMS[INGEST_STREAMS[stream]]
                    pipe.xadd(getattr(self.keys, stream), fields, maxlen=maxlen, approximate=True)
                pipe.execute()
        except redis.RedisError as error:
            raise SinkUnavailable(repr(error)) from None
        return []


class BootstrapSink:
    """Telemetry posted to the bootstrap's ``POST /v1/telemetry``: how a miner writes (``TelemetryIngest``)."""

    max_batch = MAX_INGEST_ENTRIES

    def __init__(self, bootstrap_url: str, timeout: float = 10.0):
        import requests  # only miners post

        self.url, self.timeout = f"{bootstrap_url.rstrip('/')}/v1/telemetry", timeout
        self.session, self._errors = requests.Session(), requests.RequestException

    def send(self, entries: list[tuple[str, dict]]) -> list[int]:
        body = {"entries": [{"stream": stream, "env": fields["env"]} for stream, fields in entries]}
        try:
            response = self.session.post(self.url, json=body, timeout=self.timeout, allow_redirects=False)
        except self._errors as error:
            raise SinkUnavailable(f"bootstrap unreachable: {error!r}") from None
        if response.status_code == 200:
            refused = response.json().get("refused", [])
            for item in refused[:3]:
                logger.warning(f"telemetry entry refused by the bootstrap: {item.get('reason')}")
            return [int(item["index"]) for item in refused]
        if response.status_code in (408, 409, 429) or response.status_code >= 500:
            raise SinkUnavailable(f"bootstrap answered {response.status_code}: {response.text[:200]}")
        # our own entries refused as a whole: a bug or a misconfigured run; retrying would not help
        logger.error(f"the bootstrap refused {len(entries)} telemetry entries ({response.status_code}): {response.text[:300]}")
        return list(range(len(entries)))


class BootstrapRegistry:
    """A miner's registration, sent to the bootstrap's ``POST /v1/peers`` (``Registry.store_signed`` checks it there).

    Same calls as ``Registry``'s ``register`` and ``deregister``, for the miner's heartbeat; errors
    raise (the heartbeat logs them and tries again).
    """

    def __init__(self, bootstrap_url: str, domain: Domain, timeout: float = 10.0):
        import requests  # only miners post

        self.base, self.domain, self.timeout = bootstrap_url.rstrip("/"), domain, timeout
        self.session = requests.Session()
        self._signer = None

    def _post(self, path: str, body: bytes) -> None:
        response = self.session.post(f"{self.base}{path}", data=body, timeout=self.timeout, allow_redirects=False,
                                     headers={"Content-Type": "application/json"})
        if response.status_code != 200:
            raise RuntimeError(f"the bootstrap refused {path} ({response.status_code}): {response.text[:300]}")

    def register(self, record: PeerRecord, signer) -> None:
        self._signer = signer
        self._post("/v1/peers", signed_registration(record, signer, self.domain)[0])

    def deregister(self, peer_id: str) -> None:
        if self._signer is None:
            return  # never registered
        envelope = sign(self._signer, self.domain, Departure(peer_id=peer_id).model_dump(mode="json"))
        self._post("/v1/peers/leave", SignedEnvelope.model_validate(envelope).model_dump_json().encode())


class TelemetryWriter:
    """Writes telemetry from a background thread so training never blocks on Redis or the bootstrap.

    ``put`` only appends to a bounded deque. While the sink is unavailable the thread retries with
    exponential backoff (up to ``max_backoff_s``); when the deque is full the oldest records go
    first and are counted in ``dropped``, as are records the sink refuses.
    """

    def __init__(self, sink: RedisSink | BootstrapSink, domain: Domain, signer, max_queue: int = 10_000,
                 max_backoff_s: float = 5.0):
        self.sink, self.signer, self.max_backoff_s = sink, signer, max_backoff_s
        self.domain = same_run(sink.keys, domain) if isinstance(sink, RedisSink) else domain
        self._queue: collections.deque = collections.deque(maxlen=max_queue)
        self._wake = threading.Condition()
        self._stopping = False
        self.written = self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="telemetry-writer", daemon=True)
        self._thread.start()

    def put(self, record: StepRecord | RoundRecord | OffenceRecord) -> None:
        with self._wake:
            if len(self._queue) == self._queue.maxlen:
                self.dropped += 1
            self._queue.append(record)
            self._wake.notify()

    def put_many(self, records: Iterable[StepRecord | RoundRecord | OffenceRecord]) -> None:
        for record in records:
            self.put(record)

    @property
    def queued(self) -> int:
        """Records not yet written to Redis, including a batch in flight (the miner's /metrics shows it)."""
        return len(self._queue)

    def _run(self) -> None:
        backoff = 0.1
        while True:
            with self._wake:
                while not self._queue and not self._stopping:
                    self._wake.wait()
                if not self._queue and self._stopping:
                    return
                batch = list(itertools.islice(self._queue, self.sink.max_batch))
            entries, unserialisable = [], 0
            for record in batch:
                try:
                    entries.append((_STREAMS[type(record)][0], _stream_fields(record, self.domain, self.signer)))
                except ValueError:  # not JSON-able (a NaN): drop it, keep the writer alive
                    logger.warning(f"dropping an unserialisable {type(record).__name__}", exc_info=True)
                    unserialisable += 1
            try:
                refused = self.sink.send(entries) if entries else []
            except SinkUnavailable as error:
                if self._stopping:
                    return
                logger.warning(f"telemetry write failed ({error}); {len(batch)} records wait, retrying in {backoff:.1f}s")
                with self._wake:
                    self._wake.wait(timeout=backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            backoff = 0.1
            sent = {id(record) for record in batch}
            with self._wake:
                # records dropped for space while we wrote are already gone from the left
                while self._queue and id(self._queue[0]) in sent:
                    self._queue.popleft()
                self.dropped += unserialisable + len(refused)
                self.written += len(entries) - len(refused)

    def close(self, timeout: float = 5.0) -> None:
        """Flush what is queued (for up to ``timeout`` seconds), then stop the thread."""
        deadline = time.monotonic() + timeout
        while self._queue and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.05)
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
        if self._queue:
            logger.warning(f"telemetry: {len(self._queue)} records not written at shutdown")
