"""What miners claim, read once from the signed telemetry stream (``ProgressPoller`` reads what the DHT shows).

Every step record is verified once (signature over the whole record, freshness, nonce): a record
copied from another miner and posted again is a replay, one edited to claim more samples no
longer matches its signature. Records are credited to the hotkey that signed them, and only when
that hotkey's live registration names the same hivemind peer id.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import redis
from pydantic import ValidationError

from hivetrain.identity import SignedEnvelope, VerificationError, Verifier
from hivetrain.log import get_logger
from hivetrain.protocol.records import STEPS_STREAM_MAXLEN, Keys, PeerRecord, StepRecord
from hivetrain.validator.progress import FORGET_AFTER_S

logger = get_logger(__name__)


@dataclass
class MinerClaims:
    """One miner's verified step records inside the current scoring window, and since first seen."""

    peer_id: str
    first_samples: int | None = None  # cumulative samples at the window's first record
    last_samples: int = 0
    last_epoch: int = 0
    records: int = 0
    seen_since: float = 0.0  # when this validator first saw the miner
    seen_samples: int = 0  # its cumulative samples then

    @property
    def claimed(self) -> int:
        """Samples claimed in this window."""
        return 0 if self.first_samples is None else max(0, self.last_samples - self.first_samples)

    @property
    def claimed_since_seen(self) -> int:
        return max(0, self.last_samples - self.seen_samples)


class ClaimReader:
    """Consumes the steps stream from where it last stopped; keeps per-miner claims and rejection counts.

    A poll reads everything written since the previous one, ``batch`` entries per round trip, up to
    ``cap`` entries (then a warning; the rest waits for the next poll): a burst of junk costs reading
    time, it does not push honest records out of reach until they go stale. A miner with no record
    for ``forget_after_s`` is forgotten (its baseline and first sighting), so memory stays bounded.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        verifier: Verifier,
        batch: int = 1000,
        cap: int = STEPS_STREAM_MAXLEN,
        forget_after_s: float = FORGET_AFTER_S,
    ):
        if batch < 1 or cap < 1:
            raise ValueError(f"need batch >= 1 and cap >= 1, got {batch} and {cap}")
        self.client, self.keys, self.verifier, self.batch, self.cap = client, keys, verifier, batch, cap
        self.forget_after_s = forget_after_s
        self.last_id = "$"  # records written before the validator started are not this window's
        self.claims: dict[str, MinerClaims] = {}
        self.rejected: Counter[str] = Counter()
        self._baseline: dict[str, int] = {}  # hotkey -> last cumulative samples of the previous window
        self._seen: dict[str, tuple[str, float, int]] = {}  # hotkey -> (peer id, time, samples) when first seen with it
        self._last_record: dict[str, float] = {}  # hotkey -> when its latest verified record was read

    def start(self) -> None:
        """Remember the stream's end: only records written from now on count."""
        info = self.client.xrevrange(self.keys.steps, count=1)
        self.last_id = info[0][0].decode() if info else "0-0"

    def poll(self, registrations: dict[str, PeerRecord]) -> int:
        """Read every new record, up to ``cap``; ``registrations`` maps hotkey -> its live, verified
        registration. Returns records read."""
        read = 0
        while read < self.cap:
            asked = min(self.batch, self.cap - read)
            entries = self.client.xrange(self.keys.steps, min=f"({self.last_id}", count=asked)
            for entry_id, fields in entries:
                self.last_id = entry_id.decode()  # kept per entry: a poll cut short by Redis resumes here
                self._consume(fields, registrations)
            read += len(entries)
            if len(entries) < asked:
                return read
        if self.client.xrange(self.keys.steps, min=f"({self.last_id}", count=1):
            logger.warning(
                f"read {read} step records in one poll, the cap (HIVE_CLAIM_READ_CAP); the rest waits for "
                "the next poll (a burst of junk or a long outage)"
            )
        return read

    def _consume(self, fields: dict, registrations: dict[str, PeerRecord]) -> None:
        raw = fields.get(b"env")
        if raw is None:
            self.rejected["unsigned"] += 1
            return
        try:
            payload = self.verifier.verify(raw)
            hotkey = SignedEnvelope.model_validate_json(raw).hotkey
            record = StepRecord.model_validate(payload)
        except VerificationError as error:
            self.rejected[type(error).__name__] += 1
            return
        except ValidationError:
            self.rejected["malformed"] += 1
            return
        registration = registrations.get(hotkey)
        if registration is None or registration.peer_id != record.peer_id:
            self.rejected["unregistered"] += 1
            return
        claims = self.claims.get(hotkey)
        if claims is None or claims.peer_id != record.peer_id:
            seen = self._seen.get(hotkey)
            if seen is None or seen[0] != record.peer_id:
                seen = self._seen[hotkey] = (record.peer_id, time.time(), record.samples)
            claims = self.claims[hotkey] = MinerClaims(peer_id=record.peer_id, seen_since=seen[1], seen_samples=seen[2])
        if claims.first_samples is None:
            # a window starts where the previous one ended, so no work falls between two windows;
            # a miner's first record only sets the baseline (the batch it reports is not credited)
            claims.first_samples = self._baseline.get(hotkey, record.samples)
        claims.last_samples = max(claims.last_samples, record.samples)
        claims.last_epoch = record.local_epoch
        claims.records += 1
        self._last_record[hotkey] = time.time()

    def close_window(self) -> dict[str, MinerClaims]:
        """The window's claims; the next window starts from each miner's last cumulative count."""
        closed, self.claims = self.claims, {}
        for hotkey, claims in closed.items():
            self._baseline[hotkey] = claims.last_samples
        self._forget(time.time() - self.forget_after_s)
        return closed

    def _forget(self, before: float) -> None:
        """Drop what is kept about miners whose latest record was read before ``before``."""
        gone = {hotkey for hotkey, at in self._last_record.items() if at < before}
        for hotkey in gone:
            del self._last_record[hotkey]
            self._baseline.pop(hotkey, None)
            self._seen.pop(hotkey, None)
