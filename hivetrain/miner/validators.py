"""Who may send this miner spot checks: the hotkeys the chain lists as validators.

A thread rereads the chain's metagraph every ``refresh_s`` (``LocalChain``: the run's Redis
metagraph, where validators register with the role ``validator``; ``BittensorChain``: neurons with
a validator permit) and keeps the validators with at least ``min_stake``. A failed read keeps the
last list, so a chain or Redis outage does not lock validators out. Requests never read the chain:
a hotkey that is not on the list can only pull the next read forward, at most once every
``EARLY_READ_S``, so a validator that registered since the last read is answered while a flood of
unknown hotkeys costs one metagraph read per ``EARLY_READ_S`` at most.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from hivetrain.chain import Chain, Neuron
from hivetrain.log import get_logger

logger = get_logger(__name__)

#: Validators kept, by stake: a Bittensor subnet has 256 uids; more (a flooded local metagraph) keeps the top stake.
MAX_VALIDATORS = 256
#: An unknown hotkey pulls the next read forward only when the last one started at least this long ago...
EARLY_READ_S = 2.0
#: ...and its request waits at most this long for that read before it is refused.
EARLY_READ_WAIT_S = 2.0


def validator_hotkeys(neurons: list[Neuron], min_stake: float) -> frozenset[str]:
    """Hotkeys of the neurons with the validator role and ``min_stake`` or more (the top ``MAX_VALIDATORS`` by
    stake)."""
    validators = sorted((n for n in neurons if n.role == "validator" and n.stake >= min_stake), key=lambda n: -n.stake)
    return frozenset(n.hotkey for n in validators[:MAX_VALIDATORS])


class ValidatorList:
    """The chain's validators, reread in the background (see the module docstring); ``allows(hotkey)`` for requests."""

    def __init__(
        self, chain: Chain, min_stake: float = 0.0, refresh_s: float = 30.0, clock: Callable[[], float] = time.monotonic
    ):
        if refresh_s <= 0 or min_stake < 0:
            raise ValueError(f"need refresh_s > 0 and min_stake >= 0, got {refresh_s} and {min_stake}")
        self.chain, self.min_stake, self.refresh_s, self._clock = chain, float(min_stake), float(refresh_s), clock
        self._hotkeys: frozenset[str] = frozenset()
        self._cond = threading.Condition()
        self._started = self._completed = self._wanted = 0  # reads begun, reads finished, reads asked for
        self._last_started = -float("inf")
        self.failures = 0  # reads in a row that failed
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="validator-list", daemon=True)

    @property
    def hotkeys(self) -> frozenset[str]:
        return self._hotkeys

    def start(self, wait_s: float = EARLY_READ_WAIT_S) -> "ValidatorList":
        """Start rereading; waits up to ``wait_s`` for the first read (an outage leaves the list empty until one
        succeeds)."""
        self._thread.start()
        with self._cond:
            self._cond.wait_for(lambda: self._completed >= 1, timeout=wait_s)
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    @property
    def reads(self) -> int:
        """Reads of the chain finished so far (failed ones included)."""
        return self._completed

    def allows(self, hotkey: str) -> bool:
        """Whether ``hotkey`` is a listed validator; an unknown one may wait (bounded) for an early read."""
        if hotkey in self._hotkeys:
            return True
        with self._cond:
            reading = self._started > self._completed  # a read that hangs is not waited on twice
            if not (self._stopped or reading or self._clock() - self._last_started < EARLY_READ_S):
                self.refresh()
            return hotkey in self._hotkeys

    def refresh(self, wait_s: float = EARLY_READ_WAIT_S) -> bool:
        """Have the thread read the chain now and wait up to ``wait_s`` for it; True once that read is over."""
        with self._cond:
            target = self._started + 1  # a read that begins after this call
            self._wanted = max(self._wanted, target)
            self._cond.notify_all()
            return (
                self._cond.wait_for(lambda: self._completed >= target or self._stopped, timeout=wait_s)
                and self._completed >= target
            )

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopped:
                    return
                self._started += 1
                self._last_started = self._clock()
            listed = self._read()
            with self._cond:
                if listed is not None:
                    self._hotkeys = listed
                self._completed = self._started
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._stopped or self._wanted > self._completed, timeout=self.refresh_s)

    def _read(self) -> frozenset[str] | None:
        try:
            listed = validator_hotkeys(self.chain.metagraph(), self.min_stake)
        except Exception:  # chain or Redis boundary: keep the last list, try again at the next read
            self.failures += 1
            if self.failures == 1 or self.failures % 10 == 0:
                logger.warning(
                    f"could not read the validators from the chain ({self.failures} in a row); "
                    f"keeping the last {len(self._hotkeys)}",
                    exc_info=True,
                )
            return None
        if self.failures:
            logger.info(f"validators read from the chain again after {self.failures} failed reads")
        self.failures = 0
        if listed != self._hotkeys:
            logger.info(
                f"{len(listed)} validators may send spot checks "
                f"(+{len(listed - self._hotkeys)} -{len(self._hotkeys - listed)})"
            )
        return listed
