"""hivemind.Optimizer with its averaging rounds reported (hivemind only logs them or keeps them private)."""

from __future__ import annotations

import collections
import contextlib
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import hivemind
import torch
from hivemind.optim.grad_averager import GradientAverager, GradientAveragerFactory
from hivemind.optim.progress_tracker import LocalTrainingProgress, ProgressTracker
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from hivetrain.aggregation import AggregationRule
from hivetrain.hivemind_compat.averagers import RobustGradientAverager
from hivetrain.hivemind_compat.bans import DEFAULT_BAN_S, Bans, OffenceLog
from hivetrain.hivemind_compat.pins import follows
from hivetrain.hivemind_compat.progress import progress_signer
from hivetrain.hivemind_compat.receipts import ReceiptLog
from hivetrain.hivemind_compat.state import SafeStateAverager
from hivetrain.hivemind_compat.uplink import UplinkMeter
from hivetrain.log import get_logger
from hivetrain.protocol.admission import OPEN, Admission
from hivetrain.protocol.progress import MAX_EPOCH_LEAD, NameOnce, epoch_bound, implausible

#: hivemind logs its parameter-averaging rounds here (the only place they are visible).
STATE_AVERAGER_LOGGER = "hivemind.optim.state_averager"
#: A state download is put off until the swarm's next epoch when that epoch is due within this many
#: times the last download's duration (the first download is assumed to take ``FIRST_LOAD_ESTIMATE_S``).
IMMINENT_MARGIN = 2.0
FIRST_LOAD_ESTIMATE_S = 3.0
#: A peer steps out of averaging rounds when a round took at least STRAGGLER_MIN_S (and ``straggler_share`` of
#: the shortest recent time between epochs) with its own link busy for BUSY_SHARE of it or more; for
#: ASIDE_PER_LINK_S times the link's time (at least ASIDE_S), twice as long each time in a row, at most
#: ASIDE_MAX_S: the rounds it still slows are about a tenth of the swarm's time.
STRAGGLER_MIN_S = 5.0
BUSY_SHARE = 0.75
ASIDE_PER_LINK_S = 10.0
ASIDE_S = 60.0
ASIDE_MAX_S = 1800.0

logger = get_logger(__name__)


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


class PlausibleProgressTracker(ProgressTracker):
    """ProgressTracker that leaves implausible peer records out of the swarm's epoch and ETA.

    hivemind takes the swarm's epoch as the largest any peer claims; records beyond what the other
    peers' progress supports (``hivetrain.protocol.progress``) are dropped here first, and their
    peer is named through ``on_implausible`` (at most once per ``RENAME_AFTER_S``). With an ``admission``
    that is not open, only records signed by an admitted peer for itself count (hivemind's own signature
    proves nothing: it signs with a key of its own, see ``IdentityKey``), and the bound is the lower median
    over voters (a hotkey's peers: their most advanced epoch), so fresh keys cannot move it.

    With ``per_peer_target`` the epoch's target is that many samples per peer that reports progress
    (DiLoCo: inner steps times the batch), not a fixed total.
    """

    def __init__(
        self,
        *args,
        on_implausible: Callable[[str, str], None] | None = None,
        per_peer_target: int | None = None,
        admission: Admission | None = None,
        **kwargs,
    ):
        self._on_implausible = on_implausible or (lambda peer_id, reason: None)
        self._admission = admission if admission is not None else OPEN
        self._named = NameOnce()
        self._per_peer_target = per_peer_target
        super().__init__(*args, **kwargs)

    @follows(ProgressTracker, "_parse_swarm_progress_data", "1b5ad87469d3c13f")
    def _parse_swarm_progress_data(self, metadata):
        if isinstance(metadata, dict) and metadata:
            metadata = self._plausible(metadata)
        if self._per_peer_target is not None:
            peers = (
                sum(1 for entry in metadata.values() if entry.value is not None) if isinstance(metadata, dict) else 0
            )
            self.target_batch_size = self._per_peer_target * max(1, peers)
        return super()._parse_swarm_progress_data(metadata)

    def _admitted(self, metadata: dict) -> dict:
        """The records signed by an admitted peer for itself (``IdentityKey``), and our own."""
        own, kept = self.local_progress.peer_id, {}
        for key, entry in metadata.items():
            peer = PeerID(LocalTrainingProgress.parse_obj(entry.value).peer_id)
            signer = progress_signer(key)
            if peer == own or (
                signer == peer.to_base58() and self._admission.refusal(signer, f"{self.prefix} progress") is None
            ):
                kept[key] = entry
        return kept

    def _plausible(self, metadata: dict) -> dict:
        own = self.local_progress.peer_id
        metadata = {key: entry for key, entry in metadata.items() if entry.value is not None}
        if not self._admission.is_open:
            metadata = self._admitted(metadata)
        records = {key: LocalTrainingProgress.parse_obj(entry.value) for key, entry in metadata.items()}
        # one epoch per voter (a hotkey's peers together: its most advanced), our own left out: a late joiner at
        # epoch 0 must still believe the swarm ahead of it
        bound = epoch_bound(
            (self._admission.voter(PeerID(r.peer_id).to_base58()), r.epoch)
            for r in records.values()
            if not r.client_mode and r.peer_id != own
        )
        kept = {}
        for key, entry in metadata.items():
            record = records.get(key)
            reason = (
                None
                if record is None or record.peer_id == own
                else implausible(record.epoch, record.samples_per_second, bound)
            )
            if reason is None:
                kept[key] = entry
                continue
            peer = PeerID(record.peer_id).to_base58()
            if self._named.due(peer):
                self._on_implausible(peer, reason)
        return kept


