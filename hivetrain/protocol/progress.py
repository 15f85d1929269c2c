"""What training progress a peer may claim in the DHT, for miners and validators alike.

hivemind.Optimizer's ``ProgressTracker`` publishes every peer's ``LocalTrainingProgress`` (epoch,
samples towards it, samples per second) and takes the swarm's epoch as the *largest* epoch any
peer claims, so one record at epoch 10^9 makes every peer think it is behind (and loops the
learning-rate scheduler up to that epoch). Here a record is plausible when its epoch is at most
``MAX_EPOCH_LEAD`` above the lower median of all epochs seen (the reader's own included), so a
minority cannot move it, and its throughput is below a ceiling no device reaches.
"""

from __future__ import annotations

import time
from typing import Iterable, Sequence

#: How many epochs a peer (or a downloaded state) may be ahead of the peers' median progress:
#: records refresh every few seconds, so an honest peer is at most about one epoch ahead of them.
MAX_EPOCH_LEAD = 2
#: No device trains the tiny or seed GPT-2 faster than this many samples per second.
MAX_SAMPLES_PER_S = 1e6
#: A peer whose records stay implausible is named again at most this often (records repeat every poll).
RENAME_AFTER_S = 600.0


def lower_median(values: Sequence[float], lead: float = 0) -> float | None:
    """The lower median of ``values`` plus ``lead``; None for no values."""
    if not values:
        return None
    return sorted(values)[(len(values) - 1) // 2] + lead


def epoch_bound(epochs: Iterable[tuple[str, int]], lead: int = MAX_EPOCH_LEAD) -> int | None:
    """The highest plausible epoch over ``(voter, epoch)`` pairs: the lower median of each voter's most
    advanced epoch, plus ``lead``; a voter is a hotkey (all its peers together) or a lone peer id
    (``hivetrain.protocol.admission``), so fresh keys of one hotkey cannot move it. None for no pairs."""
    best: dict[str, int] = {}
    for voter, epoch in epochs:
        best[voter] = max(epoch, best.get(voter, epoch))
    return lower_median(list(best.values()), lead)


def implausible(
    epoch: int, samples_per_second: float, epoch_bound: int | None, max_samples_per_s: float = MAX_SAMPLES_PER_S
) -> str | None:
    """Why a progress record cannot be believed, or None. ``epoch_bound`` from ``lower_median(..., MAX_EPOCH_LEAD)``."""
    if epoch_bound is not None and epoch > epoch_bound:
        return f"claims epoch {epoch}, beyond the {epoch_bound} the other peers' progress supports"
    if not 0 <= samples_per_second <= max_samples_per_s:
        return f"claims {samples_per_second:.3g} samples/s, outside [0, {max_samples_per_s:.3g}]"
    return None


class NameOnce:
    """Whether to name a peer now: each at most once per ``every_s``."""

    def __init__(self, every_s: float = RENAME_AFTER_S):
        self.every_s = every_s
        self._last: dict[str, float] = {}  # peer id -> time.monotonic() we last named it

    def due(self, peer_id: str) -> bool:
        now = time.monotonic()
        if now - self._last.get(peer_id, -self.every_s) < self.every_s:
            return False
        self._last[peer_id] = now
        return True
