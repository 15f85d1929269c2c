"""The straggler's own measure: what this peer sent in a round, and how long that took at its link's best rate."""

from __future__ import annotations

import time

from hivetrain.hivemind_compat.uplink import UplinkMeter, sent_and_peak, transmitted_bytes

NET_DEV = """Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: 9000000    100    0    0    0     0          0         0  9000000     100    0    0    0     0       0          0
  eth0:  123456     10    0    0    0     0          0         0   654321      20    0    0    0     0       0          0
hn123x4:     500     3    0    0    0     0          0         0     1000       4    0    0    0     0       0          0
"""


def test_loopback_is_not_counted():
    assert transmitted_bytes(NET_DEV) == 654321 + 1000


def _link(rate: float, seconds: float, start: float = 100.0, step: float = 0.25) -> list[tuple[float, int]]:
    return [(start + i * step, int(rate * i * step)) for i in range(int(seconds / step) + 1)]


def test_a_saturated_link_took_the_whole_round():
    samples = _link(625_000, 8.0)  # 5 Mbit/s for 8 s
    sent, peak = sent_and_peak(samples, 100.0, 108.0)
    assert sent == 5_000_000 and abs(peak - 625_000) < 1
    assert abs(sent / peak - 8.0) < 0.01


def test_a_fast_link_that_then_waited_took_a_moment():
    burst = _link(100_000_000, 1.0)  # 100 MB/s for a second, then nothing for 9 s (waiting on someone else)
    samples = burst + [(101.0 + 0.25 * i, burst[-1][1]) for i in range(1, 37)]
    sent, peak = sent_and_peak(samples, 100.0, 110.0)
    assert sent == 100_000_000 and sent / peak <= 1.01


def test_too_few_samples_measure_nothing():
    assert sent_and_peak(_link(625_000, 8.0), 200.0, 210.0) == (0, 0.0)
    assert sent_and_peak(_link(625_000, 0.5), 100.0, 100.5) == (312_500, 0.0)  # no whole window: no peak


def test_the_meter_reads_this_machine():
    meter = UplinkMeter().start()
    try:
        since = time.monotonic()
        time.sleep(1.6)
        # a few samples of real counters: a trickle of other traffic is not taken for a round's upload
        assert len(meter._samples) >= 4
        assert meter.link_seconds(since, time.monotonic(), at_least_bytes=10**12) == 0.0
    finally:
        meter.stop()
