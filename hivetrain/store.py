"""Redis access for the registry and telemetry, on top of the contracts in ``hivetrain.protocol.records``.

Peer registrations and telemetry are stored as signed envelopes (``hivetrain.identity``): the
writer's hotkey signs the whole record for the run's ``Domain`` (run id and, on Bittensor, netuid).
Readers verify and drop what fails: a forged or altered record, one signed for another run or
subnet, a registration whose heartbeat stopped, a record whose payload names another hotkey.
Every reader and writer here takes the ``Domain`` along with the run's ``Keys``; the two must name
the same run.

Who writes what: the validator and the bootstrap hold Redis users that may write their run's keys;
a miner's only reads (``hivetrain.swarm.redis_server.role_rules``). A miner's registration and telemetry
go to the bootstrap (``hivetrain.miner.reporting``), which checks them and stores them as signed
(``Registry.store_signed``, ``hivetrain.bootstrap.ingest``).

The run's shard salt (``shard_salt``) is not signed: readers check its form and refuse junk, and
the services that choose it (bootstrap, validators) overwrite junk with a salt of their own.

Sending records without ever making training wait: ``hivetrain.miner.reporting``. How records are
packed into envelopes and unpacked: ``hivetrain.protocol.envelopes``. Seen nonces, shared by every
verifier of a run: ``RedisNonceStore``.
"""

from __future__ import annotations

import ipaddress
import math
import re
import secrets
import time
import urllib.parse
from typing import Any, Callable

import redis

