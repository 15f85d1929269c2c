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

import multiprocessing
from typing import Optional, Sequence

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.matchmaking import Matchmaking
from hivemind.optim.grad_averager import GradientAverager
from hivemind.p2p import ServicerBase
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import as_aiter, azip

from hivetrain.aggregation import AggregationRule
from hivetrain.hivemind_compat.allreduce import BanAwareMatchmaking, RobustAllReduceRunner
from hivetrain.hivemind_compat.bans import Bans
from hivetrain.hivemind_compat.codecs import install_codecs
from hivetrain.hivemind_compat.pins import follows


class RobustAveraging(DecentralizedAverager):
    """A mixin for hivemind averager classes: ``aggregation_rule`` (None: hivemind's plain mean) and ``bans``.

    Both are set before hivemind's ``__init__`` forks the averager's child (``start=True``), which
    reads them; ``bans`` (default: a ``Bans`` of its own, with no log) should be made by the owner
    over its ``OffenceLog`` so that what the child catches reaches the owner's telemetry.
    """

    def __init__(self, *args, aggregation_rule: AggregationRule | None = None, bans: Bans | None = None, **kwargs):
        self.aggregation_rule = aggregation_rule
        self.bans = bans if bans is not None else Bans()
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

    @follows(DecentralizedAverager, "_run_allreduce_inplace_", "914d57cffc7d69e1")  # copied below
    async def _run_allreduce_inplace_(
        self, tensors: Sequence[torch.Tensor], group_info: GroupInfo, group_id: Optional[bytes] = None, **kwargs
    ):
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
            **kwargs,
        )
        assert group_id in self._running_groups, f"Group id {group_id} was not registered in _register_allreduce_group"
        self._running_groups[group_id].set_result(runner)
        if runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX:
            async for tensor, update in azip(as_aiter(*tensors), runner):
                tensor.add_(update, alpha=self._averaging_alpha)
                self.last_updated = get_dht_time()
                self._state_updated.set()
        else:
            async for _ in runner:
                raise ValueError("aux peers should not receive averaged tensors")


class RobustAverager(RobustAveraging, DecentralizedAverager):
    """hivemind's ``DecentralizedAverager`` with its own aggregation rule and bans (see ``RobustAveraging``)."""

    @classmethod
    @follows(ServicerBase, "_get_handle_name", "d3e13c74c5e52049")  # RPC names carry the class name
    def _get_handle_name(cls, namespace, method_name: str) -> str:
        return DecentralizedAverager._get_handle_name(namespace, method_name)  # hivemind's RPC names


class RobustGradientAverager(RobustAveraging, GradientAverager):
    """hivemind's ``GradientAverager`` with its own aggregation rule and bans (what ``TrackedOptimizer`` builds)."""

    @classmethod
    @follows(ServicerBase, "_get_handle_name", "d3e13c74c5e52049")
    def _get_handle_name(cls, namespace, method_name: str) -> str:
        return GradientAverager._get_handle_name(namespace, method_name)  # hivemind's RPC names