class TrackedOptimizer(hivemind.Optimizer):
    """hivemind.Optimizer that reports every gradient-averaging round (epoch, group, duration) to ``on_round``.

    A round's group is only visible on its ``StepControl``; it also shares and loads state through
    ``SafeStateAverager``.

    A straggler steps aside (``straggler_share`` > 0): when a gradient round took at least
    ``STRAGGLER_MIN_S`` and ``straggler_share`` of the time between epochs, and our own link was busy
    for most of it sending what we sent (``UplinkMeter``: our bytes at our link's best rate), we were
    what that round waited for. We then stay out of averaging rounds for a while and, at each epoch,
    take up the swarm's state after its step instead of stepping ourselves: the swarm keeps its pace,
    we keep its parameters, and our gradients do not count meanwhile, nor do our samples towards the
    swarm's target batch (gradient mode; a DiLoCo peer still counts its inner steps).

    Its averagers (the state averager, the gradient one) aggregate with ``aggregation_rule`` (None:
    hivemind's plain mean); a peer either of them catches is banned by both for ``ban_s``. What they catch, and
    the peers whose progress records are implausible (unless ``on_implausible`` is given), go to ``offences``
    (an ``OffenceLog``, made here when not given), which the owner drains into telemetry. With
    ``admission`` (``hivetrain.protocol.admission``; default open) peers that are not admitted take no part:
    not in its groups, their parts and answers unused, their states never asked for, their progress records
    left out; the peers of one hotkey count as one (in each partition's aggregate, in the epoch bound).
    With ``receipts`` (a ``ReceiptLog``) the gradient averager names there, after each round, whose parts it
    received (``hivetrain.hivemind_compat.receipts``), for the owner's telemetry.
    """

    #: Samples per reporting peer that end an epoch (DiLoCo); None: hivemind's fixed ``target_batch_size``.
    _per_peer_target: int | None = None

    def __init__(
        self,
        *args,
        on_round: Callable[[RoundInfo], None] | None = None,
        on_implausible: Callable[[str, str], None] | None = None,
        on_state_loaded: Callable[[float], None] | None = None,
        straggler_share: float = 0.0,
        aggregation_rule: AggregationRule | None = None,
        ban_s: float = DEFAULT_BAN_S,
        offences: OffenceLog | None = None,
        admission: Admission | None = None,
        receipts: ReceiptLog | None = None,
        **kwargs,
    ):
        self._on_round = on_round or (lambda info: None)
        self.receipts = receipts  # the gradient averager's receipts (whose parts it received), for the owner
        self.admission = admission if admission is not None else OPEN
        self._on_state_loaded = on_state_loaded or (lambda seconds: None)
        # made before hivemind's __init__ builds (and forks) the averagers, which take them
        self.aggregation_rule = aggregation_rule
        self.offences = offences if offences is not None else OffenceLog(ban_s)
        self._on_implausible = on_implausible or self._report_implausible
        self._round_epoch = 0
        self._round_started = time.perf_counter()
        self._last_load_s = FIRST_LOAD_ESTIMATE_S
        self._last_round_success, self._last_round_size = False, 0
        if not straggler_share >= 0:
            raise ValueError(f"straggler_share must be >= 0, got {straggler_share}")
        self._straggler_share = straggler_share
        self._uplink = UplinkMeter().start() if straggler_share else None
        self._epoch_began: float | None = None  # time.monotonic() our last epoch update began
        self._epoch_periods: collections.deque[float] = collections.deque(maxlen=8)  # seconds between our epoch updates
        self._aside_until, self._asides = 0.0, 0  # stepping out of rounds until; times in a row
        self.swarm_wait_s = 0.0  # seconds inside step() spent on the swarm: epoch updates (rounds), state downloads
        self._waiting = 0  # nesting depth of _on_the_swarm (a reload inside an epoch update is counted once)
        self._declared: tuple[int, int] | None = None  # (epoch, first block) of the gradients we accumulate
        super().__init__(*args, **kwargs)
        if isinstance(getattr(self, "grad_averager", None), RobustGradientAverager):
            self.grad_averager.declaration = self._declaration

    def declare_blocks(self, epoch: int, first_block: int) -> None:
        """The owner's step at ``epoch`` trains our shard's blocks from ``first_block`` on (called before each
        step): the epoch's first call counts, so the gradients we accumulate at ``epoch`` are those of the blocks
        from its first block on, one block per sample. Declared to the members of the epoch's gradient round, whose
        receipts carry it to validators' audits (``hivetrain.validator.audits``)."""
        if self._declared is None or self._declared[0] != epoch:
            self._declared = (int(epoch), int(first_block))

    def _declaration(self) -> tuple[int, int] | None:
        """What the gradient round we schedule now declares: the blocks of this epoch, or nothing when the owner
        has not declared them (not this epoch: a state loaded since, a step that accumulated elsewhere)."""
        declared = self._declared
        return declared if declared is not None and declared[0] == self.local_epoch else None

    @contextlib.contextmanager
    def _on_the_swarm(self):
        """Time the block as spent on the swarm, not on training (``swarm_wait_s``): the miner's utilization is the
        rest of its step time over wall time."""
        self._waiting += 1
        started = time.perf_counter()
        try:
            yield
        finally:
            self._waiting -= 1
            if not self._waiting:
                self.swarm_wait_s += time.perf_counter() - started

    def at_global_parameters(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        """A block run at the swarm's parameters (spot checks are asked there): the model's own here;
        DiLoCo's miners train inner copies and override this."""
        return contextlib.nullcontext()

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Safe to call after every step: with ``reuse_grad_buffers`` the model's .grad is hivemind's
        accumulator, which it clears itself after each round (its own zero_grad raises instead)."""
        if self.use_gradient_averaging and self.grad_averager.reuse_grad_buffers:
            return
        super().zero_grad(set_to_none=set_to_none)

    def load_state_dict(self, state_dict: dict) -> None:
        if isinstance(state_dict, dict) and "outer" in state_dict and "inner" in state_dict:
            raise ValueError(
                "this optimizer state is DiLoCo's (HIVE_MODE=diloco); resume it in that mode, or move "
                "the checkpoint away to start this mode afresh"
            )
        super().load_state_dict(state_dict)

    @follows(hivemind.Optimizer, "_make_state_averager", "59a43eff001c3284")  # copied below
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
            max_epoch=self._plausible_epoch,
            aggregation_rule=self.aggregation_rule,
            bans=Bans(self.offences, self.admission),
            **kwargs,
        )

    @follows(hivemind.Optimizer, "_make_gradient_averager", "b9a4450197c1e6fb")
    def _make_gradient_averager(self, factory: GradientAveragerFactory | None, **kwargs) -> GradientAverager:
        # hivemind's, with our rule and a ban list of its own; a factory (DiLoCo's) must take both arguments
        return super()._make_gradient_averager(
            factory if factory is not None else RobustGradientAverager,
            aggregation_rule=self.aggregation_rule,
            bans=Bans(self.offences, self.admission),
            receipts=self.receipts,
            **kwargs,
        )

    def _report_implausible(self, peer_id: str, reason: str) -> None:
        self.offences.report(peer_id, f"{self.run_id}_progress", "progress", reason)

    def _plausible_epoch(self) -> int | None:
        """The highest epoch a state downloaded from peers may claim: the swarm's (plausible) epoch plus the lead."""
        tracker = getattr(self, "tracker", None)  # hivemind builds the state averager before the tracker
        return None if tracker is None else max(tracker.global_epoch, self.local_epoch) + MAX_EPOCH_LEAD

    @follows(hivemind.Optimizer, "_make_progress_tracker", "a3fe70a367d732d6")  # copied below
    def _make_progress_tracker(self, target_batch_size: int, **kwargs) -> ProgressTracker:
        # hivemind.Optimizer._make_progress_tracker, with implausible peer records left out
        return PlausibleProgressTracker(
            dht=self.dht,
            prefix=self.run_id,
            target_batch_size=target_batch_size,
            client_mode=self.client_mode,
            status_loglevel=self.status_loglevel,
            start=True,
            on_implausible=self._on_implausible,
            per_peer_target=self._per_peer_target,
            admission=self.admission,
            **kwargs,
        )

    @follows(hivemind.Optimizer, "_update_global_epoch", "03a36523a3fce65e")
    def _update_global_epoch(self, grad_scaler) -> None:
        with self._on_the_swarm():
            self._update_epoch_with_the_swarm(grad_scaler)

    def _update_epoch_with_the_swarm(self, grad_scaler) -> None:
        now = time.monotonic()
        if self._epoch_began is not None:
            self._epoch_periods.append(now - self._epoch_began)
        self._epoch_began = now
        if self.stepping_aside:
            logger.info(
                f"sitting out epoch {self.local_epoch}'s averaging (our uplink is the swarm's straggler): "
                "taking up the swarm's state after its step"
            )
            self.load_state_from_peers()
            return
        # remembered here because with delay_grad_averaging the round ends after the epoch has moved on
        self._round_epoch, self._round_started = self.local_epoch, time.perf_counter()
        super()._update_global_epoch(grad_scaler)

    @property
    def stepping_aside(self) -> bool:
        return time.monotonic() < self._aside_until

    @follows(hivemind.Optimizer, "_check_and_accumulate_gradients", "163c06c8f4909c30")
    def _check_and_accumulate_gradients(self, batch_size: int, grad_scaler) -> bool:
        if self.stepping_aside:  # our gradients would not count: not accumulated, nor counted in the swarm's epoch
            self.grad_averager.reset_accumulated_grads_()
            return True
        return super()._check_and_accumulate_gradients(batch_size, grad_scaler)

    @follows(hivemind.Optimizer, "_maybe_schedule_gradient_averaging", "868f8c36bdaa41e6")
    def _maybe_schedule_gradient_averaging(self) -> None:
        if not self.stepping_aside:
            super()._maybe_schedule_gradient_averaging()

    @follows(hivemind.Optimizer, "_maybe_schedule_state_averaging", "f6ba5e5eab04f4eb")
    def _maybe_schedule_state_averaging(self) -> None:
        if not self.stepping_aside:
            super()._maybe_schedule_state_averaging()

    def _judge_our_link(self, group_size: int) -> None:
        """After a gradient round: step aside if our own link is what it waited for (see the class docstring)."""
        if self._uplink is None or group_size < 2 or not self._epoch_periods or self._epoch_began is None:
            return
        period = min(self._epoch_periods)  # the swarm's pace when all went well (a reload or a failed round is slower)
        now = time.monotonic()
        took = now - self._epoch_began
        # a round sends most of our gradient (all of it in client mode): less than a fifth is some other traffic
        ours = sum(param.numel() * param.element_size() for param in self.state_averager.main_parameters)
        link_s = self._uplink.link_seconds(self._epoch_began, now, at_least_bytes=ours // 5)
        # a slow round, and our link busy for most of it: we were what it waited for
        if took < max(STRAGGLER_MIN_S, self._straggler_share * period) or not BUSY_SHARE * took <= link_s <= 1.5 * took:
            self._asides = 0
            return
        seconds = min(ASIDE_MAX_S, max(ASIDE_S, ASIDE_PER_LINK_S * link_s) * 2 ** min(self._asides, 16))
        self._asides += 1
        self._aside_until = now + seconds
        logger.warning(
            f"our uplink took {link_s:.1f}s to send our part of epoch {self._round_epoch}'s round "
            f"({took:.1f}s; epochs come every {period:.1f}s): the swarm's "
            f"straggler, stepping out of averaging rounds for {seconds:.0f}s"
        )

    def shutdown(self) -> None:
        if self._uplink is not None:
            self._uplink.stop()
        super().shutdown()

    @follows(hivemind.Optimizer, "load_state_from_peers", "87030a961ecf8f7f")
    def load_state_from_peers(self, **kwargs) -> None:
        # hivemind calls this from step() when the swarm has moved on without us; report every load, timed
        started = time.perf_counter()
        with self._on_the_swarm():
            self._let_an_imminent_epoch_pass()
            super().load_state_from_peers(**kwargs)
        self._last_load_s = time.perf_counter() - started
        self._on_state_loaded(self._last_load_s)

    @follows(hivemind.Optimizer, "_tag_along_with_zero_weight", "a3181486ff4e2ac7")
    def _let_an_imminent_epoch_pass(self) -> None:
        """Wait (bounded) for the swarm's next epoch when it will come before a download could finish.

        hivemind's out-of-sync flip-flop: a peer that downloads epoch E's state just before the swarm
        applies epoch E's update has E's parameters without that update. It then takes part in the
        swarm's next round as if it were the round of E, moves to E+1 while the others move to E+2, is
        out of sync at its next check and downloads again, just before the next transition again: a
        restored peer reloaded state 2-3 times in a row, every 5-10 s (issue 14). Downloading just after
        a transition gives the state with the update, a whole epoch before the next one.
        """
        tracker = getattr(self, "tracker", None)
        if tracker is None or self.auxiliary:
            return
        if self.scheduled_grads is not None and not self.scheduled_grads.done():
            # the swarm's round may have counted on us: join it with zero weight rather than stall it (as hivemind does)
            self._tag_along_with_zero_weight(self.scheduled_grads)
            self.scheduled_grads = None
        self.state_averager.step(wait_for_delayed_updates=True)
        progress, epoch = tracker.global_progress, tracker.global_epoch
        left_s = progress.eta_next_epoch - get_dht_time()
        if progress.samples_accumulated < progress.target_batch_size and left_s > IMMINENT_MARGIN * self._last_load_s:
            return
        deadline = time.monotonic() + self.matchmaking_time + self.averaging_timeout
        logger.info(f"the swarm's epoch {epoch} ends in {max(left_s, 0.0):.1f}s: loading state after it")
        while tracker.global_epoch <= epoch and time.monotonic() < deadline and not tracker.shutdown_triggered.is_set():
            time.sleep(0.1)

    @follows(hivemind.Optimizer, "_average_gradients_and_load_into_optimizer", "d95bb5ebc061749e")
    def _average_gradients_and_load_into_optimizer(self, maybe_step_control) -> None:
        super()._average_gradients_and_load_into_optimizer(maybe_step_control)
        group: tuple[str, ...] = ()
        success = False
        if maybe_step_control is not None and maybe_step_control.done() and not maybe_step_control.cancelled():
            if maybe_step_control.exception() is None:
                group = tuple(sorted(peer.to_base58() for peer in maybe_step_control.result()))
                success = True
        self._last_round_success, self._last_round_size = success, len(group)
        self._on_round(
            RoundInfo(
                epoch=self._round_epoch,
                kind="gradients",
                group=group,
                group_size=len(group),
                duration_s=time.perf_counter() - self._round_started,
                success=success,
            )
        )
        self._judge_our_link(len(group))


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
            self._on_round(
                RoundInfo(epoch=self._epoch(), kind="state", group=(), group_size=size, duration_s=0.0, success=True)
            )
        elif self._FAILED.search(message):
            self._on_round(
                RoundInfo(epoch=self._epoch(), kind="state", group=(), group_size=0, duration_s=0.0, success=False)
            )
