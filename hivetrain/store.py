"""Redis access for the registry and telemetry, on top of the contracts in ``hivetrain.protocol.records``.

Peer registrations and telemetry are stored as signed envelopes (``hivetrain.identity``): the
writer's hotkey signs the whole record for the run's ``Domain`` (run id and, on Bittensor, netuid).
Readers verify and drop what fails: a forged or altered record, one signed for another run or
subnet, a registration whose heartbeat stopped, a record whose payload names another hotkey.
Every reader and writer here takes the ``Domain`` along with the run's ``Keys``; the two must name
the same run.

The run's shard salt (``shard_salt``) is not signed: readers check its form and refuse junk, and
the services that choose it (bootstrap, validators) overwrite junk with a salt of their own.

Training must never wait for Redis: ``TelemetryWriter`` queues records and writes them from a
background thread, retrying with backoff while Redis is away and dropping the oldest records
once its bounded queue is full.
"""

from __future__ import annotations

import collections
import re
import secrets
import threading
import time
import urllib.parse
from typing import Iterable

import redis

from hivetrain.identity import Domain, SignedEnvelope, VerificationError, Verifier, sign, verify_signature
from hivetrain.log import get_logger
from hivetrain.protocol.binding import binding_problem
from hivetrain.protocol.discovery import BootstrapUnavailable
from hivetrain.protocol.records import (
    BOOTSTRAP_TTL_S,
    EVALS_STREAM_MAXLEN,
    MAX_REGISTRATION_BYTES,
    OFFENCES_STREAM_MAXLEN,
    PEER_TTL_S,
    ROUNDS_STREAM_MAXLEN,
    SHARD_SALT_HEX_CHARS,
    STEPS_STREAM_MAXLEN,
    BootstrapRecord,
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


class Registry:
    """Live peers and bootstrap addresses; every entry expires unless its owner keeps beating."""

    def __init__(self, client: redis.Redis, keys: Keys, domain: Domain, ttl_s: float = PEER_TTL_S):
        self.client, self.keys, self.ttl_s = client, keys, ttl_s
        self.domain = same_run(keys, domain)
        # registrations are re-read on every request: check signature and age, use up no nonce
        self.verifier = Verifier.in_memory(domain, window_s=ttl_s)
        self._bindings: dict[tuple[str, ...], str | None] = {}  # a peer's binding is checked once, not every read

    def register(self, record: PeerRecord, signer) -> None:
        """Write or refresh a peer's record, signed by ``signer`` (its wallet); call it every heartbeat."""
        now = time.time()
        record = record.model_copy(update={"last_seen": now, "hotkey": signer.hotkey.ss58_address})
        envelope = sign(signer, self.domain, record.model_dump(mode="json"), timestamp=now)
        envelope = SignedEnvelope.model_validate(envelope).model_dump_json().encode()
        if len(envelope) > MAX_REGISTRATION_BYTES:
            raise ValueError(f"registration of {record.peer_id} is {len(envelope)} bytes, over {MAX_REGISTRATION_BYTES}: "
                             "readers would drop it; register fewer or shorter addresses")
        with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.peer(record.peer_id), envelope, ex=int(self.ttl_s))
            pipe.zadd(self.keys.peer_index, {record.peer_id: now})
            pipe.zremrangebyscore(self.keys.peer_index, "-inf", now - self.ttl_s)
            pipe.expire(self.keys.peer_index, int(self.ttl_s) * 4)
            pipe.execute()

    def deregister(self, peer_id: str) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.peer(peer_id))
            pipe.zrem(self.keys.peer_index, peer_id)
            pipe.execute()

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


_SALT = re.compile(r"[0-9a-f]{%d}" % SHARD_SALT_HEX_CHARS)
#: Writers racing on a refused salt retry this often before giving up (each retry sees the other's write).
SALT_WRITE_TRIES = 8


def is_shard_salt(value: object) -> bool:
    """Whether ``value`` is a well-formed shard salt: exactly 32 lowercase hex characters."""
    return isinstance(value, str) and _SALT.fullmatch(value) is not None


def _stored_salt(client, key: str) -> str | None:
    """The salt stored at ``key`` if it is well formed; None when absent or refused (logged, naming the key).

    Anyone holding the Redis credential can write there, so the value is hostile until checked:
    at most one byte more than a salt is read, and another key type counts as junk.
    """
    try:
        raw = client.getrange(key, 0, SHARD_SALT_HEX_CHARS)  # a salt and one byte: a huge value is never read
    except redis.ResponseError:  # WRONGTYPE: a list or hash where the salt belongs
        raw = None
    if raw in (b"", "") and not client.exists(key):
        return None
    text = raw.decode("ascii", errors="replace") if isinstance(raw, bytes) else raw
    if is_shard_salt(text):
        return text
    what = "a key of another type" if raw is None else f"{raw[:SHARD_SALT_HEX_CHARS + 1]!r}"
    logger.warning(f"ignoring the shard salt at {key}: {what} is not {SHARD_SALT_HEX_CHARS} lowercase hex characters")
    return None


