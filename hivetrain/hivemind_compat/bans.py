"""Peers caught misbehaving: named once (an ``Offence`` for the owner's telemetry) and banned for a while.

Each owner of averagers (the miner's optimizer, the validator) keeps one ``OffenceLog``, made in the
parent before its averagers fork. hivemind's averagers run in forked children, and what they catch
(a bad all-reduce part, a bad answer, a poisoned state download) happens there: each averager holds
its own ``Bans`` (the peers it ignores, kept in its child) over its owner's log, and ``Bans.ban``
sends the ``Offence`` to the parent through the log's queue. Offences caught in the parent itself
(an implausible progress record) go through ``OffenceLog.report``. The owner reads both with
``OffenceLog.drain`` / ``drain_records`` and writes signed telemetry.

With an ``Admission`` (``hivetrain.protocol.admission``), ``Bans.refuses`` also refuses every peer id
that is not admitted, and a ban holds for the hotkey of the peer caught: a new libp2p key of that hotkey
is still banned.

A ban holds for every averager of one owner: the ``Bans`` made over one ``OffenceLog`` share its
``BanTable`` (shared memory, made in the parent before the averagers fork), so a peer the gradient
averager caught sending NaN is not asked for its state by the state averager either. Nothing here is
process-global: two owners (two optimizers, or a miner and a validator in one test process) each have
their own log, table and bans.
"""

from __future__ import annotations

import collections
import hashlib
import multiprocessing as mp
import queue
import time
from dataclasses import dataclass

from hivetrain.log import get_logger
from hivetrain.protocol.admission import OPEN, Admission
from hivetrain.protocol.records import OffenceRecord

logger = get_logger(__name__)

#: How long a caught peer is ignored when nothing configured it (the miner's ``HIVE_BAN_S`` default).
DEFAULT_BAN_S = 600.0


@dataclass(frozen=True)
class Offence:
    """One peer caught once: who, by which averager (its DHT prefix), in which role, and why."""

    peer_id: str
    prefix: str
    role: str  # "sender" (its all-reduce part), "reducer" (its answer), "state" (the state it served), "progress"
    reason: str
    time: float
    # what it sent cannot be honest (NaN, a wrong shape, an epoch beyond the bound...), as opposed to an honest
    # peer's possible bad luck (a slow link past a deadline): a validator zeroes the hotkey of a proven offence
    proven: bool = True

    def record(self, caught_by: str, banned_s: float) -> OffenceRecord:
        """This offence as the telemetry record ``caught_by`` (our peer id) signs and writes."""
        return OffenceRecord(
            peer_id=caught_by,
            offender=self.peer_id,
            averager=self.prefix,
            role=self.role,
            reason=self.reason[:500],
            banned_s=banned_s,
            time=self.time,
        )


class ChildQueue:
    """What an owner's forked children (its averagers) hand the owner: a bounded queue made before the fork. A child's
    ``send`` never blocks, and never holds an exiting child on an owner that stopped reading; when nobody drains,
    what does not fit is dropped. The owner takes what arrived with ``drain``."""

    def __init__(self, maxsize: int = 10_000):
        self._queue: mp.Queue = mp.get_context("fork").Queue(maxsize=maxsize)

    def send(self, item) -> None:
        self._queue.cancel_join_thread()  # an averager that exits must not wait on an owner that stopped reading
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            pass

    def drain(self, limit: int) -> list:
        """What arrived since the last call, oldest first, at most ``limit`` items."""
        found: list = []
        while len(found) < limit:
            try:
                found.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return found


class BanTable:
    """Bans shared by the forked children of one owner: ``slots`` entries of (hash of who, monotonic end), in shared
    memory made before the children fork. Each key has ``PROBES`` slots it may use; when all are taken, the ban
    that ends first gives way (a flood of bans forgets the oldest, never blocks)."""

    PROBES = 16

    def __init__(self, slots: int = 4096):
        context = mp.get_context("fork")
        self._keys = context.Array("Q", slots, lock=False)  # 0: an empty slot
        self._ends = context.Array("d", slots, lock=False)  # time.monotonic() (system-wide on Linux) the ban ends
        self._lock = context.Lock()
        self.slots = slots

    @staticmethod
    def _key(who: str) -> int:
        return int.from_bytes(hashlib.blake2b(who.encode(), digest_size=8).digest(), "big") or 1

    def _probe(self, key: int) -> range:
        start = key % self.slots
        return range(start, start + min(self.PROBES, self.slots))

    def ban(self, who: str, until: float) -> None:
        key = self._key(who)
        with self._lock:
            slots = [index % self.slots for index in self._probe(key)]
            same = [index for index in slots if self._keys[index] == key]
            index = same[0] if same else min(slots, key=lambda i: (self._keys[i] != 0, self._ends[i]))
            self._keys[index], self._ends[index] = key, max(until, self._ends[index] if same else 0.0)

    def until(self, who: str) -> float:
        """When the ban of ``who`` ends (0.0: none known)."""
        key = self._key(who)
        ends = [self._ends[i % self.slots] for i in self._probe(key) if self._keys[i % self.slots] == key]
        return max(ends, default=0.0)


