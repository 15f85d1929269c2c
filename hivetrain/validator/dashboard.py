"""What the dashboard draws: one JSON document (``GET /api/dashboard``) for the page at ``GET /``.

Telemetry is read incrementally, per gunicorn worker: the first request reads the newest
``BACKFILL`` entries of the step, round and offence streams; later ones only what was added since,
so each entry's signature is checked once, not on every poll. Step records are down-sampled to one
point per miner per ``BUCKET_S`` seconds and kept for ``POINTS_KEPT`` buckets.

Attribution is as strict as ``/api/swarm``: a step, a round or an offence counts only if it was
signed by the hotkey its peer registered with (offences caught by this validator: by its own
hotkey), so a record signed by anyone else cannot draw a line, a round or a ban for a peer.
Peer-chosen strings (device, preset, reasons) reach the page as data; the page sets them as text.
"""

from __future__ import annotations

import collections
import statistics
import threading
import time
from dataclasses import dataclass, field

import redis

from hivetrain.identity import Domain
from hivetrain.protocol.envelopes import decode_entry
from hivetrain.protocol.records import (
    EvalRecord,
    Keys,
    OffenceRecord,
    PeerRecord,
    Record,
    RoundRecord,
    ScoreBoard,
    StepRecord,
    ValidatorStatus,
)
from hivetrain.protocol.rounds import rounds_from_records

#: Newest entries of each stream the first request reads.
BACKFILL = 20_000
#: New entries one refresh reads; a burst larger than this skips to the newest BACKFILL.
READ_PER_REFRESH = 20_000
#: Width of one chart point, and how many are kept per miner (an hour).
BUCKET_S = 10.0
POINTS_KEPT = 360
#: Miners drawn as their own lines (the highest weights); every miner is in the median and band.
SERIES_SHOWN = 8
#: Round and offence records kept per worker; step series kept at most (the stalest go first).
ROUNDS_KEPT = 5_000
OFFENCES_KEPT = 5_000
SERIES_KEPT = 2_000
#: Averaging rounds and evaluations sent to the page.
ROUNDS_SHOWN = 300
EVALS_SHOWN = 500


def _stream_id(raw: bytes) -> tuple[int, int]:
    ms, _, seq = raw.decode().partition("-")
    return int(ms), int(seq or 0)


class StreamTail:
    """The authentic entries of one stream added since the last read, oldest first, each decoded once."""

    def __init__(
        self,
        client: redis.Redis,
        key: str,
        model: type[Record],
        domain: Domain,
        backfill: int = BACKFILL,
        per_read: int = READ_PER_REFRESH,
    ):
        self.client, self.key, self.model, self.backfill, self.per_read = client, key, model, backfill, per_read
        self.domain = domain
        self.last: bytes | None = None

    def read_new(self) -> list[tuple[Record, str]]:
        """(record, signer) of every new entry; a stream that was emptied or reset is read afresh."""
        if self.last is None:
            entries = self._newest()
        else:
            entries = self.client.xrange(self.key, min=b"(" + self.last, count=self.per_read)
            if len(entries) == self.per_read:  # a burst: the newest matter, the middle is skipped
                entries = [e for e in self._newest() if _stream_id(e[0]) > _stream_id(self.last)]
            elif not entries:
                newest = self.client.xrevrange(self.key, count=1)
                if not newest or _stream_id(newest[0][0]) < _stream_id(self.last):  # flushed or recreated
                    self.last = None
                    entries = self._newest()
        if entries:
            self.last = entries[-1][0]
        decoded = (decode_entry(self.model, fields, self.domain) for _, fields in entries)
        return [d for d in decoded if d is not None]

    def _newest(self) -> list:
        return list(reversed(self.client.xrevrange(self.key, count=self.backfill)))


@dataclass
class MinerSeries:
    """One (peer id, signer)'s steps: the latest, and per BUCKET_S bucket the last loss and tokens/s."""

    latest: StepRecord
    points: collections.deque = field(default_factory=lambda: collections.deque(maxlen=POINTS_KEPT))

    def add(self, step: StepRecord) -> None:
        bucket = step.time - step.time % BUCKET_S
        point = (bucket, step.loss, step.tokens_per_s)
        if self.points and self.points[-1][0] == bucket:
            self.points[-1] = point
        elif not self.points or bucket > self.points[-1][0]:
            self.points.append(point)
        if step.time >= self.latest.time:
            self.latest = step


