"""Audits of gradient rounds: a miner's gradient recomputed and compared with what its reducers received.

Receipts (``hivetrain.validator.receipts``) prove that a miner's parts arrived, not what they held. So each
reducer of a gradient round also draws, from the OS's randomness, candidate coordinates of its partition
before any part arrives, keeps what every sender's part and the aggregate hold there, and names in its
receipt, after the round, a few of them (where the aggregate is largest) with each sender's values, and
what each sender declared in matchmaking: the epoch its gradients were computed at, and the first block
of its own shard they come from, one block per sample of the weight it declared
(``hivetrain.hivemind_compat.allreduce``, ``PartSample``). A sender cannot fit its parts to coordinates
it never saw.

The validator audits a few (sender, round) pairs per check round, among rounds at an epoch whose
parameters it holds (``ModelSync.holds``: the sender's gradient must be recomputed at them). It
recomputes that gradient, the mean LM-loss gradient over those blocks, as hivemind's gradient averager
sends it (the mean of the per-step gradients, at one set of parameters per epoch), and, for each reducer
of *another* hotkey, compares that reducer's values with the recomputed ones at its coordinates (cosine).
A reducer disagrees when the cosine is below ``AUDIT_FLOOR``, or when it relays another declaration. The
sender fails when more than half of the reducers judged disagree: it takes what the sender sent to most
of its reducers, not the word of one of them, as crediting does (``credit_round``). A failed audit zeroes
the sender's hotkey as a proven offence does (``Validator._catch``).

What an audit catches: a part that is not the declared blocks' gradient, at the declared epoch (a flipped
gradient of honest size, noise, a scaled copy of another miner's, a spot-check-honest miner that sends
something else to the swarm). What it does not: a gradient of other blocks or of an older epoch, when its
direction is close to the declared one's (the floor leaves room for bf16 on a GPU against fp32 here, and
for the dropout a miner trains with and the recomputation leaves out); a sender corrupting at most half
of its partitions; two hotkeys of one operator framing a third in a group of three (as with credit). DiLoCo's
pseudo-gradients are not audited: recomputing one is a whole outer step of inner optimizer steps.
"""

from __future__ import annotations

import collections
import math
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from hivetrain.log import get_logger
from hivetrain.protocol.records import PartSample
from hivetrain.protocol.training import param_groups

if TYPE_CHECKING:
    from hivetrain.validator.spot import MinerShards
    from hivetrain.validator.sync import ModelSync

logger = get_logger(__name__)

#: A reducer whose values point elsewhere than the recomputed gradient at its coordinates by this cosine or less
#: disagrees. Honest parts measured 0.99+ (same preset, fp32, no dropout); a flipped part scores -1.
AUDIT_FLOOR = 0.5
#: A round whose sender declared more blocks than this is not audited (the cost of one audit is that many
#: forward and backward passes); nor one whose reducers' values are all but zero where we recompute.
MAX_AUDIT_BLOCKS = 1024
MIN_NORM = 1e-12
#: Candidates (sender, round) waiting for an audit, at most; the oldest go first.
MAX_CANDIDATES = 2000


@dataclass(frozen=True)
class Evidence:
    """What one reducer says a sender sent it in one round: the sender's declaration and values at coordinates."""

    epoch: int
    first_block: int
    blocks: int
    indices: tuple[int, ...]
    values: tuple[float, ...]


@dataclass(frozen=True)
class Candidate:
    """One (sender, round) that can be audited: the sender's hotkey and peer id, the round, the reducers' evidence
    by reporter hotkey (never the sender's own), and the declaration most of them relay."""

    hotkey: str
    peer_id: str
    round: tuple[str, str]  # (averager, group id)
    epoch: int
    first_block: int
    blocks: int
    evidence: dict[str, Evidence] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditResult:
    hotkey: str
    verdict: str  # "pass" or "fail"
    reason: str
    cosines: dict[str, float]  # reporter hotkey -> cosine of its values with the recomputed ones


def round_candidates(
    key: tuple[str, str],
    weights: dict[str, dict[str, float]],
    samples: dict[str, dict[str, PartSample]],
    hotkey_of: dict[str, str],
    credited: set[str],
) -> list[Candidate]:
    """The senders of one settled round that can be audited: credited, with samples from reporters of other hotkeys.
    ``weights``: reporter hotkey -> sender peer id -> declared weight; ``samples``: reporter hotkey -> sender peer
    id -> its values; ``hotkey_of``: live peer id -> hotkey."""
    by_sender: dict[tuple[str, str], dict[str, Evidence]] = {}
    for reporter, named in samples.items():
        for peer, sample in named.items():
            hotkey = hotkey_of.get(peer)
            weight = weights.get(reporter, {}).get(peer)
            if hotkey is None or hotkey == reporter or hotkey not in credited or not weight or weight < 1:
                continue
            by_sender.setdefault((hotkey, peer), {})[reporter] = Evidence(
                sample.epoch,
                sample.first_block,
                int(weight),
                tuple(sample.indices),
                tuple(sample.values),
            )
    found = []
    for (hotkey, peer), evidence in by_sender.items():
        declared = collections.Counter((e.epoch, e.first_block, e.blocks) for e in evidence.values())
        (epoch, first_block, blocks), _ = declared.most_common(1)[0]
        found.append(Candidate(hotkey, peer, key, epoch, first_block, blocks, evidence))
    return found


