"""Averagers that carry their own aggregation rule and bans: robust aggregation per instance, not per process.

hivemind's ``DecentralizedAverager`` builds two pieces itself, in its forked child: a ``Matchmaking``
(in ``_run_internal``) and an ``AllReduceRunner`` per round (in ``_run_allreduce_inplace_``).
``RobustAveraging`` mixes into any averager class and, for one instance, builds both with the
``aggregation_rule`` and ``Bans`` that instance was given (``hivetrain.hivemind_compat.allreduce``):
``RobustAllReduceRunner`` and ``BanAwareMatchmaking`` with a rule, hivemind's own pieces without one.
Two averagers in one process, one robust and one plain, do not see each other's rule or bans.

``RobustAverager`` and ``RobustGradientAverager`` are hivemind's ``DecentralizedAverager`` and
``GradientAverager`` with the mixin. RPC names carry the class name (``ServicerBase._get_handle_name``),
so they answer under hivemind's names: peers running plain hivemind still reach them.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
from typing import Any, Callable, Optional, Sequence

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.load_balancing import hagenbach_bishoff
from hivemind.averaging.matchmaking import Matchmaking, MatchmakingException
from hivemind.optim.grad_averager import GradientAverager
from hivemind.p2p import ServicerBase
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import as_aiter, azip, enter_asynchronously

from hivetrain.aggregation import AggregationRule
from hivetrain.hivemind_compat.allreduce import BanAwareMatchmaking, RobustAllReduceRunner
from hivetrain.hivemind_compat.bans import Bans
from hivetrain.hivemind_compat.codecs import install_codecs
from hivetrain.hivemind_compat.pins import follows
from hivetrain.hivemind_compat.receipts import Receipt, ReceiptLog
from hivetrain.log import get_logger
from hivetrain.protocol.progress import lower_median
from hivetrain.protocol.training import SharedRounding8Bit

logger = get_logger(__name__)

#: A declared download bandwidth counts at most this many times the lower median of the group's declared
#: ones: hivemind hands each peer a share of the vector to reduce in proportion to what it declares, and
#: one peer declaring 100x the others' was handed 99.4% of it (its answers land wherever they are plausible).
MAX_BANDWIDTH_RATIO = 4.0
#: Added to the prefix of an averager of ``SharedRounding8Bit`` compression: its answers are averages, not
#: differences, so it never meets an averager that reads them otherwise (an honest peer set to another format).
SHARED_ROUNDING_SUFFIX = "_shared8bit"


def bounded_bandwidths(declared: Sequence[Any], ratio: float = MAX_BANDWIDTH_RATIO) -> list[float | None]:
    """Peers' declared bandwidths as load balancing may use them: each capped at ``ratio`` x the lower median
    of the positive ones; 0 (a client) stays 0; anything else that is not a finite number >= 0 (NaN, a
    string: hivemind's load balancing failed the round on it) counts as unspecified (None), which
    ``RobustAveraging._peer_fractions`` resolves to the mean of the others."""
    numbers = [
        float(b) if isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) and b >= 0 else None
        for b in declared
    ]
    positive = [b for b in numbers if b is not None and b > 0]
    if not positive:
        return numbers
    cap = lower_median(positive) * ratio
    return [min(b, cap) if b is not None else None for b in numbers]


class RobustAveraging(DecentralizedAverager):
    """A mixin for hivemind averager classes: ``aggregation_rule`` (None: hivemind's plain mean) and ``bans``.

    With ``audited`` (``RobustGradientAverager``'s default) its senders declare what they send: its reducers draw
    coordinates for audits, and name in their receipts only the senders that declared.

    Both are set before hivemind's ``__init__`` forks the averager's child (``start=True``), which
    reads them; ``bans`` (default: a ``Bans`` of its own, with no log) should be made by the owner
    over its ``OffenceLog`` so that what the child catches reaches the owner's telemetry.
    """

    audited = False

    def __init__(
        self,
        *args,
        aggregation_rule: AggregationRule | None = None,
        bans: Bans | None = None,
        receipts: ReceiptLog | None = None,
        audited: bool | None = None,
        **kwargs,
    ):
        # its senders declare what they send (``RobustGradientAverager``): reducers draw coordinates for audits, and
        # name in receipts only the senders that declared
        self.audited = type(self).audited if audited is None else audited
        self.shared_rounding = isinstance(kwargs.get("compression"), SharedRounding8Bit)
        if self.shared_rounding:
            if aggregation_rule is None:
                raise ValueError("8bit-shared compression is our all-reduce's: it needs an aggregation rule")
            kwargs["prefix"] = kwargs["prefix"] + SHARED_ROUNDING_SUFFIX
        self.aggregation_rule = aggregation_rule
        self.bans = bans if bans is not None else Bans()
        self.receipts = receipts  # where the child sends, after each round it reduced in, whose parts it received
        # partitions where a round applied our own part instead of a reducer's aggregate (counted in the child,
        # read by the owner): a peer that kept its own part no longer holds what the rest of its group holds
        self.fallbacks = multiprocessing.get_context("fork").Value("q", 0)
        install_codecs()  # what peers send 8-bit is decoded in the child, through hivemind's codec table
        super().__init__(*args, **kwargs)

    # The door for matchmaking: hivemind builds its Matchmaking inside a coroutine nested in _run_internal
    # and only assigns it to ``self._matchmaking``; no method builds it that we could override without
    # copying _run_internal (the child's whole event loop). That assignment is the one per-instance seam:
    # the Matchmaking it built becomes ban-aware in place (BanAwareMatchmaking adds methods and ``bans``,
    # no other state). Without a rule the averager keeps hivemind's matchmaking, as it always did.
    @property
    def _matchmaking(self) -> Matchmaking:
        return self._built_matchmaking  # AttributeError until the child built it, as with hivemind's attribute

    @_matchmaking.setter
    @follows(DecentralizedAverager, "_run_internal", "8f85686e1ccd3eb0")  # where it assigns self._matchmaking
    def _matchmaking(self, matchmaking: Matchmaking) -> None:
        if self.aggregation_rule is not None and type(matchmaking) is Matchmaking:
            matchmaking.__class__ = BanAwareMatchmaking
            matchmaking.bans = self.bans
        self._built_matchmaking = matchmaking

    @follows(DecentralizedAverager, "_aggregate_with_group", "c297d8a435ce2b1c")  # copied below
    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs):
        if self.aggregation_rule is None:
            return await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
        # DecentralizedAverager._aggregate_with_group (hivemind 1.1.12), with the declared bandwidths bounded
        try:
            bandwidths, mode_ids, user_gathered_bytes = zip(*map(self.serializer.loads, group_info.gathered))
            user_gathered = dict(zip(group_info.peer_ids, map(self.serializer.loads, user_gathered_bytes)))
            modes = tuple(map(AveragingMode, mode_ids))
            peer_fractions = await asyncio.get_event_loop().run_in_executor(
                None, self._peer_fractions, bandwidths, modes, min_vector_size
            )
            declared = {peer.to_base58(): gathered for peer, gathered in user_gathered.items()}
            async with enter_asynchronously(self.get_tensors()) as local_tensors:
                await self._run_allreduce_inplace_(
                    local_tensors, group_info, peer_fractions=peer_fractions, declared=declared, **kwargs
                )
                return user_gathered
        except BaseException as e:
            if isinstance(e, Exception):
                logger.exception(e)
            raise MatchmakingException(f"Unable to run All-Reduce: {e}")

    def _peer_fractions(self, bandwidths: Sequence[Any], modes: Sequence[AveragingMode], min_vector_size: int):
        """How many elements of the vector each member of the group reduces: in proportion to its bounded
        bandwidth (``bounded_bandwidths``; unspecified: the others' mean; clients none), every member
        computing the same. hivemind's linear program is not proportional: it hands the whole vector to a
        peer 4x faster than three others, so bounding the claim alone would not bound the share."""
        bounded = bounded_bandwidths(bandwidths)
        specified = [b for b in bounded if b is not None and b > 0]
        default = sum(specified) / len(specified) if specified else 1.0
        scores = [
            0.0 if mode == AveragingMode.CLIENT else default if b is None else b for b, mode in zip(bounded, modes)
        ]
        total = sum(scores)
        if min_vector_size and total > 0:  # as hivemind: a peer that would reduce fewer elements reduces none
            small = [0.0 if self.total_size * score / total < min_vector_size else score for score in scores]
            scores = small if sum(small) > 0 else scores
        if not sum(scores) > 0:
            raise ValueError(f"no member of the group can reduce (bandwidths {list(bandwidths)}, modes {modes})")
        return tuple(hagenbach_bishoff(self.total_size, scores))

    @follows(DecentralizedAverager, "_run_allreduce_inplace_", "914d57cffc7d69e1")  # copied below
    async def _run_allreduce_inplace_(
        self, tensors: Sequence[torch.Tensor], group_info: GroupInfo, group_id: Optional[bytes] = None, **kwargs
    ):
        declared = kwargs.pop("declared", None)  # what each member gathered: a sender's declaration, for audits
        if self.aggregation_rule is None:
            return await super()._run_allreduce_inplace_(tensors, group_info, group_id, **kwargs)
        # DecentralizedAverager._run_allreduce_inplace_ (hivemind 1.1.12), building our runner with our rule and bans
        group_id = group_info.group_id if group_id is None else group_id
        runner = RobustAllReduceRunner(
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            rule=self.aggregation_rule,
            bans=self.bans,
            fallbacks=self.fallbacks,
            declared=declared if self.receipts is not None and self.audited else None,
            **kwargs,
        )
        assert group_id in self._running_groups, f"Group id {group_id} was not registered in _register_allreduce_group"
        self._running_groups[group_id].set_result(runner)
        if runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX:
            async for tensor, update in azip(as_aiter(*tensors), runner):
                if self.shared_rounding and self._averaging_alpha == 1.0:  # the aggregate itself: taken as it is
                    tensor.copy_(update)
                elif self.shared_rounding:
                    tensor.lerp_(update, self._averaging_alpha)
                else:
                    tensor.add_(update, alpha=self._averaging_alpha)
                self.last_updated = get_dht_time()
                self._state_updated.set()
            self._send_receipt(runner, group_id)
        else:
            async for _ in runner:
                raise ValueError("aux peers should not receive averaged tensors")

    def _send_receipt(self, runner: RobustAllReduceRunner, group_id: bytes) -> None:
        """Name to the owner (``receipts``) the senders whose every part of our partition this round counted."""
        if self.receipts is None:
            return
        received = runner.tensor_part_reducer.received()
        if received:
            samples = runner.tensor_part_reducer.samples()
            self.receipts.send(Receipt(str(self.prefix), group_id.hex(), received, samples))


class RobustAverager(RobustAveraging, DecentralizedAverager):
    """hivemind's ``DecentralizedAverager`` with its own aggregation rule and bans (see ``RobustAveraging``)."""

    @classmethod
    @follows(ServicerBase, "_get_handle_name", "d3e13c74c5e52049")  # RPC names carry the class name
    def _get_handle_name(cls, namespace, method_name: str) -> str:
        return DecentralizedAverager._get_handle_name(namespace, method_name)  # hivemind's RPC names


class RobustGradientAverager(RobustAveraging, GradientAverager):
    """hivemind's ``GradientAverager`` with its own aggregation rule and bans (what ``TrackedOptimizer`` builds).

    ``declaration`` (set by the owner; called in the owner when a round is scheduled): what we declare to the
    members of each gradient round, gathered in matchmaking: (epoch, first block) of the gradients we send, from
    which a validator can recompute them (``hivetrain.validator.audits``); None declares nothing.
    """

    declaration: Callable[[], tuple[int, int] | None] | None = None
    audited = True

    @follows(GradientAverager, "schedule_step", "ff580482bac40508")
    def schedule_step(self, scheduled_time=None, **kwargs):
        # GradientAverager.step schedules through here too when no round was scheduled before
        if "gather" not in kwargs and self.declaration is not None:
            kwargs["gather"] = self.declaration()
        return super().schedule_step(scheduled_time, **kwargs)

    @classmethod
    @follows(ServicerBase, "_get_handle_name", "d3e13c74c5e52049")
    def _get_handle_name(cls, namespace, method_name: str) -> str:
        return GradientAverager._get_handle_name(namespace, method_name)  # hivemind's RPC names