class TelemetryHistory:
    """A worker's memory of the swarm's telemetry, refreshed from Redis on each dashboard request."""

    def __init__(self, client: redis.Redis, keys: Keys, domain: Domain):
        self.client, self.keys = client, keys
        self._lock = threading.Lock()
        self._steps = StreamTail(client, keys.steps, StepRecord, domain)
        self._rounds_tail = StreamTail(client, keys.rounds, RoundRecord, domain)
        self._offences_tail = StreamTail(client, keys.offences, OffenceRecord, domain)
        self.series: collections.OrderedDict[tuple[str, str], MinerSeries] = collections.OrderedDict()
        self.rounds: collections.deque = collections.deque(maxlen=ROUNDS_KEPT)
        self.offences: collections.deque = collections.deque(maxlen=OFFENCES_KEPT)

    def refresh(self) -> None:
        with self._lock:
            for step, signer in self._steps.read_new():
                key = (step.peer_id, signer)
                series = self.series.get(key)
                if series is None:
                    series = self.series[key] = MinerSeries(latest=step)
                    if len(self.series) > SERIES_KEPT:
                        self.series.popitem(last=False)
                self.series.move_to_end(key)
                series.add(step)
            self.rounds.extend(self._rounds_tail.read_new())
            self.offences.extend(self._offences_tail.read_new())

    def view(
        self,
        peers: list[PeerRecord],
        board: ScoreBoard | None,
        evals: list[EvalRecord],
        status: ValidatorStatus | None,
        validator: str,
        now: float | None = None,
    ) -> dict:
        """The dashboard document for the live ``peers``, this validator's ``board``, ``evals`` and ``status``."""
        now = time.time() if now is None else now
        registered = {peer.peer_id: peer.hotkey for peer in peers}
        miners = [peer for peer in peers if peer.role == "miner"]
        with self._lock:
            series = {peer.peer_id: self.series.get((peer.peer_id, peer.hotkey)) for peer in miners}
            rounds = [r for r, signer in self.rounds if registered.get(r.peer_id) == signer]
            offences = [
                o
                for o, signer in self.offences
                if registered.get(o.peer_id) == signer or (signer == validator and signer)
            ]
            points = {peer_id: list(s.points) for peer_id, s in series.items() if s is not None}
            latest = {peer_id: s.latest for peer_id, s in series.items() if s is not None}
        scores = {m.hotkey: m for m in board.miners} if board is not None else {}
        rows = [_miner_row(peer, latest.get(peer.peer_id), scores.get(peer.hotkey), offences, now) for peer in miners]
        rows.sort(key=lambda row: (-row["weight"], -row["samples"], row["hotkey"]))
        shown = [row["peer_id"] for row in rows if row["peer_id"] in points][:SERIES_SHOWN]
        checkpoints = [step.checkpoint_epoch for step in latest.values() if step.checkpoint_epoch >= 0]
        newest_checkpoint = max(checkpoints, default=None)
        return {
            "run_id": self.keys.run_id,
            "now": now,
            "validator": _validator_view(validator, status, board),
            "swarm": {
                "epoch": max((step.global_epoch for step in latest.values()), default=None),
                "live_miners": len(miners),
                "live_peers": len(peers),
                "tokens_per_s": sum(step.tokens_per_s for step in latest.values() if now - step.time < 6 * BUCKET_S),
                "newest_checkpoint": newest_checkpoint,
                "miners_with_it": sum(1 for epoch in checkpoints if epoch == newest_checkpoint),
            },
            "charts": {
                "eval_loss": [[e.time, e.loss, e.epoch] for e in evals],
                "train_loss": _chart(points, shown, rows, value=1),
                "tokens_per_s": _chart(points, shown, rows, value=2),
                "rounds": [
                    {key: r[key] for key in ("time", "epoch", "kind", "group_size", "duration_s")}
                    for r in rounds_from_records(rounds)[-ROUNDS_SHOWN:]
                ],
            },
            "miners": rows,
        }


def _validator_view(hotkey: str, status: ValidatorStatus | None, board: ScoreBoard | None) -> dict:
    view = {
        "hotkey": hotkey,
        "running": status is not None,
        "preset": None,
        "parameters": None,
        "epoch": None,
        "synced_at": None,
        "weights_set_at": None,
        "scoring_rounds": 0,
    }
    if status is not None:
        view.update(
            preset=status.preset, parameters=status.parameters, epoch=status.epoch, synced_at=status.synced_at or None
        )
    if board is not None:
        view.update(weights_set_at=board.weights_set_at, scoring_rounds=board.rounds)
    return view


def _chart(points: dict[str, list], shown: list[str], rows: list[dict], value: int) -> dict:
    """Lines for the ``shown`` miners, and per bucket over every miner: median, min, max and sum."""
    labels = {row["peer_id"]: row["hotkey"][:8] or row["peer_id"][:8] for row in rows}
    by_bucket: dict[float, list[float]] = collections.defaultdict(list)
    for series in points.values():
        for point in series:
            by_bucket[point[0]].append(point[value])
    buckets = sorted(by_bucket)
    return {
        "miners": [
            {
                "peer_id": peer_id,
                "label": labels.get(peer_id, peer_id[:8]),
                "points": [[p[0], p[value]] for p in points[peer_id]],
            }
            for peer_id in shown
        ],
        "median": [[b, statistics.median(by_bucket[b])] for b in buckets],
        "low": [[b, min(by_bucket[b])] for b in buckets],
        "high": [[b, max(by_bucket[b])] for b in buckets],
        "total": [[b, sum(by_bucket[b])] for b in buckets],
    }


def _miner_row(peer: PeerRecord, step: StepRecord | None, score, offences: list[OffenceRecord], now: float) -> dict:
    evidence = score.evidence[-1] if score is not None and score.evidence else {}
    against = [o for o in offences if o.offender == peer.peer_id]
    banning = [o for o in against if o.time + o.banned_s > now]
    return {
        "hotkey": peer.hotkey,
        "peer_id": peer.peer_id,
        "device": peer.device,
        "preset": peer.preset,
        "last_seen": peer.last_seen,
        "local_epoch": None if step is None else step.local_epoch,
        "global_epoch": None if step is None else step.global_epoch,
        "loss": None if step is None else step.loss,
        "tokens_per_s": 0.0 if step is None else step.tokens_per_s,
        "samples": 0 if step is None else step.samples,
        "checkpoint_epoch": None if step is None or step.checkpoint_epoch < 0 else step.checkpoint_epoch,
        "claimed": evidence.get("claimed_samples"),
        "verified": evidence.get("verified_samples"),
        "checks": evidence.get("checks", []),
        "reasons": evidence.get("reasons", []),
        "score": 0.0 if score is None else score.score,
        "weight": 0.0 if score is None else score.weight,
        "banned": bool(banning),
        "offences": [
            {
                "role": o.role,
                "reason": o.reason,
                "caught_by": o.peer_id,
                "time": o.time,
                "banned_until": o.time + o.banned_s,
            }
            for o in against[-5:]
        ],
        "named_by": len({o.peer_id for o in banning}),
    }
