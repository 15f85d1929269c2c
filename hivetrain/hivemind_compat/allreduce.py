"""Robust aggregation inside hivemind's butterfly all-reduce, with offenders named and banned.

hivemind 1.1.12 builds an ``AllReduceRunner`` per round, and its ``TensorPartReducer`` sums the
parts every sender streams in, weighted as the sender declares. An averager with an aggregation rule
(``hivetrain.hivemind_compat.averagers.RobustAveraging``) builds instead, with its own rule and bans:

* ``RobustPartReducer``: refuses a part whose shape or dtype is not the partition's (its sender is
  named, and the round goes on without it), keeps each sender's part and aggregates with
  ``hivetrain.aggregation.PartStream`` (the fast path's work done as parts arrive; otherwise
  ``robust_aggregate``: non-finite parts dropped, weights capped, CenteredClip);
* ``RobustAllReduceRunner``: checks each reducer's answer before it is applied (``check_received``;
  our own only with two senders, where no majority can outvote an attacker); a bad answer is
  replaced by our own part for that partition, as hivemind does for a reducer that failed.

With ``SharedRounding8Bit`` compression (``HIVE_GRAD_COMPRESSION=8bit-shared``) the reducer quantizes each
aggregate once and answers every sender with those same bytes; each sender (the reducer too) takes the
dequantized aggregate as the result, not its own part plus a difference quantized for it, so the members
of a round leave it holding the same values, to the bit, wherever no answer was refused.

A sender or reducer caught is named and banned in that averager (its ``Bans``,
``hivetrain.hivemind_compat.bans``): its parts no longer count, its answers are not applied, and
``BanAwareMatchmaking`` keeps it out of the groups we lead or join.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.matchmaking import Matchmaking
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartContainer, TensorPartReducer
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils.asyncio import amap_in_executor

from hivetrain.aggregation import AggregationRule, PartStream, Refusal, check_received
from hivetrain.hivemind_compat.bans import Bans
from hivetrain.hivemind_compat.pins import follows
from hivetrain.log import get_logger
from hivetrain.protocol.records import AUDIT_COORDINATES, MAX_SAMPLED_SENDERS
from hivetrain.protocol.training import SharedRounding8Bit

logger = get_logger(__name__)

#: Coordinates of its partition a reducer draws in secret per gradient round, of which its receipt names
#: ``AUDIT_COORDINATES`` (where the aggregate is largest) with each sender's values there.
AUDIT_CANDIDATES = 4096


class BanAwareMatchmaking(Matchmaking):
    """Matchmaking that keeps refused peers (banned, or not admitted) out of our groups: as leader we refuse
    their requests to join, and a second peer of a hotkey already in the group; as follower we do not ask
    them to lead. (A group another leader assembled may still hold one: its parts are left out and its
    answers not applied, see below.)

    hivemind builds a plain ``Matchmaking``; ``RobustAveraging`` turns it into this class and sets ``bans``.
    """

    bans: Bans

    @follows(Matchmaking, "_check_reasons_to_reject", "c694e8194862154f")
    def _check_reasons_to_reject(self, request, context):
        peer = context.remote_id.to_base58()
        if self.bans.refuses(peer, "matchmaking"):
            return averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
        voter = self.bans.voter(peer)
        members = [self.peer_id, *(f for f in self.current_followers if f != context.remote_id)]
        if voter != peer and any(self.bans.voter(member.to_base58()) == voter for member in members):
            return averaging_pb2.MessageFromLeader(code=averaging_pb2.DUPLICATE_PEER_ID)  # one hotkey, one member
        return super()._check_reasons_to_reject(request, context)

    @follows(Matchmaking, "_request_join_group", "df823040a94d1c1d")
    async def _request_join_group(self, leader):
        if self.bans.refuses(leader.to_base58(), "matchmaking"):
            return None  # the caller asks the next potential leader
        return await super()._request_join_group(leader)


class RobustPartReducer(TensorPartReducer):
    """TensorPartReducer that keeps every sender's part and aggregates robustly (see the module docstring)
    with ``rule``, banning in ``bans`` the senders it catches."""

    def __init__(
        self,
        part_shapes: Sequence[torch.Size],
        num_senders: int,
        sender_ids: Sequence[str],
        own_id: str,
        prefix: str,
        own_norm: Callable[[], float] = lambda: 0.0,
        *,
        rule: AggregationRule,
        bans: Bans,
        part_dtypes: Sequence[torch.dtype] | None = None,
        shared_rounding: bool = False,
        part_offsets: Sequence[int] | None = None,
        declared: dict[str, Any] | None = None,
    ):
        self.rule, self.bans = rule, bans
        # SharedRounding8Bit: each aggregate quantized once; its bytes by part index, what every sender is answered
        self.shared_rounding, self.answers = shared_rounding, {}
        self.part_dtypes = tuple(part_dtypes) if part_dtypes is not None else None  # None: any floating dtype
        self._stream, self._senders = PartStream(), []  # this partition's parts so far, and who sent each
        self._banned_parts: list[tuple[int, torch.Tensor, float]] = []  # parts of banned senders: left out
        self.sender_ids, self.own_id, self.prefix = list(sender_ids), own_id, prefix
        self.own_norm = own_norm  # the norm of all our tensors together: no honest part is much larger
        # for our receipt: parts of each sender counted in an aggregate (not banned, not malformed), its weight
        self._counted, self._declared = [0] * num_senders, [0.0] * num_senders
        # for audits: candidate coordinates drawn here, in secret until the round is over; each sender's values there
        # and the aggregate's (part index -> (num_senders, c)); samples() names those where the aggregate is largest
        # sender -> what it gathered in matchmaking, (epoch, first block) or not; None: a round nobody declares in
        self.declared = declared
        self._draw = _draw_coordinates(part_shapes, part_offsets) if part_offsets is not None else {}
        self._sampled = {part: torch.full((num_senders, len(d.positions)), math.nan) for part, d in self._draw.items()}
        self._aggregates = {part: torch.zeros(len(d.positions)) for part, d in self._draw.items()}
        super().__init__(part_shapes, num_senders)

    @follows(TensorPartReducer, "reset_accumulators", "5d3dc36f344a342e")
    def reset_accumulators(self):
        self._stream, self._senders, self._banned_parts = PartStream(), [], []
        super().reset_accumulators()

    @follows(TensorPartReducer, "accumulate_part", "1d64a8bd77052ac4")  # copied below
    async def accumulate_part(
        self, sender_index: int, part_index: int, tensor_part: torch.Tensor, weight: float = 1.0
    ) -> torch.Tensor:
        # TensorPartReducer.accumulate_part (hivemind 1.1.12), keeping the part instead of adding it
        assert 0 <= sender_index < self.num_senders, "invalid sender index"
        assert 0 <= part_index < self.num_parts, "invalid part index"
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:
            await asyncio_wait_any(self.current_part_future, self.finished)
            if self.finished.is_set():
                raise AllreduceException(f"attempted to aggregate part in a finalized {self.__class__.__name__}")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        assert part_index == self.current_part_index
        if (problem := self._malformed(part_index, tensor_part)) is not None:
            # out of the round from this part on: hivemind's own handler of this sender's stream calls
            # on_sender_failed, which leaves out the parts not received, this one now included
            self.num_parts_received[sender_index] -= 1
            if self.sender_ids[sender_index] != self.own_id:
                self.bans.ban(self.sender_ids[sender_index], self.prefix, "sender", problem)
            raise BannedException(f"sender {sender_index} {problem}")
        current_part_future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            sender = self.sender_ids[sender_index]
            if sender != self.own_id and self.bans.refuses(sender, f"{self.prefix} all-reduce"):
                self._banned_parts.append((sender_index, tensor_part, float(weight)))
            else:  # the fast path's share of the work, while the other senders' parts are still on their way
                self._stream.add(tensor_part, float(weight))
                self._senders.append(sender_index)
                self._counted[sender_index] += 1
                self._declared[sender_index] = float(weight)
                if part_index in self._draw:
                    self._sampled[part_index][sender_index] = tensor_part.reshape(-1)[self._draw[part_index].positions]
            self.current_part_accumulated_from += 1
            self.check_current_part_finished()
        return await current_part_future

    def received(self) -> dict[str, float]:
        """Our receipt of the round: each other sender whose every part of our partition we counted, at the
        finite weight it declared, unless we banned it (in this round: a NaN or outlying part; before: its parts
        were left out) (``hivetrain.hivemind_compat.receipts``), or, in a round whose senders declare their blocks
        (``declared``), it declared none: nobody vouches for parts no validator can audit. Empty when we reduced
        nothing."""
        if not self.num_parts:
            return {}
        return {
            sender: weight
            for sender, counted, weight in zip(self.sender_ids, self._counted, self._declared)
            if sender != self.own_id
            and counted == self.num_parts
            and math.isfinite(weight)
            and weight >= 0
            and not self.bans.is_banned(sender)
            and (self.declared is None or _declaration(self.declared.get(sender)) is not None)
        }

    def samples(self, count: int = AUDIT_COORDINATES) -> dict[str, dict]:
        """For audits: each sender of ``received()`` at a positive weight that declared (epoch, first block) in
        matchmaking, with its values at ``count`` of the candidates we drew (``PartSample``'s fields); at most
        ``MAX_SAMPLED_SENDERS``. Empty when we drew none.

        The same coordinates for every sender: the candidates where the round's aggregate is largest. Most of a
        GPT-2's vector is its token embedding, whose gradient is zero but for the tokens a batch holds: uniform
        coordinates there are mostly zeros in every part, which tell nothing. Where the aggregate is largest, most
        senders' gradients are not zero (common tokens, the layers' weights); which candidates those are, no
        sender knew when it sent its parts."""
        if not self._draw:
            return {}
        parts = sorted(self._draw)
        indices = torch.cat([self._draw[part].indices for part in parts])  # (c,)
        strength = torch.cat([self._aggregates[part] for part in parts]).abs().nan_to_num(0.0)
        chosen = torch.topk(strength, min(count, len(indices))).indices.sort().values
        values = torch.cat([self._sampled[part] for part in parts], dim=1)[:, chosen]  # (num_senders, count)
        found, received = {}, self.received()
        for sender_index, sender in enumerate(self.sender_ids):
            weight, declared = received.get(sender), _declaration((self.declared or {}).get(sender))
            row = values[sender_index]
            if not weight or declared is None or not bool(torch.isfinite(row).all()):
                continue
            epoch, first_block = declared
            found[sender] = dict(
                epoch=epoch, first_block=first_block, indices=indices[chosen].tolist(), values=row.tolist()
            )
            if len(found) == MAX_SAMPLED_SENDERS:
                break
        return found

    @follows(AllReduceRunner, "_accumulate_parts_streaming", "6c5a3c7266060303")  # bans the sender we raise for
    def _malformed(self, part_index: int, part: torch.Tensor) -> str | None:
        """Why ``part`` cannot be this partition's part ``part_index`` (its shape, its dtype), or None.

        hivemind deserializes a part as its sender declares it: a wrong size failed the aggregate of the
        whole partition (and hivemind then blamed the senders whose parts came after), and an int8 part
        that came first turned the aggregate int8, zeroing most of it.
        """
        expected = self.part_shapes[part_index]
        if part.shape != expected:
            return f"sent a part of shape {tuple(part.shape)} where the partition's is {tuple(expected)}"
        dtype = self.part_dtypes[part_index] if self.part_dtypes is not None else None
        if (part.dtype != dtype) if dtype is not None else not part.dtype.is_floating_point:
            return f"sent a part of dtype {part.dtype} where the partition's is {dtype or 'floating point'}"
        return None

    @follows(TensorPartReducer, "check_current_part_finished", "ec9b059c42f3ca27")  # copied below
    def check_current_part_finished(self):
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from == self.num_current_senders:
            self.current_part_future.set_result(self._aggregate())
            self.reset_accumulators()

    def _aggregate(self) -> torch.Tensor:
        value = self._robust_aggregate()
        if self.current_part_index in self._draw:
            self._aggregates[self.current_part_index] = value.reshape(-1)[self._draw[self.current_part_index].positions]
        if not self.shared_rounding:
            return value
        answer = serialize_torch_tensor(value, runtime_pb2.CompressionType.UNIFORM_8BIT)
        self.answers[self.current_part_index] = answer
        return deserialize_torch_tensor(answer)  # what every sender decodes from the same bytes

    def _robust_aggregate(self) -> torch.Tensor:
        stream, senders = self._stream, self._senders
        if not senders:  # only banned senders in this round (we only reduce): aggregate them all the same
            stream, senders = PartStream(), [index for index, _, _ in self._banned_parts]
            for _, part, weight in self._banned_parts:
                stream.add(part, weight)
        if not senders:
            return torch.zeros(self.part_shapes[self.current_part_index])
        stream, senders = self._one_vote_per_hotkey(stream, senders)
        result = stream.aggregate(self.rule, scale=self.own_norm)
        for row, reason in result.offences.items():
            if self.sender_ids[senders[row]] != self.own_id:  # outvoted is not guilty: we never ban ourselves
                self.bans.ban(self.sender_ids[senders[row]], self.prefix, "sender", reason)
        return result.value

    def _one_vote_per_hotkey(self, stream: PartStream, senders: list[int]) -> tuple[PartStream, list[int]]:
        """``stream`` with the parts of the senders of one hotkey merged into one part (their mean, at the largest
        of their weights, a non-finite one winning), and for each part its first sender: a hotkey's peers weigh
        as one peer at most in the median, the weights' cap and CenteredClip."""
        voters = [self.bans.voter(self.sender_ids[index]) for index in senders]
        if len(set(voters)) == len(voters):  # the usual round: nothing to merge, the fast path's work stands
            return stream, senders
        rows_of: dict[str, list[int]] = {}
        for row, voter in enumerate(voters):
            rows_of.setdefault(voter, []).append(row)
        merged, firsts = PartStream(), []
        for rows in rows_of.values():
            parts, weights = [stream.parts[row] for row in rows], [stream.weights[row] for row in rows]
            part = parts[0] if len(rows) == 1 else torch.stack(parts).mean(dim=0)
            finite = all(math.isfinite(w) for w in weights)
            merged.add(part, max(weights) if finite else next(w for w in weights if not math.isfinite(w)))
            firsts.append(senders[rows[0]])
        return merged, firsts


