"""Whether the miner is training, as ``GET /healthz`` reports it.

The training loop calls ``step_done()`` after every step. The miner is healthy while its last step
is recent: within ``max(min_stall_s, STALL_FACTOR x`` the usual time between steps``)`` (an EMA, so
a slow machine or a long averaging round raises the bar, and one state download does not trip
it). Before the first step it is healthy for ``grace_s`` after start: joining the DHT and loading
the swarm's state from peers take minutes.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

#: A step taking this many times the usual time between steps means the loop is stuck.
STALL_FACTOR = 10.0
#: Weight of the newest interval in the EMA of the time between steps.
EMA_ALPHA = 0.1


class TrainingHealth:
    """Progress of the training loop: ``step_done()`` from the loop, ``check()`` from ``/healthz``."""

    def __init__(self, grace_s: float = 900.0, min_stall_s: float = 120.0, clock: Callable[[], float] = time.monotonic):
        if grace_s <= 0 or min_stall_s <= 0:
            raise ValueError(f"need grace_s > 0 and min_stall_s > 0, got {grace_s} and {min_stall_s}")
        self.grace_s, self.min_stall_s, self._clock = float(grace_s), float(min_stall_s), clock
        self.started = clock()
        self.steps = 0
        self.last_step: float | None = None
        self.step_interval: float | None = None  # EMA of the time between two steps
        self._lock = threading.Lock()

    def step_done(self) -> None:
        now = self._clock()
        with self._lock:
            if self.last_step is not None:
                interval = now - self.last_step
                ema = self.step_interval
                self.step_interval = interval if ema is None else (1 - EMA_ALPHA) * ema + EMA_ALPHA * interval
            self.last_step = now
            self.steps += 1

    def stall_limit(self) -> float:
        """Seconds without a step after which the loop counts as stuck."""
        return max(self.min_stall_s, STALL_FACTOR * (self.step_interval or 0.0))

    def check(self) -> tuple[bool, dict]:
        """``(healthy, report)``: the report says why (JSON for ``/healthz``)."""
        now = self._clock()
        with self._lock:
            steps, last, interval = self.steps, self.last_step, self.step_interval
        if last is None:
            waited = now - self.started
            if waited <= self.grace_s:
                return True, {
                    "status": "starting",
                    "steps": 0,
                    "since_start_s": round(waited, 1),
                    "grace_s": self.grace_s,
                }
            return False, {
                "status": "stalled",
                "steps": 0,
                "reason": f"no training step {waited:.0f}s after start (start-up grace {self.grace_s:.0f}s)",
            }
        idle, limit = now - last, self.stall_limit()
        report = {
            "steps": steps,
            "since_last_step_s": round(idle, 1),
            "step_interval_s": interval,
            "stall_limit_s": limit,
        }
        if idle <= limit:
            return True, {"status": "ok", **report}
        usual = "n/a" if interval is None else f"{interval:.1f}s"
        return False, {
            "status": "stalled",
            **report,
            "reason": f"no training step for {idle:.0f}s (limit {limit:.0f}s: the larger of {self.min_stall_s:.0f}s "
            f"and {STALL_FACTOR:g}x the usual {usual} between steps)",
        }
