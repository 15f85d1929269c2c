"""How long this peer's own link takes to carry what it sends in a round: the straggler's own measure.

hivemind's reducers take part *i + 1* only once every sender's part *i* is in, so one slow uplink
paces every round it is in (one miner on 5 Mbit/s made a 4-miner swarm 1.5-2x slower, issue 14).
Its peers cannot agree who was slow (the slow peer's TCP streams share its link unevenly, so each
reducer waits a different time; and its saturated uplink delays the ACKs of what it downloads, so
to it everyone looks slow: BENCHMARKS.md section 10). The slow peer itself can tell: its interfaces
sent at most ``peak`` bytes a second during the round, so the ``sent`` bytes took ``sent / peak``
seconds at best. A peer whose round took that long because of its own link steps aside
(``TrackedOptimizer``).

``UplinkMeter`` samples the transmit counters of this network namespace's interfaces
(``/proc/net/dev``), loopback left out: a swarm on one machine talks over loopback and never steps
aside. Other traffic of the namespace only adds to the peak, which makes the estimate smaller.
"""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path

NET_DEV = Path("/proc/net/dev")
SAMPLE_S = 0.25
WINDOW_S = 1.0  # the peak rate is measured over windows this long (a TCP burst is not the link's rate)


def transmitted_bytes(net_dev: str) -> int:
    """Bytes sent by every interface but loopback, from the text of ``/proc/net/dev``."""
    total = 0
    for line in net_dev.splitlines()[2:]:
        name, _, counters = line.partition(":")
        fields = counters.split()
        if name.strip() != "lo" and len(fields) >= 9:
            total += int(fields[8])
    return total


def sent_and_peak(
    samples: list[tuple[float, int]], since: float, until: float, window_s: float = WINDOW_S
) -> tuple[int, float]:
    """Bytes sent between ``since`` and ``until``, and the highest rate (bytes/s) over any ``window_s`` in between."""
    inside = [(t, b) for t, b in samples if since <= t <= until]
    if len(inside) < 2:
        return 0, 0.0
    sent, peak, start = inside[-1][1] - inside[0][1], 0.0, 0
    for end in range(1, len(inside)):
        while start + 1 < end and inside[end][0] - inside[start + 1][0] >= window_s:
            start += 1
        span = inside[end][0] - inside[start][0]
        if span >= window_s:
            peak = max(peak, (inside[end][1] - inside[start][1]) / span)
    return sent, peak


class UplinkMeter:
    """Samples this namespace's transmit counters from a daemon thread (``start``/``stop``)."""

    def __init__(self, keep_s: float = 600.0, net_dev: Path = NET_DEV):
        self.net_dev = net_dev
        self._samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=int(keep_s / SAMPLE_S))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="uplink-meter", daemon=True)

    def start(self) -> "UplinkMeter":
        if self.net_dev.exists():
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sent = transmitted_bytes(self.net_dev.read_text())
                self._samples.append((time.monotonic(), sent))  # stamped once read: sent by then
            except (OSError, ValueError):
                pass
            self._stop.wait(SAMPLE_S)

    def link_seconds(self, since: float, until: float, at_least_bytes: int = 0) -> float:
        """How long what we sent between ``since`` and ``until`` (``time.monotonic()``) took at our link's best
        rate; 0 when we sent less than ``at_least_bytes`` (other traffic, a trickle, would look like a full link)."""
        sent, peak = sent_and_peak(list(self._samples), since, until)
        return sent / peak if peak > 0 and sent >= at_least_bytes else 0.0

    def stop(self) -> None:
        self._stop.set()
