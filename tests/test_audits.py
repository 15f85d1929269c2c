"""Audits of gradient rounds (hivetrain.validator.audits): the recomputed gradient and the verdict on a sender.

The all-reduce side (each reducer's secret coordinates and what it records there) is tested with real averagers
in tests/test_allreduce.py; a negating miner named by an audit in a real swarm, in tests/integration/test_validator.py.
"""

from __future__ import annotations

import torch

from hivetrain.models import build_model
from hivetrain.protocol.records import PartSample
from hivetrain.validator.audits import (
    AUDIT_FLOOR,
    Candidate,
    Evidence,
    averaged_parameters,
    declared_gradient,
    judge_audit,
    round_candidates,
)


class Blocks:
    """A shard as the validator reads it: block i is a fixed row of random tokens."""

    def __init__(self, count: int = 64, length: int = 16, seed: int = 0):
        self.rows = torch.randint(0, 50257, (count, length), generator=torch.Generator().manual_seed(seed))

    def get_batch(self, start: int, size: int) -> torch.Tensor:
        return self.rows[start : start + size]


def test_the_recomputed_gradient_is_what_a_miner_accumulates_and_sends():
    """A miner steps batch by batch; hivemind's gradient averager sends the mean of the per-step gradients, in its
    optimizer's parameter order. The validator recomputes the same in batches of its own size."""
    model = build_model("tiny", seed=1)
    blocks, first, count = Blocks(), 8, 12
    params = averaged_parameters(model)
    accumulated = [torch.zeros_like(p) for p in params]
    for start in range(first, first + count, 4):  # the miner: batches of 4, one step each
        batch = blocks.get_batch(start, 4)
        grads = torch.autograd.grad(model(input_ids=batch, labels=batch).loss, params)
        for total, grad in zip(accumulated, grads):
            total += grad / (count // 4)
    sent = torch.cat([g.reshape(-1) for g in accumulated])
    recomputed = declared_gradient(model, blocks, first, count, batch=5)  # other batches: 5, 5, 2
    assert recomputed.shape == sent.shape
    assert torch.allclose(recomputed, sent, rtol=1e-4, atol=1e-7)
    # and another range of blocks is another gradient
    other = declared_gradient(model, blocks, first + count, count, batch=5)
    assert torch.nn.functional.cosine_similarity(other, sent, dim=0) < 0.95


def _candidate(gradient: torch.Tensor, reporters: dict[str, torch.Tensor], declared=(3, 40, 8)) -> Candidate:
    """A candidate whose reporters each received ``reporters[r]`` at 16 coordinates of their own."""
    evidence = {}
    for n, (reporter, sent) in enumerate(sorted(reporters.items())):
        indices = tuple(range(n * 100, n * 100 + 16))
        evidence[reporter] = Evidence(*declared, indices, tuple(sent[list(indices)].tolist()))
    return Candidate("sender", "peer", ("avg", "ab"), *declared, evidence)


def test_an_honest_sender_passes_and_a_negated_one_fails():
    gradient = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    noisy = gradient + 0.01 * torch.randn(1000)  # 8-bit rounding on the wire
    honest = judge_audit(_candidate(gradient, {"r1": noisy, "r2": noisy, "r3": noisy}), gradient)
    assert honest.verdict == "pass" and all(c > 0.99 for c in honest.cosines.values()), honest
    negated = judge_audit(_candidate(gradient, {"r1": -noisy, "r2": -noisy, "r3": -noisy}), gradient)
    assert negated.verdict == "fail" and "0 of 3 reducers received its gradient" in negated.reason, negated
    noise = torch.randn(1000, generator=torch.Generator().manual_seed(9))
    assert judge_audit(_candidate(gradient, {"r1": noise, "r2": noise, "r3": noise}), gradient).verdict == "fail"


def test_one_reducer_cannot_frame_a_sender_and_a_sender_cannot_hide_behind_one():
    """It takes more than half of the reducers judged: one lying reducer of three frames no one; a sender that
    corrupts its parts to two reducers of three is named."""
    gradient = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    framed = judge_audit(_candidate(gradient, {"r1": -gradient, "r2": gradient, "r3": gradient}), gradient)
    assert framed.verdict == "pass" and framed.cosines["r1"] < AUDIT_FLOOR, framed
    hiding = judge_audit(_candidate(gradient, {"r1": -gradient, "r2": -gradient, "r3": gradient}), gradient)
    assert hiding.verdict == "fail", hiding
    # a reducer relaying another declaration than most did disagrees: the sender told it something else
    candidate = _candidate(gradient, {"r1": gradient, "r2": gradient})
    other = Evidence(3, 41, 8, tuple(range(500, 516)), tuple(gradient[500:516].tolist()))
    told = judge_audit(Candidate(**{**candidate.__dict__, "evidence": {**candidate.evidence, "r3": other}}), gradient)
    assert told.verdict == "pass" and "r3 relays another declaration" in told.reason, told


def test_coordinates_where_the_gradient_is_zero_are_not_judged():
    gradient = torch.zeros(1000)
    assert judge_audit(_candidate(gradient, {"r1": torch.ones(1000), "r2": torch.ones(1000)}), gradient) is None


def test_candidates_come_from_other_hotkeys_and_credited_senders_only():
    sample = lambda first: PartSample(epoch=2, first_block=first, indices=[1, 2], values=[0.5, -0.5])  # noqa: E731
    weights = {"A": {"pb": 8.0, "pc": 8.0}, "B": {"pa": 8.0, "pc": 8.0}, "C": {"pa": 8.0, "pb": 8.0}}
    samples = {
        "A": {"pb": sample(10), "pc": sample(20)},
        "B": {"pa": sample(0), "pc": sample(21)},  # B relays another first block for C than A does
        "C": {"pa": sample(0), "pb": sample(10)},
    }
    hotkey_of = {"pa": "A", "pb": "B", "pc": "C"}
    found = {c.hotkey: c for c in round_candidates(("avg", "ab"), weights, samples, hotkey_of, {"A", "C"})}
    assert set(found) == {"A", "C"}  # B was not credited in this round
    assert set(found["A"].evidence) == {"B", "C"} and (found["A"].epoch, found["A"].first_block) == (2, 0)
    assert found["A"].blocks == 8
    assert set(found["C"].evidence) == {"A", "B"}
    # a hotkey's own reports are never evidence about it, even when another of its peers sent
    samples["A"]["pa2"] = sample(0)
    weights["A"]["pa2"] = 8.0
    found = round_candidates(("avg", "ab"), weights, samples, {**hotkey_of, "pa2": "A"}, {"A", "C"})
    assert all("A" not in c.evidence for c in found if c.hotkey == "A")
