"""Checks a validator can run on a miner's claims instead of trusting self-reported loss.

**Gradient spot check.** The validator sends a miner a batch and a seed; the miner answers with
``projected_gradient(model, batch, seed)``: the LM-loss gradient at its current parameters,
projected to ``dim`` numbers by a random sign matrix drawn from ``seed`` (generated on the CPU
chunk by chunk, so it is identical on every device and never held whole). The validator
recomputes it on its own copy of the shared model and compares the two by cosine.

The threshold comes from ``bench/spot_check_threshold.py`` (tiny GPT-2 on the bundled corpus,
AdamW at the miner's peak lr 6e-4, dim 64, challenge batches of 8 x 64 tokens, 5 batches x 2
seeds per case; results in ``bench/results/spot_check_threshold.json``). Cosine to the
validator's answer, min / median, raw and centered on a 4-batch baseline::

                                 after 10 steps                 after 60 steps
    case                         raw            centered        raw            centered
    honest, 1 vs 2 threads       1.0000/1.0000  1.0000/1.0000   1.0000/1.0000  1.0000/1.0000
    honest, bf16 autocast        1.0000/1.0000  1.0000/1.0000   1.0000/1.0000  1.0000/1.0000
    lags by 1 step               0.9949/0.9966  0.9857/0.9907   0.9980/0.9987  0.9925/0.9950
    lags by 3 steps              0.9386/0.9632  0.8915/0.9174   0.9849/0.9902  0.9427/0.9568
    lags by 10 steps             0.0294/0.2191  0.1698/0.2350   0.9622/0.9715  0.8676/0.8842
    another batch (max)          0.8973 (max)   0.6511 (max)    0.9252 (max)   0.6492 (max)
    noise (max)                  0.0735 (max)   0.3966 (max)    0.0404 (max)   0.4035 (max)

Gradients of different batches share a large common direction, so raw cosines of an answer
for the wrong batch reach 0.93; subtracting the validator's ``baseline_projection`` (mean over
reference batches it picks) removes it and leaves at most 0.65. ``SPOT_CHECK_THRESHOLD = 0.95``
with a baseline passes every honest answer (thread counts, bf16, one step behind: >= 0.986),
fails the wrong batch and noise by a wide margin, and fails a model 10 steps (several epochs)
behind at both stages; without a baseline it still separates honest from wrong-batch answers,
but by 0.025 only, and lets a model 10 steps behind pass late in training. Use a baseline.

**Claimed samples.** What a miner says it trained on is bounded by what hivemind's own
``ProgressTracker`` records in the DHT (``fetch_progress``; the swarm schedules epochs from those
records, so inflating them breaks the miner's own collaboration and shows) and by a throughput
ceiling. Those records are still self-reported: they bound claims, they do not prove work.
"""

from __future__ import annotations

import hashlib
import math
import time
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Iterable, Literal, Mapping

import torch
from pydantic import Field

from hivetrain.contracts import Record
from hivetrain.logging import get_logger

logger = get_logger(__name__)

#: Cosine an answer needs against the validator's own computation (see the module docstring).
SPOT_CHECK_THRESHOLD = 0.95
#: An answer this close to another miner's answer for a different batch is a copy.
COPY_THRESHOLD = 0.999
#: Flattened gradient elements per generated block of the projection (part of the protocol).
PROJECTION_CHUNK = 1 << 16

Verdict = Literal["pass", "fail"]


@dataclass(frozen=True)
class SpotCheckResult:
    """The verdict of one check, with the reason a person can read in the score evidence."""

    verdict: Verdict
    reason: str
    cosine: float | None = None

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"


@dataclass(frozen=True)
class ClaimCheckResult(SpotCheckResult):
    """A claimed-samples verdict; ``verified_samples`` is what scoring may credit (0 on failure)."""

    verified_samples: int = 0
    claimed_samples: int = 0


# --- gradient spot check --------------------------------------------------------------------


