"""What hivemind's progress records in the DHT show each peer did, polled while the validator runs.

hivemind.Optimizer's ``ProgressTracker`` publishes every peer's ``LocalTrainingProgress`` under
``f"{run_id}_progress"``; the swarm schedules its epochs from these records, so inflating them
breaks the miner's own collaboration and shows. ``ProgressPoller`` reads them every second into a
``ProgressLedger``; the claim check (``hivetrain.validator.verdicts.check_claimed_samples``)
compares what a miner claims with what the ledger saw.
"""

from __future__ import annotations

import heapq
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping

from pydantic import Field

from hivetrain.hivemind_compat import OffenceLog
from hivetrain.hivemind_compat.progress import live_progress_records, progress_signer, progress_values
from hivetrain.log import get_logger
from hivetrain.protocol.admission import OPEN, Admission
from hivetrain.protocol.progress import MAX_SAMPLES_PER_S, NameOnce, epoch_bound, implausible
from hivetrain.protocol.records import Record

logger = get_logger(__name__)


class PeerProgress(Record):
    """One peer's ``LocalTrainingProgress`` as hivemind's ProgressTracker stores it in the DHT."""

    peer_id: str = Field(min_length=1, description="base58 peer id from the record (not authenticated by hivemind)")
    epoch: int = Field(ge=0)
    samples_accumulated: int = Field(ge=0, description="samples towards the peer's current epoch")
    samples_per_second: float = Field(ge=0)
    time: float = Field(description="DHT time of the report")
    client_mode: bool


def fetch_progress(
    dht, run_id: str, on_forged: Callable[[str, str], None] | None = None, admission: Admission = OPEN
) -> dict[str, PeerProgress]:
    """Every live peer's latest training progress for ``run_id``, by peer id.

    ProgressTracker stores ``LocalTrainingProgress.dict()`` under ``f"{run_id}_progress"`` with
    the subkey = the writer's RSA public key. A record counts only for the peer whose key signed it
    (miners sign with their DHT identity's key: ``hivemind_compat.progress.IdentityKey``); one that
    names another peer id is left out, and its signer named through ``on_forged(signer, reason)``.
    Several records of one peer keep the most advanced (epoch, samples). Records of peers ``admission``
    does not admit are left out.
    """
    progress: dict[str, PeerProgress] = {}
    for subkey, raw in live_progress_records(dht, run_id):
        try:
            record = PeerProgress(**progress_values(raw))
        except Exception as error:  # a stranger's record: anything malformed is skipped
            logger.warning(f"skipping a malformed progress record under {str(subkey)[:80]!r}: {error!r}")
            continue
        signer = progress_signer(subkey)
        if signer != record.peer_id:  # someone's record about someone else: it speaks for nobody
            if signer is not None and on_forged is not None:
                on_forged(signer, f"names {record.peer_id}, whose key did not sign it")
            continue
        if admission.refusal(record.peer_id, f"{run_id}_progress") is not None:
            continue
        held = progress.get(record.peer_id)
        if held is None or (record.epoch, record.samples_accumulated) > (held.epoch, held.samples_accumulated):
            progress[record.peer_id] = record
    return progress


#: A peer absent from the progress records this long is forgotten, with the count it was first seen at.
FORGET_AFTER_S = 3600.0
#: Peers the ledger follows at most; beyond that, those seen least recently (then with the least progress) go.
MAX_TRACKED_PEERS = 10_000


@dataclass
class PeerTally:
    """One peer in the ledger: a few numbers, however many epochs it went through."""

    epoch: int
    current: int  # the largest samples_accumulated seen at ``epoch``
    first: int  # its total when first seen: work before that is not ours to judge
    finished: int = 0  # samples of the epochs it left, the largest count seen in each
    closed: int | None = None  # its total when the previous window closed
    seen_at: float = 0.0

    @property
    def total(self) -> int:
        return self.finished + self.current


class ProgressLedger:
    """Samples each peer's progress records showed, in bounded memory whatever peers publish.

    ``samples_accumulated`` restarts at every epoch, so a peer's total is the largest value seen in
    each epoch it went through, summed. Epochs only move forward: a record at an epoch older than
    the peer's latest adds nothing (re-publishing old epochs with large counts earns nothing), and a
    peer costs a few numbers however long it trains. Polls miss what a peer adds between the last
    poll and its epoch change, so this undercounts by up to one poll interval of work per epoch; the
    claim check's ``tolerance`` absorbs that when it decides pass or fail. A peer absent for
    ``forget_after_s`` is forgotten, and at most ``max_peers`` are followed.
    """

    def __init__(self, max_peers: int = MAX_TRACKED_PEERS, forget_after_s: float = FORGET_AFTER_S):
        if max_peers < 1 or forget_after_s <= 0:
            raise ValueError(f"need max_peers >= 1 and forget_after_s > 0, got {max_peers} and {forget_after_s}")
        self.max_peers, self.forget_after_s = max_peers, forget_after_s
        self._peers: dict[str, PeerTally] = {}

    def __len__(self) -> int:
        return len(self._peers)

    def observe(self, progress: Mapping[str, PeerProgress], now: float | None = None) -> None:
        """Take one poll's records in (``now``: monotonic seconds), then forget what is stale or beyond the bound."""
        now = time.monotonic() if now is None else now
        for peer_id, record in progress.items():
            tally = self._peers.get(peer_id)
            if tally is None:
                tally = self._peers[peer_id] = PeerTally(
                    record.epoch, record.samples_accumulated, first=record.samples_accumulated
                )
            elif record.epoch > tally.epoch:
                tally.finished += tally.current
                tally.epoch, tally.current = record.epoch, record.samples_accumulated
            elif record.epoch == tally.epoch:
                tally.current = max(tally.current, record.samples_accumulated)
            tally.seen_at = now
        self._prune(now)

    def _prune(self, now: float) -> None:
        for peer_id in [p for p, tally in self._peers.items() if now - tally.seen_at > self.forget_after_s]:
            del self._peers[peer_id]
        excess = len(self._peers) - self.max_peers
        if excess > 0:
            dropped = heapq.nsmallest(excess, self._peers, key=lambda p: (self._peers[p].seen_at, self._peers[p].total))
            for peer_id in dropped:
                del self._peers[peer_id]
            logger.warning(
                f"progress records name more than {self.max_peers} peers; forgot the {excess} seen least recently"
            )

    def samples(self, peer_id: str) -> int | None:
        """Samples seen for the peer, None if it never appeared (or was forgotten)."""
        tally = self._peers.get(peer_id)
        return None if tally is None else tally.total

    def close_window(self) -> tuple[dict[str, int], dict[str, int]]:
        """Per peer: how much its total grew since the previous window closed, and since it was first seen."""
        window, since_seen = {}, {}
        for peer_id, tally in self._peers.items():
            total = tally.total
            window[peer_id] = total - (tally.first if tally.closed is None else tally.closed)
            since_seen[peer_id] = total - tally.first
            tally.closed = total
        return window, since_seen