from hivetrain.identity import DEFAULT_FUTURE_SKEW_S, DEFAULT_WINDOW_S, Domain, VerificationError, Verifier
from hivetrain.log import get_logger
from hivetrain.protocol.binding import binding_problem
from hivetrain.protocol.envelopes import (
    STREAMS,
    decode_entry,
    parse_record,
    same_run,
    signed_registration,
    stream_fields,
)
from hivetrain.protocol.records import (
    BOOTSTRAP_TTL_S,
    MAX_PEERS_PER_HOTKEY,
    MAX_REGISTRATION_BYTES,
    PEER_TTL_S,
    SHARD_SALT_HEX_CHARS,
    BootstrapRecord,
    Departure,
    Keys,
    PeerRecord,
    Record,
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


class RedisNonceStore:
    """Seen nonces in Redis (``SET key 1 NX EX retention``), shared by every verifier process."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        retention_s: float = DEFAULT_WINDOW_S + DEFAULT_FUTURE_SKEW_S,
        scope: str = "",
    ):
        """``scope`` keeps a separate memory under the run's keys (e.g. one per validator); '' = the run's shared
        one."""
        if retention_s <= 0:
            raise ValueError(f"retention_s must be positive, got {retention_s}")
        self.client, self.keys = client, keys
        self.retention = float(retention_s)
        self.prefix = f"{keys.prefix}:nonce:" + (f"{scope}:" if scope else "")

    def key(self, hotkey_ss58: str, nonce: Any) -> str:
        # under the run's keys: its services' Redis users may touch only those
        return f"{self.prefix}{hotkey_ss58}:{nonce}"

    def check_and_store(self, hotkey_ss58: str, nonce: Any) -> bool:
        return bool(self.client.set(self.key(hotkey_ss58, nonce), 1, nx=True, ex=math.ceil(self.retention)))


def redis_verifier(
    client: redis.Redis,
    keys: Keys,
    domain: Domain,
    window_s: float = DEFAULT_WINDOW_S,
    future_skew_s: float = DEFAULT_FUTURE_SKEW_S,
) -> Verifier:
    """A ``Verifier`` for ``domain`` whose nonce memory is shared through Redis by every process of the run."""
    return Verifier(
        RedisNonceStore(client, keys, window_s + future_skew_s), same_run(keys, domain), window_s, future_skew_s
    )


class Refused(ValueError):
    """A record the bootstrap's ingest will not store; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


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

    def _store(
        self, peer_id: str, envelope: bytes, signed_at: float, hotkey: str | None = None, source: str = ""
    ) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.peer(peer_id), envelope, ex=int(self.ttl_s))
            if source:
                pipe.set(self.keys.peer_source(peer_id), source, ex=int(self.ttl_s))
            else:
                pipe.delete(self.keys.peer_source(peer_id))
            pipe.zadd(self.keys.peer_index, {peer_id: signed_at})
            pipe.zremrangebyscore(self.keys.peer_index, "-inf", signed_at - self.ttl_s)
            pipe.expire(self.keys.peer_index, int(self.ttl_s) * 4)
            if hotkey is not None:
                pipe.zadd(self.keys.hotkey_peers(hotkey), {peer_id: signed_at})
                pipe.expire(self.keys.hotkey_peers(hotkey), int(self.ttl_s) * 4)
            pipe.execute()

    def deregister(self, peer_id: str) -> None:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.peer(peer_id), self.keys.peer_source(peer_id))
            pipe.zrem(self.keys.peer_index, peer_id)
            pipe.execute()

    def store_signed(
        self,
        raw: bytes,
        roles: tuple[str, ...] = ("miner",),
        source: str = "",
        admits: Callable[[str], bool] | None = None,
    ) -> PeerRecord:
        """Store a registration its peer signed (the bootstrap's ``POST /v1/peers``), received from the address
        ``source``; ``Refused`` says why not.

        Refused: a body over ``MAX_REGISTRATION_BYTES`` (413); a bad, stale or other-run signature,
        a record naming another hotkey, a peer id its libp2p key does not bind (401); a role not in
        ``roles`` (403); a registration signed no later than the one stored for its peer id (409: a
        replay, which would otherwise move the peer's ``registered_from`` to the replayer's address); a hotkey
        ``admits`` (when given) does not admit (403);
        a new peer id for a hotkey that already has ``MAX_PEERS_PER_HOTKEY`` live (429). The stored
        registration itself, sent again, is answered as stored and changes nothing.
        """
        envelope, record = self._signed(raw, PeerRecord, "registration")
        if record.hotkey != envelope.hotkey:
            raise Refused(f"registration refused: signed by {envelope.hotkey} for {record.hotkey}", 401)
        problem = self._binding_problem(record)
        if problem is not None:
            raise Refused(f"registration of {record.peer_id} refused: {problem}", 401)
        if record.role not in roles:
            raise Refused(f"role {record.role!r} cannot register through the bootstrap (only {', '.join(roles)})", 403)
        if admits is not None and not admits(record.hotkey):
            raise Refused(
                f"hotkey {record.hotkey} is not admitted to this run (HIVE_ADMISSION=chain): register it on the "
                "subnet, or ask the operator to run python -m hivetrain.admission admit HOTKEY",
                403,
            )
        signed_at = min(envelope.timestamp, time.time())
        newest = self.client.zscore(self.keys.peer_index, record.peer_id)
        if newest is not None and signed_at <= newest:
            if self.client.get(self.keys.peer(record.peer_id)) == raw:
                return record  # the same registration again (its answer was lost): nothing changes
            raise Refused(f"registration of {record.peer_id} refused: signed no later than the one stored", 409)
        live = self.live_peer_ids_of(record.hotkey)
        if record.peer_id not in live and len(live) >= MAX_PEERS_PER_HOTKEY:
            raise Refused(
                f"hotkey {record.hotkey} already has {len(live)} live peers, the most one hotkey may have; "
                "stop one or wait for its registration to expire",
                429,
            )
        source = _address(source)
        self._store(record.peer_id, raw, signed_at, hotkey=record.hotkey, source=source)
        return record.seen_from(source)

    def _signed(self, raw: bytes, model: type[Record], what: str):
        """(envelope, record) of a fresh envelope signed in this run, or ``Refused`` (413 when too big, else 401)."""
        if len(raw) > MAX_REGISTRATION_BYTES:
            raise Refused(f"a {what} is at most {MAX_REGISTRATION_BYTES} bytes, got {len(raw)}", 413)
        try:
            envelope = self.verifier.authenticate(raw)
            return envelope, model.model_validate(envelope.payload)
        except (VerificationError, ValueError, RecursionError) as error:
            raise Refused(f"{what} refused: {error}", 401) from None

    def remove_signed(self, raw: bytes) -> str:
        """Drop a registration on its own hotkey's signed ``Departure``; the peer id, or ``Refused``."""
        envelope, departure = self._signed(raw, Departure, "departure")
        stored = self._authentic_peer(departure.peer_id, self.client.get(self.keys.peer(departure.peer_id)))
        if stored is not None and stored.hotkey != envelope.hotkey:
            raise Refused(f"departure refused: {departure.peer_id} is registered by another hotkey", 403)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.peer(departure.peer_id), self.keys.peer_source(departure.peer_id))
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
        """The freshest live peers first, each with the address its registration came from (``registered_from``);
        records that expired or fail validation are skipped."""
        cutoff = time.time() - self.ttl_s
        peer_ids = [
            pid.decode()
            for pid in self.client.zrevrangebyscore(
                self.keys.peer_index, "+inf", cutoff, start=0, num=max(limit * 2, limit + 8)
            )
        ]
        if not peer_ids:
            return []
        # one round trip: every registration, then the address each came from
        found = self.client.mget(
            [self.keys.peer(pid) for pid in peer_ids] + [self.keys.peer_source(pid) for pid in peer_ids]
        )
        raws, sources = found[: len(peer_ids)], found[len(peer_ids) :]
        peers = []
        for pid, raw, source in zip(peer_ids, raws, sources):
            record = self._authentic_peer(pid, raw)
            if record is not None and (role is None or record.role == role):
                peers.append(record.seen_from(_address(source)))
            if len(peers) >= limit:
                break
        return peers

    def live_peer(self, peer_id: str) -> PeerRecord | None:
        """``peer_id``'s live registration, checked as ``live_peers`` checks each one; None when there is none."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.zscore(self.keys.peer_index, peer_id)
            pipe.get(self.keys.peer(peer_id))
            pipe.get(self.keys.peer_source(peer_id))
            seen, raw, source = pipe.execute()
        if seen is None or seen < time.time() - self.ttl_s:
            return None
        record = self._authentic_peer(peer_id, raw)
        return record.seen_from(_address(source)) if record is not None else None

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
            logger.warning(
                f"dropping registration of {peer_id}: signed by {envelope.hotkey} for {record.hotkey}/{record.peer_id}"
            )
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
        return [r for r in (parse_record(BootstrapRecord, raw) for raw in raws) if r is not None]


def _address(value: str | bytes | None) -> str:
    """``value`` as a canonical IP address ('' when absent or not an address: a Redis value is checked before use)."""
    if isinstance(value, bytes):
        value = value.decode("ascii", errors="replace")
    try:
        ip = ipaddress.ip_address((value or "").split("%", 1)[0])
    except ValueError:
        return ""
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)


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
    what = "a key of another type" if raw is None else f"{raw[: SHARD_SALT_HEX_CHARS + 1]!r}"
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


def xadd_capped(client, keys: Keys, model: type[Record], fields: dict) -> None:
    """XADD ``fields`` to ``model``'s stream, trimmed to its MAXLEN (``client`` may be a pipeline)."""
    attr, maxlen, _ = STREAMS[model]
    client.xadd(getattr(keys, attr), fields, maxlen=maxlen, approximate=True)


def append(client: redis.Redis, keys: Keys, domain: Domain, record: Record, signer=None) -> None:
    """XADD one record to its capped stream (signed by ``signer`` for ``domain`` where the contract asks for it)."""
    xadd_capped(client, keys, type(record), stream_fields(record, same_run(keys, domain), signer))


def read_stream(client: redis.Redis, keys: Keys, domain: Domain, model: type[Record], count: int | None = None) -> list:
    """All (or the last ``count``) authentic records of one stream (signed in ``domain``, where signed), oldest
    first."""
    same_run(keys, domain)
    attr, _, _ = STREAMS[model]
    if count is None:
        entries = client.xrange(getattr(keys, attr))
    else:
        entries = list(reversed(client.xrevrange(getattr(keys, attr), count=count)))
    decoded = (decode_entry(model, fields, domain) for _, fields in entries)
    return [d[0] for d in decoded if d is not None]
