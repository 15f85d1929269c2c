"""Gradient spot checks, validator side: ask a miner, recompute, compare.

The validator picks a batch of the miner's own shard (the shard follows from its peer id, so
the validator rebuilds the same blocks) and a projection seed, signs the challenge for that
miner's hotkey, and compares the signed answer with its own projection of the same batch at the
shared parameters it synced. An answer at an older epoch than the validator's by more than one
fails as lagging; an answer at a newer epoch makes the validator sync again before it judges.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import requests
import torch
from pydantic import ValidationError

from hivetrain.data import BlockStream, shard_for_peer
from hivetrain.identity import VerificationError, Verifier, sign
from hivetrain.log import get_logger
from hivetrain.protocol.projection import baseline_projection, projected_gradient
from hivetrain.protocol.records import PeerRecord
from hivetrain.protocol.spotcheck import MAX_LAG_EPOCHS, Challenge, SpotCheckAnswer
from hivetrain.settings import ValidatorSettings
from hivetrain.validator.sync import ModelSync
from hivetrain.validator.verdicts import SpotCheckResult, judge_spot_check

logger = get_logger(__name__)


@dataclass
class SpotCheck:
    """One spot check with what a person needs to judge it again."""

    miner: str
    result: SpotCheckResult
    block_index: int
    seed: int
    validator_epoch: int
    answer_epoch: int | None
    answer: torch.Tensor | None = None

    def explain(self) -> str:
        lag = "" if self.answer_epoch is None else f", answer at epoch {self.answer_epoch} vs ours {self.validator_epoch}"
        return f"blocks {self.block_index}+ seed {self.seed}{lag}: {self.result.reason}"


class AnswerRejected(Exception):
    """A miner's answer that is no answer: unreachable, not authentic, not for this challenge, malformed."""


def ask_miner(http: requests.Session, wallet, verifier: Verifier, miner: PeerRecord, asked: Challenge,
              timeout_s: float) -> SpotCheckAnswer:
    """POST the signed ``asked`` to the miner; its authentic answer to exactly this challenge, else ``AnswerRejected``."""
    challenge = sign(wallet, asked.model_dump(mode="json"))
    try:
        response = http.post(f"{miner.challenge_url}/challenge", json=challenge, timeout=timeout_s)
    except requests.RequestException as error:
        raise AnswerRejected(f"no answer: {type(error).__name__}") from None
    if response.status_code != 200:
        raise AnswerRejected(f"answered HTTP {response.status_code}: {response.text[:120]}")
    try:
        envelope = response.json()
        payload = verifier.verify(envelope)
    except (ValueError, VerificationError) as error:
        raise AnswerRejected(f"answer not authentic: {error}") from None
    try:
        answered = SpotCheckAnswer.model_validate(payload)
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(map(str, problem["loc"])) or "answer"
        raise AnswerRejected(f"malformed answer: {where}: {problem['msg']}") from None
    if envelope.get("hotkey") != miner.hotkey or answered.challenge_nonce != challenge["nonce"] \
            or answered.validator != wallet.hotkey.ss58_address:
        raise AnswerRejected("answer signed by another hotkey or for another challenge")
    return answered


class SpotChecker:
    """Sends signed challenges and judges the answers against the validator's own computation."""

    def __init__(self, wallet, sync: ModelSync, settings: ValidatorSettings, tokenizer, block_size: int,
                 reference_blocks: torch.Tensor):
        self.wallet, self.sync, self.settings = wallet, sync, settings
        # the direction every batch's gradient shares, measured on blocks only the validator picks;
        # cosines are taken after removing it (an answer for some other batch is then far off)
        self.reference = [reference_blocks[i : i + settings.spot_check_batch]
                          for i in range(0, min(len(reference_blocks), 4 * settings.spot_check_batch), settings.spot_check_batch)]
        self._baseline: tuple[tuple[int, int], torch.Tensor] | None = None
        self.tokenizer, self.block_size = tokenizer, block_size
        self.hotkey = wallet.hotkey.ss58_address
        self.answers = Verifier.in_memory(window_s=settings.record_window_s)
        self.http = requests.Session()
        self._streams: dict[int, BlockStream] = {}
        self._rng = random.Random()

    def stream_for(self, peer_id: str) -> BlockStream:
        """The miner's shard, built the way the miner builds it (cached per shard)."""
        s = self.settings
        shard = shard_for_peer(peer_id, s.num_shards)
        if shard not in self._streams:
            self._streams[shard] = BlockStream(s.dataset, s.dataset_split, s.text_key, self.tokenizer, self.block_size,
                                               num_shards=s.num_shards, shard=shard, seed=s.seed)
        return self._streams[shard]

    def expected(self, batch: torch.Tensor, seed: int) -> torch.Tensor:
        return projected_gradient(self.sync.model, batch, seed, self.settings.spot_check_dim)

    def baseline(self, seed: int) -> torch.Tensor:
        """Mean projection of the reference batches at the current parameters (cached per seed and epoch)."""
        key = (seed, self.sync.epoch)
        if self._baseline is None or self._baseline[0] != key:
            self._baseline = (key, baseline_projection(self.sync.model, self.reference, seed, self.settings.spot_check_dim))
        return self._baseline[1]

    def check(self, miner: PeerRecord, seed: int, others: dict[str, torch.Tensor]) -> SpotCheck | None:
        """Challenge ``miner`` once; ``others`` are this round's answers of other miners (copy detection).

        None when the validator itself could not reach the miner's epoch (no evidence either way).
        """
        s = self.settings
        stream = self.stream_for(miner.peer_id)
        block_index = self._rng.randrange(0, max(1, (stream.blocks_per_pass or 1) * 4))
        epoch = self.sync.epoch

        def verdict(ok: bool, reason: str, answer_epoch=None, answer=None, cosine=None) -> SpotCheck:
            result = SpotCheckResult("pass" if ok else "fail", reason, cosine)
            return SpotCheck(miner.hotkey, result, block_index, seed, epoch, answer_epoch, answer)

        asked = Challenge(miner_hotkey=miner.hotkey, block_index=block_index, batch_size=s.spot_check_batch,
                          seed=seed, dim=s.spot_check_dim, epoch=epoch)
        try:
            answered = ask_miner(self.http, self.wallet, self.answers, miner, asked, s.spot_check_timeout_s)
        except AnswerRejected as rejected:
            return verdict(False, str(rejected))
        answer_epoch = answered.epoch
        answer = torch.tensor(answered.projection, dtype=torch.float32)  # (dim,)
        if answer_epoch > epoch:
            self.sync.sync()  # the swarm moved on while we asked: judge at the miner's epoch if we can
            epoch = self.sync.epoch
        if answer_epoch > epoch + MAX_LAG_EPOCHS:
            logger.warning(f"cannot judge {miner.hotkey[:10]}: it answered at epoch {answer_epoch}, we hold {epoch}")
            return None  # we are the one behind: no evidence either way
        if answer_epoch < epoch - MAX_LAG_EPOCHS:
            return verdict(False, f"lags: answered at epoch {answer_epoch}, the swarm is at {epoch}", answer_epoch, answer)
        batch = stream.get_batch(block_index, s.spot_check_batch)  # (B, T), the blocks the miner should have used
        result = judge_spot_check(self.expected(batch, seed), answer, s.spot_check_threshold, others,
                                  baseline=self.baseline(seed))
        return SpotCheck(miner.hotkey, result, block_index, seed, epoch, answer_epoch, answer)