def plausible(
    progress: Mapping[str, PeerProgress],
    max_samples_per_s: float = MAX_SAMPLES_PER_S,
    on_implausible: Callable[[str, str], None] | None = None,
    admission: Admission = OPEN,
) -> dict[str, PeerProgress]:
    """``progress`` without the records no honest peer could publish (``hivetrain.protocol.progress``); the
    epoch bound counts the peers of one hotkey once (``admission``'s voters).

    Each one left out is passed to ``on_implausible(peer_id, reason)`` (default: logged).
    """
    if on_implausible is None:

        def on_implausible(peer_id: str, reason: str) -> None:
            logger.warning(f"ignoring the progress record of {peer_id}: it {reason}")

    bound = epoch_bound((admission.voter(p), r.epoch) for p, r in progress.items() if not r.client_mode)
    kept = {}
    for peer_id, record in progress.items():
        reason = implausible(record.epoch, record.samples_per_second, bound, max_samples_per_s)
        if reason is None:
            kept[peer_id] = record
        else:
            on_implausible(peer_id, reason)
    return kept


class ProgressPoller:
    """Reads hivemind's progress records from the DHT every ``interval_s``.

    The ledger (``ProgressLedger``) is cumulative and bounded (forward epochs only, stale peers forgotten); a
    window's count for a peer is how much that sum grew since the previous window closed, so an
    epoch that straddles two windows is split between them instead of counted twice. Records that
    fail ``plausible`` are left out, and their peer named in ``offences`` (the validator's ``OffenceLog``;
    one of its own when not given).
    """

    def __init__(
        self,
        dht,
        run_id: str,
        interval_s: float = 1.0,
        max_samples_per_s: float = MAX_SAMPLES_PER_S,
        offences: OffenceLog | None = None,
        admission: Admission = OPEN,
    ):
        self.dht, self.run_id, self.interval_s = dht, run_id, interval_s
        self.admission = admission  # records of peers it does not admit are left out, uncounted
        self.offences = offences if offences is not None else OffenceLog()
        self.max_samples_per_s = max_samples_per_s
        self.ledger = ProgressLedger()
        self._named = NameOnce()
        self.latest: dict[str, PeerProgress] = {}  # the last poll
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress-poller", daemon=True)

    def start(self) -> "ProgressPoller":
        self._thread.start()
        return self

    def _name(self, peer_id: str, reason: str) -> None:
        """Name a peer whose record is left out (an offence, for the validator's telemetry), once per
        ``RENAME_AFTER_S``."""
        if self._named.due(peer_id):
            self.offences.report(peer_id, f"{self.run_id}_progress", "progress", f"its progress record {reason}")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                found = fetch_progress(self.dht, self.run_id, self._name, self.admission)
                progress = plausible(found, self.max_samples_per_s, self._name, self.admission)
            except Exception:  # DHT boundary: a missed poll only delays what we see
                logger.debug("progress poll failed", exc_info=True)
                continue
            with self._lock:
                self.latest = progress
                self.ledger.observe(progress)

    def plausible_epoch(self) -> int | None:
        """The highest epoch a state downloaded from a peer may claim; None before any progress record.

        The lower median of the peers' latest epochs, plus ``MAX_EPOCH_LEAD``: one peer (or a
        minority) publishing a huge epoch cannot move it, while an honest state, at most about one
        epoch ahead of the records (they refresh every few seconds), passes.
        """
        with self._lock:
            progress = self.latest
        if not progress:  # not polled yet (a sync right at start-up): read the records now
            try:
                progress = fetch_progress(self.dht, self.run_id, admission=self.admission)
            except Exception:  # DHT boundary: no bound is known yet
                logger.warning("could not read progress records to bound the state's epoch", exc_info=True)
                return None
        return epoch_bound((self.admission.voter(peer), record.epoch) for peer, record in progress.items())

    def close_window(self) -> tuple[dict[str, int], dict[str, int]]:
        """Per peer: how much its DHT records grew in this window, and since the poller first saw it."""
        with self._lock:
            return self.ledger.close_window()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