@dataclass(frozen=True)
class _Drawn:
    positions: torch.Tensor  # (c,) int64: positions in the part
    indices: torch.Tensor  # (c,) int64: the same in the whole flattened vector


def _draw_coordinates(
    part_shapes: Sequence[torch.Size], part_offsets: Sequence[int], count: int = AUDIT_CANDIDATES
) -> dict[int, _Drawn]:
    """``count`` candidate coordinates of our partition drawn from the OS's randomness (no sender can know them
    before we name some, after the round), by part index."""
    starts = [0]
    for shape in part_shapes:
        starts.append(starts[-1] + math.prod(shape))
    drawn: dict[int, list[int]] = {}
    for position in sorted(random.SystemRandom().sample(range(starts[-1]), min(count, starts[-1]))):
        part = bisect.bisect_right(starts, position) - 1
        drawn.setdefault(part, []).append(position - starts[part])
    return {
        part: _Drawn(torch.tensor(positions), torch.tensor(positions) + part_offsets[part])
        for part, positions in drawn.items()
    }


def _declaration(gathered: Any) -> tuple[int, int] | None:
    """(epoch, first block) when a sender gathered exactly that in matchmaking (``RobustGradientAverager``)."""
    if not isinstance(gathered, (list, tuple)) or len(gathered) != 2:
        return None
    if not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= 2**40 for n in gathered):
        return None
    return int(gathered[0]), int(gathered[1])


