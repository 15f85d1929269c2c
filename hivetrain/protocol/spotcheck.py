"""The gradient spot check on the wire: what a validator asks, what a miner answers, and the bar.

A validator POSTs a signed ``Challenge`` to the miner's ``/challenge`` endpoint: a batch of the
miner's own shard and a projection seed. The miner answers with a signed ``SpotCheckAnswer``:
``projected_gradient`` (``hivetrain.protocol.projection``) of that batch at its current
parameters, bound to the challenge's nonce and to the validator that asked. Both are strict
models: the miner refuses a malformed challenge, the validator fails a malformed answer.

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

The step-lag rows scale with the learning rate. At the tiny preset's 3e-3 (``--lr 0.003``, 2026-12-07,
``bench/results/spot_check_threshold_lr003.json``) one step behind scores 0.9650/0.9739 centered after
10 steps and 0.7226/0.7985 after 60: an honest answer judged one epoch off would fail the bar. Noise stays at
or below 0.4384; another batch's gradient has a median of 0.1052 and 0.1482 and reaches 0.6311. So, one epoch off,
the bar only passes: below ``CROSS_EPOCH_FLOOR`` = 0.5 an answer fails, and between the floor and the bar it is
not judged, a failure only after ``spot_check_tries`` such answers in a row (``hivetrain.validator.spot``).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

#: Cosine an answer needs against the validator's own computation (see the module docstring).
SPOT_CHECK_THRESHOLD = 0.95
#: An answer this close to another miner's answer for a different batch is a copy.
COPY_THRESHOLD = 0.999
#: An answer this many epochs behind the validator's model fails without a comparison.
MAX_LAG_EPOCHS = 1
#: An answer one epoch off, judged at the validator's parameters, fails below this centered cosine; between it and
#: the bar it is not judged (the module docstring: honest one step off >= 0.72 at lr 3e-3, noise <= 0.44).
CROSS_EPOCH_FLOOR = 0.5
#: Largest batch (blocks) and projection a miner computes for one challenge: bounds its cost.
MAX_BATCH = 16
MAX_DIM = 1024
#: A validator picks a challenge's batch within the first this-many passes over the miner's shard
#: (a block index is a pure function of the configuration across passes); a miner whose shard size
#: is known refuses an index beyond them.
CHALLENGE_PASSES = 4


class _Wire(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class Challenge(_Wire):
    """What a validator asks (the signed payload of ``POST /challenge``)."""

    miner_hotkey: str = Field(description="the miner this challenge is for; another miner must refuse it")
    block_index: int = Field(ge=0, description="first block of the batch in the miner's shard")
    batch_size: int = Field(ge=1, le=MAX_BATCH)
    seed: int = Field(ge=0, lt=2**63, description="projection seed")
    dim: int = Field(
        ge=8, le=MAX_DIM, multiple_of=8, description="projection size (the projection's blocks are 8 wide)"
    )
    epoch: int = Field(ge=0, description="the global epoch the validator holds")


class SpotCheckAnswer(_Wire):
    """What a miner answers (the signed payload of the ``/challenge`` response).

    ``projection`` may hold NaN or infinities as far as this model is concerned: the validator
    judges and names those itself instead of calling them malformed.
    """

    challenge_nonce: str = Field(min_length=1, max_length=128, description="nonce of the signed challenge this answers")
    validator: str = Field(min_length=1, description="hotkey of the validator that asked")
    epoch: int = Field(ge=0, description="the miner's local epoch: the parameters the projection was taken at")
    block_index: int = Field(ge=0, description="the challenge's block_index, echoed")
    projection: list[float] = Field(min_length=1, max_length=MAX_DIM, description="the projected gradient, dim numbers")
