"""Receipts: whose parts a reducer received in a gradient round, sent from the averager's child to its owner.

A miner is rewarded for what the other members of its rounds received from it, not for what it reports
about itself. Every member of a butterfly all-reduce reduces its partition of the vector and receives
every other sender's part of it; once a round has run, the averager's child (where hivemind runs the
round) sends its owner a ``Receipt``: the senders whose every part of that partition it counted, each
at the weight (the samples) it declared. A sender that was banned, refused (not admitted), sent a
malformed part or dropped out of the round is not named.

The owner (the miner) drains its ``ReceiptLog`` and writes each receipt as a signed ``ReceiptRecord``;
the validator credits each sender from the receipts of the other hotkeys in its rounds
(``hivetrain.validator.receipts``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from hivetrain.hivemind_compat.bans import ChildQueue
from hivetrain.protocol.records import MAX_RECEIPT_SENDERS, MAX_SAMPLED_SENDERS, PartSample, ReceiptRecord


@dataclass(frozen=True)
class Receipt:
    """One round as one reducer saw it: the averager's prefix, the group id (hex), sender -> declared weight, and
    for audits sender -> its part at coordinates we drew (``PartSample``'s fields)."""

    prefix: str
    group: str
    senders: dict[str, float]
    samples: dict[str, dict] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def record(self, reducer: str) -> ReceiptRecord:
        """This receipt as the telemetry record ``reducer`` (our peer id) signs and writes."""
        senders = dict(sorted(self.senders.items())[:MAX_RECEIPT_SENDERS])
        samples = {
            peer: PartSample(**{**sample, "values": [float(f"{v:.7g}") for v in sample["values"]]})  # float32's digits
            for peer, sample in sorted(self.samples.items())
            if peer in senders
        }
        return ReceiptRecord(
            peer_id=reducer,
            averager=self.prefix,
            group=self.group,
            senders=senders,
            samples=dict(list(samples.items())[:MAX_SAMPLED_SENDERS]),
            time=self.time,
        )


class ReceiptLog:
    """The receipts of one owner's gradient averager (in its forked child), for the owner's telemetry.

    Made in the parent before the averager forks, like ``OffenceLog``: its ``ChildQueue`` is how the child hands
    them over. Bounded: when nobody drains, the oldest rounds stay and new ones are dropped.
    """

    def __init__(self, maxsize: int = 10_000):
        self._queue = ChildQueue(maxsize)

    def send(self, receipt: Receipt) -> None:
        """Hand ``receipt`` to the owner (called in the averager's child)."""
        self._queue.send(receipt)

    def drain(self, limit: int = 1000) -> list[Receipt]:
        """Receipts sent since the last call, oldest first, at most ``limit``."""
        return self._queue.drain(limit)

    def drain_records(self, reducer: str) -> list[ReceiptRecord]:
        """``drain`` as the telemetry records ``reducer`` (our peer id) signs and writes."""
        return [receipt.record(reducer) for receipt in self.drain()]