def projected_gradient(
    model: torch.nn.Module, input_ids: torch.Tensor, seed: int, dim: int = 64, *, autocast_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The LM-loss gradient of ``input_ids`` at the model's current parameters, projected to ``(dim,)``.

    Labels are the inputs (the causal LM shifts them). Dropout is off while computing, and the
    parameters' ``.grad`` are left untouched. Deterministic given (parameters, batch, seed):
    the projection is drawn on the CPU, so a GPU miner and a CPU validator use the same matrix.
    """
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be an integer (B, T) tensor, got {tuple(input_ids.shape)} {input_ids.dtype}")
    if dim < 1 or dim % 8:
        raise ValueError(f"dim must be a positive multiple of 8, got {dim}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; unfreeze them (requires_grad=True) before a spot check")
    device = params[0].device
    was_training = model.training
    model.eval()
    try:
        amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
        with amp:
            loss = model(input_ids=input_ids.to(device), labels=input_ids.to(device)).loss
        grads = torch.autograd.grad(loss, params)
    finally:
        model.train(was_training)
    flat = torch.cat([g.detach().reshape(-1).to("cpu", torch.float32) for g in grads])  # (n_params,)
    return _project(flat, seed, dim)


def _project(flat: torch.Tensor, seed: int, dim: int) -> torch.Tensor:
    """``R @ flat / sqrt(dim)`` with R a (dim, n) random +-1 matrix drawn block by block from ``seed``."""
    out = torch.zeros(dim, dtype=torch.float64)
    generator = torch.Generator(device="cpu")
    for index, start in enumerate(range(0, flat.numel(), PROJECTION_CHUNK)):
        block = flat[start : start + PROJECTION_CHUNK]  # (c,)
        generator.manual_seed(_block_seed(seed, index))
        packed = torch.empty((dim // 8, block.numel()), dtype=torch.uint8).random_(0, 256, generator=generator)  # (dim/8, c)
        ones = torch.empty(dim // 8, 8)  # (dim/8, 8): row 8*r + k of R is bit k of byte row r
        for bit in range(8):
            ones[:, bit] = ((packed >> bit) & 1).to(torch.float32) @ block  # one bit plane at a time: fast on CPU
        out += (2.0 * ones.reshape(dim) - block.sum()).double()  # sign = 2 * bit - 1, without building the signs
    return (out / math.sqrt(dim)).to(torch.float32)


def _block_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"hivetrain-projection/{seed}/{index}".encode()).digest()[:8], "little") & (2**63 - 1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two vectors; 0.0 when either is zero."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    denom = a.norm() * b.norm()
    return 0.0 if denom == 0 else float(a @ b / denom)


def baseline_projection(model: torch.nn.Module, reference_batches: Iterable[torch.Tensor], seed: int, dim: int = 64) -> torch.Tensor:
    """The mean projected gradient of ``reference_batches`` (validator-chosen): the direction all batches share.

    Gradients of different batches share a large common component (the cosine of two answers
    for different batches reaches 0.9 on the tiny model), so comparing answers after subtracting
    this baseline separates "right batch" from "some batch" far better (see the module docstring).
    """
    projections = [projected_gradient(model, batch, seed, dim) for batch in reference_batches]
    if not projections:
        raise ValueError("baseline_projection needs at least one reference batch")
    return torch.stack(projections).mean(dim=0)  # (dim,)


def judge_spot_check(
    expected: torch.Tensor,
    answer: object,
    threshold: float = SPOT_CHECK_THRESHOLD,
    other_answers: Mapping[str, torch.Tensor] | Iterable[torch.Tensor] = (),
    *,
    baseline: torch.Tensor | None = None,
    copy_threshold: float = COPY_THRESHOLD,
) -> SpotCheckResult:
    """Pass when ``answer`` matches the validator's ``expected`` projection.

    Fails on a wrong shape or non-finite/zero answer, on a copy (an answer at least
    ``copy_threshold`` similar to another miner's answer for a different batch, and closer to it
    than to ``expected``), and on cosine below ``threshold``. With ``baseline`` (from
    ``baseline_projection``, same seed) every cosine is taken after subtracting it.
    """
    if not isinstance(answer, torch.Tensor) or answer.shape != expected.shape:
        shape = tuple(answer.shape) if isinstance(answer, torch.Tensor) else type(answer).__name__
        return SpotCheckResult("fail", f"answer has shape {shape}, expected {tuple(expected.shape)}")
    if not torch.isfinite(answer).all() or not answer.abs().sum() > 0:
        return SpotCheckResult("fail", "answer is zero or not finite")
    center = baseline if baseline is not None else torch.zeros_like(expected)
    similarity = cosine(expected - center, answer - center)
    others = other_answers.items() if isinstance(other_answers, Mapping) else enumerate(other_answers)
    for who, other in others:
        if isinstance(other, torch.Tensor) and other.shape == answer.shape:
            copied = cosine(other - center, answer - center)
            if copied >= copy_threshold and copied > similarity:
                return SpotCheckResult("fail", f"answer copies {who}'s answer for another batch (cosine {copied:.4f})", similarity)
    if similarity < threshold:
        return SpotCheckResult("fail", f"cosine {similarity:.4f} below threshold {threshold}", similarity)
    return SpotCheckResult("pass", f"cosine {similarity:.4f} >= {threshold}", similarity)


# --- claimed samples ------------------------------------------------------------------------


def check_claimed_samples(
    claimed: int, dht_progress_samples: int | None, elapsed_s: float, max_samples_per_s: float, tolerance: float = 0.1
) -> ClaimCheckResult:
    """Fail claims above hivemind's progress records or a throughput ceiling, each with ``tolerance``.

    ``dht_progress_samples`` is what the miner's ProgressTracker records showed over the same
    period (``ProgressLedger.samples``); None means the miner never appeared there.
    """
    if claimed < 0 or elapsed_s < 0 or max_samples_per_s <= 0 or tolerance < 0:
        raise ValueError("need claimed >= 0, elapsed_s >= 0, max_samples_per_s > 0 and tolerance >= 0")
    ceiling = max_samples_per_s * elapsed_s * (1 + tolerance)

    def verdict(ok: bool, reason: str, verified: int = 0) -> ClaimCheckResult:
        return ClaimCheckResult("pass" if ok else "fail", reason, verified_samples=verified, claimed_samples=claimed)

    if claimed > ceiling:
        return verdict(False, f"claims {claimed} samples in {elapsed_s:.0f}s, above the ceiling of {ceiling:.0f}")
    if claimed == 0:
        return verdict(True, "claims no samples")
    if dht_progress_samples is None:
        return verdict(False, f"claims {claimed} samples but has no progress records in the DHT")
    if claimed > dht_progress_samples * (1 + tolerance):
        return verdict(False, f"claims {claimed} samples, DHT progress records show {dht_progress_samples}")
    return verdict(True, f"claims {claimed} samples, DHT shows {dht_progress_samples}", min(claimed, dht_progress_samples))


class PeerProgress(Record):
    """One peer's ``LocalTrainingProgress`` as hivemind's ProgressTracker stores it in the DHT."""

    peer_id: str = Field(min_length=1, description="base58 peer id from the record (not authenticated by hivemind)")
    epoch: int = Field(ge=0)
    samples_accumulated: int = Field(ge=0, description="samples towards the peer's current epoch")
    samples_per_second: float = Field(ge=0)
    time: float = Field(description="DHT time of the report")
    client_mode: bool


def progress_key(run_id: str) -> str:
    """The DHT key hivemind.Optimizer's ProgressTracker (prefix = run_id) writes under."""
    return f"{run_id}_progress"


_validated: "weakref.WeakKeyDictionary[object, set[str]]" = weakref.WeakKeyDictionary()


def install_progress_validators(dht, run_id: str) -> None:
    """Give ``dht`` the record validators ProgressTracker uses, once per run.

    The RSA validator strips the signature ProgressTracker's values carry; the schema validator
    drops records that do not match ``TrainingProgressSchema``.
    """
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.dht.schema import SchemaValidator
    from hivemind.optim.progress_tracker import TrainingProgressSchema

    runs = _validated.setdefault(dht, set())
    if run_id not in runs:
        dht.add_validators([SchemaValidator(TrainingProgressSchema, prefix=run_id), RSASignatureValidator()])
        runs.add(run_id)


def fetch_progress(dht, run_id: str) -> dict[str, PeerProgress]:
    """Every live peer's latest training progress for ``run_id``, by peer id.

    ProgressTracker stores ``LocalTrainingProgress.dict()`` under ``f"{run_id}_progress"`` with
    the subkey = the writer's RSA public key (not its peer id). Several records naming one peer id
    keep the most advanced (epoch, samples), so a stranger cannot erase a peer's progress.
    """
    from hivemind.optim.progress_tracker import LocalTrainingProgress
    from hivemind.p2p import PeerID

    install_progress_validators(dht, run_id)
    found = dht.get(progress_key(run_id), latest=True)
    entries = found.value if found is not None and isinstance(found.value, dict) else {}
    progress: dict[str, PeerProgress] = {}
    for subkey, entry in entries.items():
        if getattr(entry, "value", None) is None:
            continue  # a tracker that shut down stores None
        try:
            raw = LocalTrainingProgress.parse_obj(entry.value)
            record = PeerProgress(
                peer_id=PeerID(raw.peer_id).to_base58(),
                epoch=raw.epoch,
                samples_accumulated=raw.samples_accumulated,
                samples_per_second=float(raw.samples_per_second),
                time=float(raw.time),
                client_mode=raw.client_mode,
            )
        except Exception as error:  # a stranger's record: anything malformed is skipped
            logger.warning(f"skipping a malformed progress record under {subkey!r}: {error!r}")
            continue
        held = progress.get(record.peer_id)
        if held is None or (record.epoch, record.samples_accumulated) > (held.epoch, held.samples_accumulated):
            progress[record.peer_id] = record
    return progress


@dataclass
class ProgressLedger:
    """Samples each peer's progress records showed over a scoring window.

    ``samples_accumulated`` restarts at every epoch, so the ledger keeps the largest value seen
    per (peer, epoch) and sums over epochs. Polls miss what a peer adds between the last poll and
    its epoch change, so this undercounts by up to one poll interval of work per epoch; the
    claim check's ``tolerance`` absorbs that.
    """

    started: float = field(default_factory=time.time)
    _best: dict[tuple[str, int], int] = field(default_factory=dict)

    def observe(self, progress: Mapping[str, PeerProgress]) -> None:
        for peer_id, record in progress.items():
            key = (peer_id, record.epoch)
            self._best[key] = max(self._best.get(key, 0), record.samples_accumulated)

    def samples(self, peer_id: str) -> int | None:
        """Samples seen for the peer, None if it never appeared."""
        seen = [count for (peer, _), count in self._best.items() if peer == peer_id]
        return sum(seen) if seen else None