class OffenceLog:
    """The offences one owner's averagers (in their forked children) and the owner itself caught.

    Made in the parent before the averagers fork: its queue is how a child names an offender.
    ``ban_s`` is how long its averagers ban a caught peer, and what its telemetry records say.
    """

    def __init__(self, ban_s: float = DEFAULT_BAN_S):
        if not ban_s >= 0:
            raise ValueError(f"ban_s must be >= 0, got {ban_s}")
        self.ban_s = float(ban_s)
        self._queue = ChildQueue()
        self._local: collections.deque[Offence] = collections.deque(maxlen=10_000)
        self.bans = BanTable()  # what the owner's averagers banned, seen by all of them

    def send(self, offence: Offence) -> None:
        """Pass ``offence`` to the parent (called in an averager's child). When nobody drains, the ban still holds
        and the record is lost."""
        self._queue.send(offence)

    def report(self, peer_id: str, prefix: str, role: str, reason: str) -> None:
        """Name an offender caught in this process (not in an averager child), e.g. by the progress tracker."""
        logger.warning(f"{prefix}: {role} {peer_id} {reason}")
        self._local.append(Offence(peer_id, prefix, role, reason, time.time()))

    def drain(self, limit: int = 1000) -> list[Offence]:
        """Offences reported since the last call: by the averagers (forked children) and by this process."""
        found: list[Offence] = []
        while self._local and len(found) < limit:
            found.append(self._local.popleft())
        return found + self._queue.drain(limit - len(found))

    def drain_records(self, caught_by: str) -> list[OffenceRecord]:
        """``drain`` as the telemetry records ``caught_by`` (our peer id) signs and writes."""
        return [offence.record(caught_by, self.ban_s) for offence in self.drain()]


class Bans:
    """The peers one averager ignores: those not admitted, those it caught; and the log it names them to.

    Made in the parent and handed to the averager before it forks; the child bans and checks, so
    the parent's copy stays empty. Without a log (``Bans()``) a ban holds for ``DEFAULT_BAN_S``
    and the log line is its only record. ``admission`` (default: open) says who is admitted and
    whose hotkey each peer id is: a ban holds for the hotkey.
    """

    def __init__(self, log: OffenceLog | None = None, admission: Admission | None = None):
        self.log = log
        self.admission = admission if admission is not None else OPEN
        self.ban_s = DEFAULT_BAN_S if log is None else log.ban_s
        self._until: dict[str, float] = {}  # voter (a hotkey, or a peer id when none is known) -> its ban's end

    def is_banned(self, peer_id: str, now: float | None = None) -> bool:
        """Whether ``peer_id``, or the hotkey it is bound to, was caught and is still banned: by this averager, or
        by another averager of the same owner (its log's ``BanTable``)."""
        now = time.monotonic() if now is None else now
        table = self.log.bans if self.log is not None else None
        return any(
            now < self._until.get(who, 0.0) or (table is not None and now < table.until(who))
            for who in {peer_id, self.admission.voter(peer_id)}
        )

    def refuses(self, peer_id: str, where: str = "") -> bool:
        """Whether ``peer_id`` may not take part: banned, or not admitted (logged once a while, not named)."""
        return self.is_banned(peer_id) or self.admission.refusal(peer_id, where or "training") is not None

    def voter(self, peer_id: str) -> str:
        """Whom ``peer_id`` counts as where votes are counted (``Admission.voter``)."""
        return self.admission.voter(peer_id)

    def ban(self, peer_id: str, prefix: str, role: str, reason: str, proven: bool = True) -> None:
        """Ban ``peer_id`` and its hotkey for ``ban_s`` and name it to the parent (from an averager child);
        ``proven=False`` for what an honest peer's bad luck can look like (``Offence.proven``)."""
        logger.warning(f"{prefix}: {role} {peer_id} {reason}; banned for {self.ban_s:.0f}s")
        until = time.monotonic() + self.ban_s
        for who in {peer_id, self.admission.voter(peer_id)}:
            self._until[who] = until
            if self.log is not None:
                self.log.bans.ban(who, until)
        if self.log is not None:
            self.log.send(Offence(peer_id, prefix, role, reason, time.time(), proven))

    def clear(self) -> None:
        self._until.clear()
