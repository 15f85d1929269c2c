"""What the swarm received from each miner: read from the receipts the other members of its rounds signed.

Every member of a gradient round reduces a partition and, after the round, signs a ``ReceiptRecord``:
the other senders whose every part of that partition it counted, each at the weight (samples) it
declared (``hivetrain.hivemind_compat.receipts``). ``ReceiptReader`` reads them once, keeps those whose
signer's live registration names the reducer's peer id, and settles each round once its receipts
had time to arrive:

* a sender is credited, for one round, the upper median over the *other* hotkeys that reported the
  round of what each says it received from it (0 where one did not name it): what it says itself,
  or what other peers of its own hotkey say, never counts. It takes half of the others to credit a
  sender, and more than half to erase one: in a group of three, one member that leaves an honest
  sender out of its receipt cannot erase it (erasing others would raise the eraser's own share of
  the weights), and one that names a sender that sent nothing can credit it (that takes a second
  admitted hotkey: an operator's own, which is what audits of rounds are for);
* then capped at the lower median of the round's credited weights, as the all-reduce caps the weight
  each part counts with (``AggregationRule.max_weight_ratio``): a sender is credited for the influence
  the swarm gave its part, so declaring a huge weight earns no more than a typical member;
* a round is credited once: a receipt of a round already settled, or older than ``max_age_s``, is
  dropped (the bootstrap refuses replays already; this is the validator's own guard).

``CreditLedger`` turns that into a window's credit: min(what the claims check verified, what the swarm
received), cumulatively, so that a window with steps but no round (DiLoCo's outer rounds are minutes
apart) is paid when the round lands, and received samples never pay for more than was claimed.

A settled round's receipts also say what each sender's parts held at a few coordinates (``PartSample``): those
rounds are handed on as candidates for audits (``take_candidates``, ``hivetrain.validator.audits``).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import redis

from hivetrain.aggregation import AggregationRule
from hivetrain.identity import Domain
from hivetrain.log import get_logger
from hivetrain.protocol.envelopes import decode_entry
from hivetrain.protocol.progress import lower_median
from hivetrain.protocol.records import RECEIPTS_STREAM_MAXLEN, Keys, PartSample, PeerRecord, ReceiptRecord
from hivetrain.validator.audits import MAX_CANDIDATES, Candidate, round_candidates

logger = get_logger(__name__)

#: A round is settled this long after its first receipt was read: the others' receipts come within a few
#: telemetry flushes of it (a miner writes its telemetry between steps).
SETTLE_S = 20.0
#: A receipt signed longer ago than this is not credited (a replay, or a miner's backlog after an outage).
MAX_RECEIPT_AGE_S = 300.0
#: Rounds remembered as settled (a receipt of one of them is dropped), and rounds pending at most.
MAX_SETTLED_ROUNDS = 50_000
MAX_PENDING_ROUNDS = 20_000
#: A part counts at most this many times the round's lower median weight in the aggregate, and is credited so.
CREDIT_WEIGHT_RATIO = AggregationRule().max_weight_ratio


@dataclass
class _Round:
    first_read: float
    reports: dict[str, dict[str, float]] = field(default_factory=dict)  # reporter hotkey -> sender peer id -> weight
    samples: dict[str, dict[str, PartSample]] = field(default_factory=dict)  # reporter hotkey -> sender -> values


@dataclass(frozen=True)
class Received:
    """What the swarm received from one miner in the rounds settled: samples credited and rounds counted."""

    samples: float = 0.0
    rounds: int = 0


def credit_round(reports: dict[str, dict[str, float]], hotkey_of: dict[str, str]) -> dict[str, float]:
    """Samples credited to each sender hotkey for one round, from ``reports`` (reporter hotkey -> sender peer id
    -> weight received); ``hotkey_of`` maps a live miner's peer id to its hotkey (other senders are not credited).
    See the module docstring."""
    senders: dict[str, str] = {}  # sender hotkey -> its peer id in this round (the first named)
    for received in reports.values():
        for peer in received:
            if peer in hotkey_of:
                senders.setdefault(hotkey_of[peer], peer)
    attested: dict[str, float] = {}
    for hotkey, peer in senders.items():
        seen = sorted(received.get(peer, 0.0) for reporter, received in reports.items() if reporter != hotkey)
        if seen:
            attested[hotkey] = seen[len(seen) // 2]  # the upper median
    positive = [weight for weight in attested.values() if weight > 0]
    if not positive:
        return {}
    cap = lower_median(positive) * CREDIT_WEIGHT_RATIO
    return {hotkey: min(weight, cap) for hotkey, weight in attested.items() if weight > 0}


class ReceiptReader:
    """Consumes the receipts stream from where it last stopped and settles rounds into ``Received`` per hotkey."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        domain: Domain,
        settle_s: float = SETTLE_S,
        max_age_s: float = MAX_RECEIPT_AGE_S,
        batch: int = 1000,
        cap: int = RECEIPTS_STREAM_MAXLEN,
    ):
        self.client, self.keys, self.domain = client, keys, domain
        self.settle_s, self.max_age_s, self.batch, self.cap = settle_s, max_age_s, batch, cap
        self.last_id = "$"
        self.rejected: collections.Counter[str] = collections.Counter()
        self._pending: dict[tuple[str, str], _Round] = {}
        self._settled: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        self._received: dict[str, Received] = {}
        self._candidates: list[Candidate] = []  # (sender, round) pairs of settled rounds that can be audited

    def start(self) -> "ReceiptReader":
        """Remember the stream's end: only receipts written from now on count."""
        info = self.client.xrevrange(self.keys.receipts, count=1)
        self.last_id = info[0][0].decode() if info else "0-0"
        return self

    def poll(self, registrations: dict[str, PeerRecord], now: float | None = None) -> int:
        """Read every new receipt, up to ``cap``; ``registrations``: hotkey -> its live, verified registration.
        Settles the rounds that are due. Returns receipts read."""
        now = time.time() if now is None else now
        read = 0
        while read < self.cap:
            asked = min(self.batch, self.cap - read)
            entries = self.client.xrange(self.keys.receipts, min=f"({self.last_id}", count=asked)
            for entry_id, fields in entries:
                self.last_id = entry_id.decode()
                self._consume(fields, registrations, now)
            read += len(entries)
            if len(entries) < asked:
                break
        self._settle(registrations, now)
        return read

    def _consume(self, fields: dict, registrations: dict[str, PeerRecord], now: float) -> None:
        decoded = decode_entry(ReceiptRecord, fields, self.domain)
        if decoded is None:
            self.rejected["not authentic"] += 1
            return
        record, hotkey = decoded
        registration = registrations.get(hotkey)
        if registration is None or registration.peer_id != record.peer_id:
            self.rejected["unregistered"] += 1
            return
        if not now - self.max_age_s <= record.time <= now + 60.0:
            self.rejected["stale"] += 1
            return
        key = (record.averager, record.group)
        if key in self._settled:
            self.rejected["round already settled"] += 1
            return
        found = self._pending.get(key)
        if found is None:
            if len(self._pending) >= MAX_PENDING_ROUNDS:
                self.rejected["too many rounds pending"] += 1
                return
            found = self._pending[key] = _Round(first_read=now)
        if hotkey not in found.reports:  # one report per hotkey and round: its first
            found.reports[hotkey], found.samples[hotkey] = dict(record.senders), dict(record.samples)

    def _settle(self, registrations: dict[str, PeerRecord], now: float) -> None:
        hotkey_of = {peer.peer_id: hotkey for hotkey, peer in registrations.items()}
        due = [key for key, found in self._pending.items() if now - found.first_read >= self.settle_s]
        for key in due:
            settled = self._pending.pop(key)
            credited = credit_round(settled.reports, hotkey_of)
            for hotkey, samples in credited.items():
                before = self._received.get(hotkey, Received())
                self._received[hotkey] = Received(before.samples + samples, before.rounds + 1)
            self._candidates += round_candidates(key, settled.reports, settled.samples, hotkey_of, set(credited))
            del self._candidates[:-MAX_CANDIDATES]
            self._settled[key] = None
        while len(self._settled) > MAX_SETTLED_ROUNDS:
            self._settled.popitem(last=False)

    def take_candidates(self) -> list[Candidate]:
        """The (sender, round) pairs of the rounds settled since the last call that can be audited
        (``hivetrain.validator.audits``)."""
        taken, self._candidates = self._candidates, []
        return taken

    def close_window(self) -> dict[str, Received]:
        """What the swarm received from each hotkey in the rounds settled since the last call."""
        closed, self._received = self._received, {}
        return closed