def judge_audit(candidate: Candidate, gradient: torch.Tensor, floor: float = AUDIT_FLOOR) -> AuditResult | None:
    """The verdict on ``candidate`` given its recomputed ``gradient`` (flat, the averager's order); None when no
    reducer's evidence can be judged (coordinates where the recomputed gradient is all but zero)."""
    cosines, disagree, judged = {}, [], 0
    declared = (candidate.epoch, candidate.first_block, candidate.blocks)
    for reporter, evidence in sorted(candidate.evidence.items()):
        if (evidence.epoch, evidence.first_block, evidence.blocks) != declared:
            judged += 1
            disagree.append(f"{reporter[:10]} relays another declaration")
            continue
        if not evidence.indices or max(evidence.indices) >= gradient.numel():
            judged += 1
            disagree.append(f"{reporter[:10]} names coordinates beyond the vector")
            continue
        expected = gradient[list(evidence.indices)].double()
        received = torch.tensor(evidence.values, dtype=torch.float64)
        if float(expected.norm()) < MIN_NORM:
            continue  # nothing to compare: the gradient is zero there
        judged += 1
        norm = float(received.norm())
        cosine = float(expected @ received) / (float(expected.norm()) * norm) if norm > 0 else 0.0
        cosines[reporter] = cosine
        if not cosine > floor:
            disagree.append(f"{reporter[:10]} received cosine {cosine:.3f}")
    if not judged:
        return None
    what = (
        f"round {candidate.round[1][:12]} at epoch {candidate.epoch}, blocks {candidate.first_block}+"
        f"{candidate.blocks}: {judged - len(disagree)} of {judged} reducers received its gradient"
    )
    reason = "; ".join([f"audit: {what}", *disagree])[:500]
    return AuditResult(candidate.hotkey, "fail" if 2 * len(disagree) > judged else "pass", reason, cosines)


def averaged_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters in the order a miner's gradient averager flattens their gradients (its optimizer's groups)."""
    return [param for group in param_groups(model, 0.0) for param in group["params"]]


def declared_gradient(model: torch.nn.Module, stream, first_block: int, blocks: int, batch: int) -> torch.Tensor:
    """The mean LM-loss gradient over ``blocks`` blocks of ``stream`` from ``first_block``, at the model's
    parameters, dropout off, flattened in ``averaged_parameters`` order: (n_params,) float32."""
    params = averaged_parameters(model)
    total = [torch.zeros_like(param, dtype=torch.float32) for param in params]
    was_training = model.training
    model.eval()
    try:
        for start in range(first_block, first_block + blocks, batch):
            count = min(batch, first_block + blocks - start)
            input_ids = stream.get_batch(start, count)  # (B, T)
            loss = model(input_ids=input_ids, labels=input_ids).loss * (count / blocks)  # every block weighs the same
            for accumulated, grad in zip(total, torch.autograd.grad(loss, params)):
                accumulated += grad.float()
    finally:
        model.train(was_training)
    return torch.cat([t.reshape(-1) for t in total])


class Auditor:
    """Audits ``per_round`` candidates per call of ``run``, at the parameters ``sync`` holds, with each miner's shard
    from ``shards`` (read in ``batch`` blocks at a time). Candidates wait in a bounded queue until their epoch is held
    (they are dropped once it is older than any held); the least recently audited hotkeys go first."""

    def __init__(
        self,
        sync: ModelSync,
        shards: MinerShards,
        batch: int,
        per_round: int,
        max_blocks: int = MAX_AUDIT_BLOCKS,
        clock=time.monotonic,
    ):
        self.sync, self.shards, self.batch, self.per_round, self.max_blocks = sync, shards, batch, per_round, max_blocks
        self.clock = clock
        self.queue: collections.deque[Candidate] = collections.deque(maxlen=MAX_CANDIDATES)
        self.last_audited: dict[str, float] = {}
        self._rng = random.Random()

    def offer(self, candidates: list[Candidate]) -> None:
        self.queue.extend(candidates)

    def run(self, live: set[str], stop=None, between=None) -> list[AuditResult]:
        """Audit up to ``per_round`` candidates of live hotkeys whose epoch is held; each result once. ``between``
        runs before each audit (the validator sets weights there when they are due)."""
        if self.per_round < 1 or not self.queue:
            return []
        oldest = self.sync.held_epochs()[0]
        waiting = [c for c in self.queue if c.hotkey in live and c.epoch >= oldest]  # older: never held again
        ready = [c for c in waiting if self.sync.holds(c.epoch)]
        self._rng.shuffle(ready)
        ready.sort(key=lambda c: self.last_audited.get(c.hotkey, -math.inf))
        chosen, hotkeys = [], set()
        for candidate in ready:
            if len(chosen) == self.per_round:
                break
            if candidate.hotkey not in hotkeys:  # one audit per hotkey and run
                chosen.append(candidate)
                hotkeys.add(candidate.hotkey)
        self.queue = collections.deque((c for c in waiting if c not in chosen), maxlen=MAX_CANDIDATES)
        results = []
        for candidate in chosen:
            if between is not None:
                between()
            if stop is not None and stop.is_set():
                break
            result = self.audit(candidate)
            if result is not None:
                results.append(result)
        return results

    def audit(self, candidate: Candidate) -> AuditResult | None:
        """One audit: recompute at the candidate's epoch (held), judge; None when it cannot be judged."""
        self.last_audited[candidate.hotkey] = self.clock()
        if not 1 <= candidate.blocks <= self.max_blocks:
            logger.info(f"audit of {candidate.hotkey[:10]} skipped: {candidate.blocks} blocks declared")
            return None
        stream = self.shards.stream_for(candidate.hotkey)
        with self.sync.parameters_at(candidate.epoch):
            gradient = declared_gradient(self.sync.model, stream, candidate.first_block, candidate.blocks, self.batch)
        return judge_audit(candidate, gradient)

    def forget(self, live: set[str]) -> None:
        self.last_audited = {h: t for h, t in self.last_audited.items() if h in live}
