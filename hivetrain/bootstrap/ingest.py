"""The bootstrap's side of ``POST /v1/telemetry``: the miners' telemetry, checked before it is stored.

Miners hold a Redis user that only reads (``hivetrain.swarm.redis_server.role_rules``); their telemetry
reaches Redis only through here, signed by their hotkeys and stored byte for byte.
"""

from __future__ import annotations

import collections
import json
import time
from typing import NamedTuple

from hivetrain.identity import VerificationError, verify_signature
from hivetrain.protocol.envelopes import INGEST_STREAMS
from hivetrain.protocol.records import MAX_INGEST_ENTRIES, MAX_INGEST_ENTRY_BYTES, Record
from hivetrain.store import Refused, Registry, xadd_capped


class _Checked(NamedTuple):
    """One entry of a post whose signature and record hold: where it was in the body, and what it says."""

    index: int
    stream: str
    raw: str  # the signed envelope, stored byte for byte
    record: Record
    hotkey: str
    signed_at: float


class TelemetryIngest:
    """The bootstrap's side of ``POST /v1/telemetry``: signed entries from registered peers, stored as signed.

    A body is ``{"entries": [{"stream": "steps", "env": "<signed envelope JSON>"}, ...]}``. Each entry
    is stored byte for byte under a Redis-chosen id (so no writer can pin a stream with an explicit
    one) once: its signature holds in this run, its record names a peer its signer registered, and
    it is newer than the last entry taken from that peer on that stream (a replay is older). An
    entry that fails is left out and named in the answer; a peer that is not registered (yet, or no
    longer) makes the whole post wait (409) so nothing is lost while its heartbeat catches up; more
    than ``quota_per_minute`` entries a minute from one hotkey is 429.

    A post can be stored and its answer lost (a timeout on a slow bootstrap, a restart, a dropped
    connection); the miner then sends the same entries again, with the same signing times. Those
    that were in the peer's last post (``Keys.ingest_taken``) are answered as ``duplicates``: stored
    before, not stored again, and not refused, so the miner neither counts them dropped nor retries.
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
        refused, duplicates, checked = [], [], []
        for index, entry in enumerate(entries):
            try:
                checked.append(self._check(index, entry))
            except Refused as why:
                refused.append({"index": index, "reason": str(why)})
        by_hotkey: dict[str, list[_Checked]] = collections.defaultdict(list)
        for item in checked:
            by_hotkey[item.hotkey].append(item)
        stored = 0
        for hotkey, items in by_hotkey.items():
            stored += self._store(hotkey, items, refused, duplicates)
        return {
            "stored": stored,
            "refused": sorted(refused, key=lambda r: r["index"]),
            "duplicates": sorted(duplicates),
        }

    def _check(self, index: int, entry) -> _Checked:
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
        return _Checked(index, stream, raw, record, envelope.hotkey, envelope.timestamp)

    def _store(self, hotkey: str, items: list[_Checked], refused: list, duplicates: list) -> int:
        live = self.registry.live_peer_ids_of(hotkey)
        strangers = sorted({item.record.peer_id for item in items} - live)
        if strangers:
            raise Refused(
                f"{', '.join(strangers)} is not registered by {hotkey}: register (or wait for the heartbeat), "
                "then send again",
                409,
            )
        marks_key, taken_key = self.keys.ingest_marks(hotkey), self.keys.ingest_taken(hotkey)
        marks = {k.decode(): float(v) for k, v in self.client.hgetall(marks_key).items()}
        last_post = _last_posts(self.client.hgetall(taken_key))
        fresh, newest, this_post = [], {}, collections.defaultdict(list)
        for index, stream, raw, record, _, signed_at in sorted(items, key=lambda item: item.signed_at):
            mark = f"{record.peer_id}|{stream}"
            if signed_at <= max(marks.get(mark, float("-inf")), newest.get(mark, float("-inf"))):
                if signed_at in last_post.get(mark, ()):  # sent again after a lost answer: stored already
                    duplicates.append(index)
                    this_post[mark].append(signed_at)
                    continue
                refused.append(
                    {"index": index, "reason": "not newer than an entry already taken from this peer (a replay?)"}
                )
                continue
            newest[mark] = signed_at
            this_post[mark].append(signed_at)
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
                xadd_capped(pipe, self.keys, INGEST_STREAMS[stream], {"env": raw})
            pipe.hset(marks_key, mapping=newest)
            pipe.hset(taken_key, mapping={mark: json.dumps(times) for mark, times in this_post.items()})
            for key in (marks_key, taken_key):
                pipe.expire(key, 24 * 3600)
            pipe.execute()
        return len(fresh)


def _last_posts(stored: dict) -> dict[str, set[float]]:
    """``Keys.ingest_taken``'s hash as {"peer_id|stream": signing times}; a field that does not parse counts as
    empty."""
    posts = {}
    for field, value in stored.items():
        try:
            times = json.loads(value)
            posts[field.decode()] = {float(t) for t in times} if isinstance(times, list) else set()
        except (ValueError, TypeError):
            posts[field.decode()] = set()
    return posts