class CreditLedger:
    """Per hotkey, what the claims check verified and the swarm received, not yet paid: a window pays the
    smaller of the two, and carries the rest (each at most ``carry`` samples) to the next window."""

    def __init__(self, carry: float):
        self.carry = carry
        self._owed: dict[str, float] = {}  # verified by the claims check, not yet backed by receipts
        self._banked: dict[str, float] = {}  # received by the swarm, not yet claimed

    def pay(self, hotkey: str, verified: int, received: float) -> int:
        """This window's credit for ``hotkey``: samples both verified and received, this window or carried."""
        owed = self._owed.get(hotkey, 0.0) + max(0, verified)
        banked = self._banked.get(hotkey, 0.0) + max(0.0, received)
        paid = int(min(owed, banked))
        self._owed[hotkey] = min(self.carry, owed - paid)
        self._banked[hotkey] = min(self.carry, banked - paid)
        return paid

    def saved(self) -> dict[str, tuple[float, float]]:
        """hotkey -> (owed, banked), for the validator's saved state (only what is not zero)."""
        hotkeys = set(self._owed) | set(self._banked)
        carried = {h: (self._owed.get(h, 0.0), self._banked.get(h, 0.0)) for h in sorted(hotkeys)}
        return {h: pair for h, pair in carried.items() if pair != (0.0, 0.0)}

    def restore(self, carried: dict[str, tuple[float, float]]) -> None:
        """Take up what a saved state carried (each side at most ``carry``)."""
        for hotkey, (owed, banked) in carried.items():
            self._owed[hotkey] = min(self.carry, max(0.0, owed))
            self._banked[hotkey] = min(self.carry, max(0.0, banked))

    def forget(self, keep: set[str]) -> None:
        """Drop what is carried for hotkeys not in ``keep`` (miners that left)."""
        self._owed = {h: v for h, v in self._owed.items() if h in keep}
        self._banked = {h: v for h, v in self._banked.items() if h in keep}
