"""hivemind.Optimizer with its averaging rounds reported (hivemind only logs them or keeps them private)."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import hivemind
from hivemind.optim.state_averager import TrainingStateAverager

from hivetrain.hivemind_compat.state import SafeStateAverager

#: hivemind logs its parameter-averaging rounds here (the only place they are visible).
STATE_AVERAGER_LOGGER = "hivemind.optim.state_averager"


@dataclass(frozen=True)
class RoundInfo:
    """An averaging round as this peer saw it."""

    epoch: int
    kind: str
    group: tuple[str, ...]
    group_size: int
    duration_s: float
    success: bool
    time: float = field(default_factory=time.time)


class TrackedOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer that reports every gradient-averaging round (epoch, group, duration) to ``on_round``.

    A round's group is only visible on its ``StepControl``; it also shares and loads state through
    ``SafeStateAverager``.
    """

    def __init__(self, *args, on_round: Callable[[RoundInfo], None] | None = None, **kwargs):
        self._on_round = on_round or (lambda info: None)
        self._round_epoch = 0
        self._round_started = time.perf_counter()
        super().__init__(*args, **kwargs)

    def _make_state_averager(self, **kwargs) -> TrainingStateAverager:
        # hivemind.Optimizer._make_state_averager, with our averager (see SafeStateAverager)
        return SafeStateAverager(
            dht=self.dht,
            prefix=f"{self.run_id}_state_averager",
            min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout,
            shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer,
            custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel,
            next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode,
            auxiliary=self.auxiliary,
            start=True,
            **kwargs,
        )

    def _update_global_epoch(self, grad_scaler) -> None:
        # remembered here because with delay_grad_averaging the round ends after the epoch has moved on
        self._round_epoch, self._round_started = self.local_epoch, time.perf_counter()
        super()._update_global_epoch(grad_scaler)

    def _average_gradients_and_load_into_optimizer(self, maybe_step_control) -> None:
        super()._average_gradients_and_load_into_optimizer(maybe_step_control)
        group: tuple[str, ...] = ()
        success = False
        if maybe_step_control is not None and maybe_step_control.done() and not maybe_step_control.cancelled():
            if maybe_step_control.exception() is None:
                group = tuple(sorted(peer.to_base58() for peer in maybe_step_control.result()))
                success = True
        self._on_round(RoundInfo(
            epoch=self._round_epoch, kind="gradients", group=group, group_size=len(group),
            duration_s=time.perf_counter() - self._round_started, success=success,
        ))


class StateRoundLogHandler(logging.Handler):
    """Parameter-averaging rounds happen inside hivemind's background executor, which only logs them.

    In local-updates mode those are the swarm's rounds; this turns hivemind's log lines into RoundInfo
    (group size only: hivemind does not expose the group's peer ids there). ``attach``/``detach``
    hook it onto ``STATE_AVERAGER_LOGGER``.
    """

    _AVERAGED = re.compile(r"Averaged parameters with (\d+) peers")
    _FAILED = re.compile(r"Averaging failed with")

    def __init__(self, epoch: Callable[[], int], on_round: Callable[[RoundInfo], None]):
        super().__init__(level=logging.DEBUG)
        self._epoch, self._on_round = epoch, on_round

    def attach(self) -> "StateRoundLogHandler":
        logging.getLogger(STATE_AVERAGER_LOGGER).addHandler(self)
        return self

    def detach(self) -> None:
        logging.getLogger(STATE_AVERAGER_LOGGER).removeHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if match := self._AVERAGED.search(message):
            size = int(match.group(1))
            self._on_round(RoundInfo(epoch=self._epoch(), kind="state", group=(), group_size=size, duration_s=0.0, success=True))
        elif self._FAILED.search(message):
            self._on_round(RoundInfo(epoch=self._epoch(), kind="state", group=(), group_size=0, duration_s=0.0, success=False))