def part_offsets(tensors: Sequence[torch.Tensor], parts: Sequence[torch.Tensor]) -> list[int] | None:
    """Where each of ``parts`` (views of ``tensors`` as hivemind's ``TensorPartContainer`` cuts them) starts in the
    flattened concatenation of ``tensors``; None when one is not such a view (then nothing is drawn for audits)."""
    spans, start = [], 0
    for tensor in tensors:
        spans.append((tensor.data_ptr(), tensor.numel() * tensor.element_size(), start, tensor.element_size()))
        start += tensor.numel()
    offsets = []
    for part in parts:
        pointer = part.data_ptr()
        found = [span for span in spans if span[0] <= pointer < span[0] + span[1]] if part.numel() else [(0, 0, 0, 1)]
        if len(found) != 1:
            return None
        base, _, first, element = found[0]
        offsets.append(first + (pointer - base) // element)
    return offsets


async def asyncio_wait_any(future, event) -> None:
    """Wait until ``future`` is done or ``event`` is set (hivemind's loop in accumulate_part)."""
    waiter = asyncio.create_task(event.wait())
    try:
        await asyncio.wait({future, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()


def _rms(tensors: Sequence[torch.Tensor]) -> float:
    total = sum(t.numel() for t in tensors)
    squares = 0.0
    for tensor in tensors:
        norm = float(torch.linalg.vector_norm(tensor.detach()))  # in the tensor's dtype: no float64 copy
        if not math.isfinite(norm):  # NaN, or squares beyond float32
            norm = float(torch.linalg.vector_norm(tensor.detach(), dtype=torch.float64))
        squares += norm**2
    return math.sqrt(squares / max(1, total))


class RobustAllReduceRunner(AllReduceRunner):
    """AllReduceRunner with ``RobustPartReducer`` and each reducer's answer checked before it is applied;
    ``rule`` and ``bans`` are the averager's that runs it; ``fallbacks`` (a shared counter, or None) counts the
    partitions where our own part was kept instead of a reducer's answer."""

    @follows(AllReduceRunner, "__init__", "597a0c8dbbeabbe3")  # the reducer and container it builds
    @follows(TensorPartContainer, "register_processed_part", "ff5ebad6141c4a88")  # wrapped below
    # shared rounding: return_deltas=False makes a failed reducer's output our own part, and the outputs aggregates
    @follows(TensorPartContainer, "register_failed_reducer", "89b41b9d7f225968")
    @follows(TensorPartContainer, "iterate_output_tensors", "3bc3c7e743c4d6b9")
    @follows(AllReduceRunner, "_communicate_with_peer", "d910885e9727ed48")  # what it registers: see register_checked
    def __init__(
        self,
        *args,
        tensors: Sequence[torch.Tensor],
        rule: AggregationRule,
        bans: Bans,
        fallbacks=None,
        declared: dict[str, Any] | None = None,
        **kwargs,
    ):
        super().__init__(*args, tensors=tensors, **kwargs)
        self.shared_rounding = shared = isinstance(kwargs.get("compression"), SharedRounding8Bit)
        # shared rounding: the outputs are the aggregates themselves (a failed reducer's part: our own), not differences
        self.tensor_part_container.return_deltas = not shared
        prefix = str(self._prefix)
        own_rms = functools.cache(lambda: _rms(tensors))  # once per round, where first needed
        self.tensor_part_reducer.finalize()  # the plain reducer hivemind built is replaced before any part arrives
        self.tensor_part_reducer = RobustPartReducer(
            tuple(part.shape for part in self.parts_for_local_averaging),
            len(self.sender_peer_ids),
            [peer.to_base58() for peer in self.sender_peer_ids],
            self.peer_id.to_base58(),
            prefix,
            lambda: own_rms() * math.sqrt(sum(t.numel() for t in tensors)),
            rule=rule,
            bans=bans,
            part_dtypes=tuple(part.dtype for part in self.parts_for_local_averaging),
            shared_rounding=shared,
            part_offsets=part_offsets(tensors, self.parts_for_local_averaging) if declared is not None else None,
            declared=declared,
        )
        container = self.tensor_part_container
        register = container.register_processed_part

        def register_checked(peer_index: int, part_index: int, delta: torch.Tensor) -> None:
            # delta: the aggregate minus our part; with shared rounding, the aggregate itself (from another reducer)
            reducer = self.ordered_peer_ids[peer_index].to_base58()
            ourselves = self.ordered_peer_ids[peer_index] == self.peer_id
            own = container._input_parts_by_peer[peer_index][part_index][0]
            if shared:
                # our own answer: decoded from the bytes we send every sender, not rounded again by a subtraction
                received = self._own_answer(part_index) if ourselves else delta
                delta = received - own
            if ourselves and len(self.sender_peer_ids) >= 3:  # our own robust aggregate, over a group with a majority
                register(peer_index, part_index, received if shared else delta)
                return
            banned = not ourselves and bans.refuses(reducer, f"{prefix} all-reduce")
            refusal = Refusal("is refused", offence=False) if banned else check_received(delta, own, own_rms)
            if refusal is not None:
                if refusal.offence and not ourselves:
                    bans.ban(reducer, prefix, "reducer", refusal.reason)
                elif not banned:  # ourselves: two senders, maybe one of them bad, and no majority to tell which
                    whose = "our own" if ourselves else f"reducer {reducer}'s"
                    logger.info(f"{prefix}: not applying {whose} aggregate: {refusal.reason}")
                delta = torch.zeros_like(own)  # our own part for this partition, as for a failed reducer
                received = own
                if fallbacks is not None:
                    with fallbacks.get_lock():
                        fallbacks.value += 1
            register(peer_index, part_index, received if shared else delta)

        container.register_processed_part = register_checked

    def _own_answer(self, part_index: int) -> torch.Tensor:
        return deserialize_torch_tensor(self.tensor_part_reducer.answers[part_index])

    @follows(AllReduceRunner, "_accumulate_parts_streaming", "6c5a3c7266060303")  # copied below
    async def _accumulate_parts_streaming(self, stream, sender_index: int):
        if not self.shared_rounding:
            async for message in super()._accumulate_parts_streaming(stream, sender_index):
                yield message
            return
        # AllReduceRunner._accumulate_parts_streaming (hivemind 1.1.12), answering each part with the bytes of the
        # aggregate our reducer quantized once (the same for every sender) instead of a difference quantized per sender
        part_index = 0
        try:
            async for tensor_part, weight in amap_in_executor(
                lambda msg: (deserialize_torch_tensor(msg.tensor_part), msg.weight),
                stream,
                max_prefetch=self.tensor_part_container.prefetch,
            ):
                try:
                    await self.tensor_part_reducer.accumulate_part(sender_index, part_index, tensor_part, weight=weight)
                except BannedException:
                    logger.debug(f"Sender {sender_index} is already banned")
                    break  # sender was banned, we no longer need to aggregate it
                answer = self.tensor_part_reducer.answers[part_index]
                part_index += 1
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=answer)
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])