def shard_salt(client: redis.Redis, keys: Keys, create: bool, new_salt: str | None = None) -> str | None:
    """The run's shard salt (``Keys.shard_salt``), or None while there is none.

    A stored value that is not 32 lowercase hex characters is refused (a warning names the key) and
    counts as absent. With ``create`` (only the bootstrap and validators: the salt is theirs to
    choose, never a miner's) an absent or refused salt is replaced by ``new_salt`` (default 16 fresh
    random bytes) and the salt in effect is returned. Junk is overwritten, not kept: whoever wrote
    it must not be able to stall the run. The write is ``SET`` under ``WATCH``: a valid salt another
    service wrote meanwhile wins, and a salt is never overwritten once valid. No TTL: the salt
    lasts as long as the run's Redis does.
    """
    key = keys.shard_salt
    if not create:
        return _stored_salt(client, key)
    new_salt = secrets.token_hex(SHARD_SALT_HEX_CHARS // 2) if new_salt is None else new_salt
    if not is_shard_salt(new_salt):
        raise ValueError(f"a shard salt is {SHARD_SALT_HEX_CHARS} lowercase hex characters, got {new_salt!r}")
    with client.pipeline(transaction=True) as pipe:
        for _ in range(SALT_WRITE_TRIES):
            try:
                pipe.watch(key)
                found = _stored_salt(pipe, key)
                if found is not None:
                    return found
                pipe.multi()
                pipe.set(key, new_salt)
                pipe.execute()
            except redis.WatchError:  # written meanwhile: read what is there now
                continue
            logger.info(f"published the run's shard salt {new_salt} at {key}")
            return new_salt
    raise redis.RedisError(f"{key} changed under each of {SALT_WRITE_TRIES} writes; something keeps rewriting it")


def wait_for_shard_salt(client: redis.Redis, keys: Keys, wait_s: float, stop: threading.Event | None = None,
                        poll_s: float = 1.0) -> str:
    """The run's shard salt, read every ``poll_s`` until the bootstrap (or a validator) has published it.

    Redis errors count as not published yet. Raises ``BootstrapUnavailable`` after ``wait_s`` seconds,
    or when ``stop`` is set, saying what to check.
    """
    deadline, waiting, last = time.monotonic() + wait_s, False, "nothing there"
    stop = stop or threading.Event()
    while True:
        try:
            salt = shard_salt(client, keys, create=False)
            last = "nothing there, or junk (see the warnings above)"
        except redis.RedisError as error:  # Redis boundary: unreachable is the same as not published yet
            salt, last = None, f"Redis: {type(error).__name__}: {error}"
        if salt is not None:
            return salt
        remaining = deadline - time.monotonic()
        if remaining <= 0 or stop.is_set():
            raise BootstrapUnavailable(
                f"no shard salt at {keys.shard_salt} after {wait_s:.0f}s ({last}). The bootstrap publishes it when it "
                "starts: check that it runs with this HIVE_REDIS_URL and HIVE_RUN_ID, or wait longer with HIVE_BOOTSTRAP_WAIT_S")
        if not waiting:
            logger.info(f"waiting for the bootstrap to publish the run's shard salt at {keys.shard_salt} "
                        f"(up to {wait_s:.0f}s)")
            waiting = True
        stop.wait(min(poll_s, remaining))


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


class TelemetryWriter:
    """Writes telemetry from a background thread so training never blocks on Redis.

    ``put`` only appends to a bounded deque. While Redis is unreachable the thread retries with
    exponential backoff (up to ``max_backoff_s``); when the deque is full the oldest records go
    first and are counted in ``dropped``.
    """

    def __init__(self, client: redis.Redis, keys: Keys, domain: Domain, signer, max_queue: int = 10_000,
                 max_backoff_s: float = 5.0):
        self.client, self.keys, self.signer, self.max_backoff_s = client, keys, signer, max_backoff_s
        self.domain = same_run(keys, domain)
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
                batch = list(self._queue)
            try:
                with self.client.pipeline(transaction=False) as pipe:
                    for record in batch:
                        attr, maxlen, _ = _STREAMS[type(record)]
                        try:
                            fields = _stream_fields(record, self.domain, self.signer)
                        except ValueError:  # not JSON-able (a NaN): drop it, keep the writer alive
                            logger.warning(f"dropping an unserialisable {type(record).__name__}", exc_info=True)
                            self.dropped += 1
                            continue
                        pipe.xadd(getattr(self.keys, attr), fields, maxlen=maxlen, approximate=True)
                    pipe.execute()
            except redis.RedisError as error:
                if self._stopping:
                    return
                logger.warning(f"telemetry write failed ({error!r}); {len(batch)} records wait, retrying in {backoff:.1f}s")
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
                self.written += len(batch)

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
