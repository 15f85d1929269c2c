"""Peers caught misbehaving: named once (an ``Offence`` for the parent's telemetry) and banned for a while.

hivemind's averagers run in forked children, and what they catch (a bad all-reduce part, a bad
answer, a poisoned state download) happens there: ``ban`` records the ban in that child and sends
the ``Offence`` to the parent through a queue made before the fork (``prepare``). The parent
(the miner, the validator) reads them with ``drain_offences`` and writes signed telemetry.
Offences caught in the parent itself (an implausible progress record) go through ``report_offence``.

Bans are per process: each averager keeps its own list, and a peer banned by the gradient
averager is still asked by the state averager (and caught there again if it misbehaves there too).
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import queue
import time
from dataclasses import dataclass

from hivetrain.log import get_logger
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


class _Shared:
    ban_s: float = DEFAULT_BAN_S
    queue: "mp.Queue[Offence] | None" = None


_banned: dict[str, float] = {}  # peer id -> time.monotonic() its ban ends, in this process
_local: collections.deque[Offence] = collections.deque(maxlen=10_000)


def prepare(ban_s: float | None = None) -> None:
    """Make the queue the averagers report through (before they fork) and set the ban length."""
    if ban_s is not None:
        if not ban_s >= 0:
            raise ValueError(f"ban_s must be >= 0, got {ban_s}")
        _Shared.ban_s = float(ban_s)
    if _Shared.queue is None:
        _Shared.queue = mp.get_context("fork").Queue(maxsize=10_000)


def clear_bans() -> None:
    _banned.clear()


def is_banned(peer_id: str, now: float | None = None) -> bool:
    until = _banned.get(peer_id)
    return until is not None and (time.monotonic() if now is None else now) < until


def ban(peer_id: str, prefix: str, role: str, reason: str) -> None:
    """Ban ``peer_id`` in this process for the configured time and name it to the parent (from an averager child)."""
    logger.warning(f"{prefix}: {role} {peer_id} {reason}; banned for {_Shared.ban_s:.0f}s")
    _banned[peer_id] = time.monotonic() + _Shared.ban_s
    offence = Offence(peer_id, prefix, role, reason, time.time())
    if _Shared.queue is None:  # nobody prepared a queue: the ban holds, the log line is the record
        return
    _Shared.queue.cancel_join_thread()  # an averager that exits must not wait on a parent that stopped reading
    try:
        _Shared.queue.put_nowait(offence)
    except queue.Full:  # nobody drains: the ban still holds, the record is lost
        pass


def report_offence(peer_id: str, prefix: str, role: str, reason: str) -> None:
    """Name an offender caught in this process (not in an averager child), e.g. by the progress tracker."""
    logger.warning(f"{prefix}: {role} {peer_id} {reason}")
    _local.append(Offence(peer_id, prefix, role, reason, time.time()))


def drain_offences(limit: int = 1000) -> list[Offence]:
    """Offences reported since the last call: by the averagers (forked children) and by this process."""
    found: list[Offence] = []
    while _local and len(found) < limit:
        found.append(_local.popleft())
    while _Shared.queue is not None and len(found) < limit:
        try:
            found.append(_Shared.queue.get_nowait())
        except queue.Empty:
            break
    return found


def drain_offence_records(caught_by: str) -> list[OffenceRecord]:
    """``drain_offences`` as the telemetry records ``caught_by`` (our peer id) signs and writes."""
    return [OffenceRecord(peer_id=caught_by, offender=o.peer_id, averager=o.prefix, role=o.role, reason=o.reason[:500],
                          banned_s=_Shared.ban_s, time=o.time) for o in drain_offences()]
