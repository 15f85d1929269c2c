"""Gradient spot checks, validator side: ask every miner at once, recompute, compare.

The validator picks a batch of each miner's own shard (the shard follows from its hotkey and the
run's shard salt, ``hivetrain.data.shard_for``, so the validator rebuilds the same blocks) and a
projection seed, signs the challenge for that miner's hotkey, and compares the signed answer with
its own projection of the same batch at the shared parameters it synced.

A round sends every challenge at once from a small thread pool; each exchange has one deadline
for everything (``hivetrain.validator.bounded_http``: connection, request and the whole answer,
no redirects, a byte cap), so a miner that drips its answer fails at the deadline and holds up
no one else. The answers are then judged one by one in the caller's thread, where the model is.
An answer at an older epoch than the validator's by more than one fails as lagging; one beyond
what the swarm's progress records support (``ProgressPoller.plausible_epoch``) fails outright;
one ahead of the validator makes it sync once per round, and when it still cannot reach that
epoch the check is not judged, which counts as a failure after ``spot_check_tries`` in a row.
An answer is judged at the parameters of its own epoch when the validator holds them (its current
epoch and the one before, ``ModelSync.parameters_at``). One epoch off, at the validator's: a pass
there passes, but a miss is not a failure, since one step apart the gradient moves with the learning
rate, and at the tiny preset's (3e-3) an honest answer one step behind scores 0.72-0.88 against the
0.95 bar (``bench/spot_check_threshold.py --lr 0.003``). Below ``CROSS_EPOCH_FLOOR`` (0.5: noise scores at
most 0.44, another batch a median of 0.15) it fails; between the floor and the bar it is not judged. In DiLoCo
mode one epoch is a whole outer step: an answer at an epoch the validator does not hold is not judged.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
from pydantic import ValidationError

from hivetrain.data import BlockStream, shard_for
from hivetrain.identity import Domain, VerificationError, Verifier, sign
from hivetrain.log import get_logger
from hivetrain.protocol.projection import baseline_projection, projected_gradient
from hivetrain.protocol.records import PeerRecord
from hivetrain.protocol.spotcheck import (
    CHALLENGE_PASSES,
    CROSS_EPOCH_FLOOR,
    MAX_LAG_EPOCHS,
    Challenge,
    SpotCheckAnswer,
)
from hivetrain.validator.bounded_http import NoAnswer, RequestFailed, post_json
from hivetrain.validator.sync import ModelSync
from hivetrain.validator.verdicts import SpotCheckResult, judge_spot_check

logger = get_logger(__name__)

#: The largest answer the validator reads: a SpotCheckAnswer of MAX_DIM floats in its envelope is about 30 KB.
MAX_ANSWER_BYTES = 256 * 1024


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
        lag = (
            "" if self.answer_epoch is None else f", answer at epoch {self.answer_epoch} vs ours {self.validator_epoch}"
        )
        return f"blocks {self.block_index}+ seed {self.seed}{lag}: {self.result.reason}"


class AnswerRejected(Exception):
    """A miner's answer that is no answer: unreachable, not authentic, not for this challenge, malformed.

    The message names the cause in the validator's words; nothing the miner sent is repeated. ``stalled``: the
    endpoint did not answer at all (no connection, or nothing complete by the deadline).
    """

    def __init__(self, message: str, stalled: bool = False):
        super().__init__(message)
        self.stalled = stalled


def send_challenge(miner: PeerRecord, challenge: dict, deadline_s: float, allow_private: bool = True) -> bytes:
    """POST the signed ``challenge`` to the miner's endpoint; the raw answer, else ``AnswerRejected``."""
    try:
        return post_json(
            f"{miner.challenge_url.rstrip('/')}/challenge",
            challenge,
            deadline_s,
            MAX_ANSWER_BYTES,
            allow_private,
            miner.registered_from,
        )
    except RequestFailed as failed:
        raise AnswerRejected(str(failed), stalled=isinstance(failed, NoAnswer)) from None


def read_answer(body: bytes, challenge: dict, verifier: Verifier, miner: PeerRecord, validator: str) -> SpotCheckAnswer:
    """The miner's authentic answer to exactly ``challenge`` (signed by ``validator``), else ``AnswerRejected``."""
    try:
        envelope = json.loads(body)
        payload = verifier.verify(envelope)
    except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than Python's stack
        raise AnswerRejected("answer not authentic: not JSON") from None
    except VerificationError as error:
        raise AnswerRejected(f"answer not authentic: {type(error).__name__}") from None
    try:
        answered = SpotCheckAnswer.model_validate(payload)
    except ValidationError as error:
        problem = error.errors()[0]
        known = bool(problem["loc"]) and problem["loc"][0] in SpotCheckAnswer.model_fields
        where = ".".join(map(str, problem["loc"])) if known else "an unexpected field"  # never a name the miner chose
        raise AnswerRejected(f"malformed answer: {where}: {problem['msg']}") from None
    if (
        envelope.get("hotkey") != miner.hotkey
        or answered.challenge_nonce != challenge["nonce"]
        or answered.validator != validator
    ):
        raise AnswerRejected("answer signed by another hotkey or for another challenge")
    return answered


def ask_miner(
    wallet, verifier: Verifier, miner: PeerRecord, asked: Challenge, deadline_s: float, allow_private: bool = True
) -> SpotCheckAnswer:
    """Sign ``asked`` for the miner in ``verifier``'s domain, send it, read the answer: ``send_challenge``,
    ``read_answer``."""
    challenge = sign(wallet, verifier.domain, asked.model_dump(mode="json"))
    body = send_challenge(miner, challenge, deadline_s, allow_private)
    return read_answer(body, challenge, verifier, miner, wallet.hotkey.ss58_address)


@dataclass(frozen=True)
class SpotCheckRules:
    """What a spot check asks and how it is judged: the validator's ``spot_check_*`` settings."""

    batch: int  # blocks per challenge
    dim: int  # length of the projected gradient asked for
    threshold: float  # the cosine an answer must reach
    timeout_s: float  # one deadline for each whole exchange
    workers: int  # exchanges in flight at once
    tries: int  # checks in a row that cannot be judged before that counts as a failure
    private_urls: bool  # challenges may go to loopback and private addresses; else only where a registration came from
    window_s: float  # how fresh a signed answer must be
    diloco: bool  # one epoch is a whole outer step: answers one epoch apart cannot be judged


#: A miner whose endpoint stalled is not asked again for this long, doubling each time in a row, up to BENCH_MAX_S
BENCH_FIRST_S = 60.0
BENCH_MAX_S = 3600.0


class CheckSchedule:
    """Which miners a check round asks: at most ``per_round`` (one wave of exchanges, so a round costs one deadline
    whatever the number of registrations), none whose endpoint stalled lately.

    Half the round (rounded up) goes to miners whose last check passed, least recently checked first; the rest to
    the others, longest known to this validator first, so a crowd of fresh registrations waits behind the miners that
    were here before it (each is asked in turn; a stalled one is benched). Slots one side leaves go to the other.
    A miner whose endpoint stalled (``benched``) is left out for ``BENCH_FIRST_S``, doubled each time in a row, up to
    ``BENCH_MAX_S``; an answer of any kind ends its run.
    """

    def __init__(self, per_round: int, clock: Callable[[], float] = time.monotonic):
        if per_round < 1:
            raise ValueError(f"per_round must be >= 1, got {per_round}")
        self.per_round, self.clock = per_round, clock
        self.first_seen: dict[str, float] = {}
        self.last_checked: dict[str, float] = {}
        self.passed: set[str] = set()  # miners whose last judged check passed
        self.benched: dict[str, tuple[float, int]] = {}  # miner -> (left out until, stalls in a row)
        self._rng = random.Random()

    def pick(self, miners: list[PeerRecord]) -> list[PeerRecord]:
        now = self.clock()
        for miner in miners:
            self.first_seen.setdefault(miner.hotkey, now)
        eligible = [m for m in miners if self.benched.get(m.hotkey, (0.0, 0))[0] <= now]
        proven = sorted(
            (m for m in eligible if m.hotkey in self.passed), key=lambda m: self.last_checked.get(m.hotkey, -1.0)
        )
        others = [m for m in eligible if m.hotkey not in self.passed]
        self._rng.shuffle(others)  # equals in age are taken in random order
        others.sort(key=lambda m: self.first_seen[m.hotkey])
        take_proven = min(len(proven), max((self.per_round + 1) // 2, self.per_round - len(others)))
        return proven[:take_proven] + others[: self.per_round - take_proven]

    def record(self, asked: list[PeerRecord], checks: dict[str, SpotCheck], stalled: set[str]) -> None:
        """What a round found: judged verdicts, and the endpoints that did not answer (benched, and logged)."""
        now = self.clock()
        for miner in asked:
            hotkey = miner.hotkey
            self.last_checked[hotkey] = now
            if hotkey in checks:
                (self.passed.add if checks[hotkey].result.verdict == "pass" else self.passed.discard)(hotkey)
            if hotkey not in stalled:
                self.benched.pop(hotkey, None)
                continue
            stalls = self.benched.get(hotkey, (0.0, 0))[1] + 1
            seconds = min(BENCH_MAX_S, BENCH_FIRST_S * 2 ** min(stalls - 1, 16))
            self.benched[hotkey] = (now + seconds, stalls)
            logger.warning(
                f"miner {hotkey[:10]}'s endpoint did not answer its spot check ({stalls} in a row): "
                f"not asked again for {seconds:.0f}s"
            )

    def forget(self, live: set[str]) -> None:
        """Drop what is kept about miners no longer registered (bounded memory under a flood of registrations)."""
        now = self.clock()
        for table in (self.first_seen, self.last_checked):
            for hotkey in [h for h in table if h not in live]:
                del table[hotkey]
        for hotkey in [h for h, (until, _) in self.benched.items() if h not in live and until <= now]:
            del self.benched[hotkey]  # a bench outlives the registration: leaving and coming back does not end it
        self.passed &= live


class MinerShards:
    """Each miner's shard of the dataset, built the way the miner builds it (cached per shard).

    The shard follows from the miner's hotkey and the run's shard salt, read once (``hivetrain.data.shard_for``).
    """

    def __init__(
        self,
        dataset: str,
        split: str,
        text_key: str,
        tokenizer,
        block_size: int,
        num_shards: int,
        seed: int,
        shard_salt: str,
    ):
        self.dataset, self.split, self.text_key, self.tokenizer = dataset, split, text_key, tokenizer
        self.block_size, self.num_shards, self.seed, self.shard_salt = block_size, num_shards, seed, shard_salt
        self._streams: dict[int, BlockStream] = {}

    def stream_for(self, hotkey: str) -> BlockStream:
        shard = shard_for(hotkey, self.shard_salt, self.num_shards)
        if shard not in self._streams:
            self._streams[shard] = BlockStream(
                self.dataset,
                self.split,
                self.text_key,
                self.tokenizer,
                self.block_size,
                num_shards=self.num_shards,
                shard=shard,
                seed=self.seed,
            )
        return self._streams[shard]


class SpotChecker:
    """Sends signed challenges and judges the answers against the validator's own computation."""

    def __init__(
        self,
        wallet,
        domain: Domain,
        sync: ModelSync,
        rules: SpotCheckRules,
        shards: MinerShards,
        reference_blocks: torch.Tensor,
        plausible_epoch: Callable[[], int | None] = lambda: None,
    ):
        self.wallet, self.sync, self.rules, self.shards = wallet, sync, rules, shards
        # the direction every batch's gradient shares, measured on blocks only the validator picks;
        # cosines are taken after removing it (an answer for some other batch is then far off)
        self.reference = [
            reference_blocks[i : i + rules.batch]
            for i in range(0, min(len(reference_blocks), 4 * rules.batch), rules.batch)
        ]
        self._baseline: tuple[tuple[int, int], torch.Tensor] | None = None
        self.hotkey = wallet.hotkey.ss58_address
        self.plausible_epoch = plausible_epoch
        self.answers = Verifier.in_memory(domain, window_s=rules.window_s)  # its domain signs the challenges too
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=rules.workers, thread_name_prefix="spot-check")
        self.unjudged: Counter[str] = Counter()  # miner -> checks in a row whose answer could not be judged
        self._synced = False  # whether this round already synced for an answer ahead of us
        self.stalled: set[str] = set()  # miners whose endpoint did not answer in the last round
        self._rng = random.Random()

    def stream_for(self, hotkey: str) -> BlockStream:
        """The shard of the miner with ``hotkey`` (``MinerShards``)."""
        return self.shards.stream_for(hotkey)

    def expected(self, batch: torch.Tensor, seed: int) -> torch.Tensor:
        return projected_gradient(self.sync.model, batch, seed, self.rules.dim)

    def baseline(self, seed: int, epoch: int) -> torch.Tensor:
        """Mean projection of the reference batches at the model's parameters, which are ``epoch``'s (cached per seed
        and epoch)."""
        key = (seed, epoch)
        if self._baseline is None or self._baseline[0] != key:
            self._baseline = (key, baseline_projection(self.sync.model, self.reference, seed, self.rules.dim))
        return self._baseline[1]

    def check_round(
        self,
        miners: list[PeerRecord],
        seed: int,
        stop: threading.Event | None = None,
        between: Callable[[], None] | None = None,
    ) -> dict[str, SpotCheck]:
        """Challenge every miner at once, then judge each answer here; by miner hotkey.

        A miner whose answer could not be judged is left out, until that happened ``spot_check_tries``
        times in a row: then it fails. Judging stops early when ``stop`` is set. ``between`` runs before
        each judgement (the validator sets weights there when they are due).
        """
        challenges = {miner.hotkey: self._challenge(miner, seed) for miner in miners}
        domain = self.answers.domain  # challenges and answers: this run and subnet only
        signed = {
            hotkey: sign(self.wallet, domain, asked.model_dump(mode="json")) for hotkey, asked in challenges.items()
        }
        bodies = self._send_all({miner.hotkey: miner for miner in miners}, signed)
        self.stalled = {hotkey for hotkey, body in bodies.items() if isinstance(body, AnswerRejected) and body.stalled}
        answers = {miner.hotkey: self._read(bodies[miner.hotkey], signed[miner.hotkey], miner) for miner in miners}
        projections = {
            hotkey: torch.tensor(a.projection, dtype=torch.float32)
            for hotkey, a in answers.items()  # (dim,)
            if isinstance(a, SpotCheckAnswer) and len(a.projection) == self.rules.dim
        }
        checks, self._synced = {}, False
        for miner in random.sample(miners, len(miners)):
            if between is not None:
                between()
            if stop is not None and stop.is_set():
                break
            others = {hotkey: p for hotkey, p in projections.items() if hotkey != miner.hotkey}
            check = self._judge(miner, challenges[miner.hotkey], answers[miner.hotkey], others)
            if check is not None:
                checks[miner.hotkey] = check
        return checks

    def _challenge(self, miner: PeerRecord, seed: int) -> Challenge:
        stream = self.stream_for(miner.hotkey)
        block_index = self._rng.randrange(0, max(1, (stream.blocks_per_pass or 1) * CHALLENGE_PASSES))
        return Challenge(
            miner_hotkey=miner.hotkey,
            block_index=block_index,
            batch_size=self.rules.batch,
            seed=seed,
            dim=self.rules.dim,
            epoch=self.sync.epoch,
        )

    def _send_all(self, miners: dict[str, PeerRecord], signed: dict[str, dict]) -> dict[str, bytes | AnswerRejected]:
        """Every miner's raw answer, sent from the pool; each exchange ends by its own deadline."""
        rules = self.rules
        futures = {
            self.pool.submit(send_challenge, miners[hotkey], challenge, rules.timeout_s, rules.private_urls): hotkey
            for hotkey, challenge in signed.items()
        }
        # every exchange ends by its deadline; this bound only covers what no socket deadline reaches (a slow DNS)
        waves = math.ceil(len(futures) / rules.workers)
        done, late = concurrent.futures.wait(futures, timeout=waves * rules.timeout_s + 5.0)
        bodies: dict[str, bytes | AnswerRejected] = {}
        for future, hotkey in futures.items():
            if future in late:
                future.cancel()
                bodies[hotkey] = AnswerRejected(f"no answer within the deadline of {rules.timeout_s:g}s", stalled=True)
                continue
            try:
                bodies[hotkey] = future.result()
            except AnswerRejected as rejected:
                bodies[hotkey] = rejected
            except Exception as error:  # HTTP boundary: whatever else a miner's answer raised fails its check
                logger.warning(f"spot check of {hotkey[:10]} raised", exc_info=True)
                bodies[hotkey] = AnswerRejected(f"no answer: {type(error).__name__}")
        return bodies

    def _read(
        self, body: bytes | AnswerRejected, challenge: dict, miner: PeerRecord
    ) -> SpotCheckAnswer | AnswerRejected:
        if isinstance(body, AnswerRejected):
            return body
        try:
            return read_answer(body, challenge, self.answers, miner, self.hotkey)
        except AnswerRejected as rejected:
            return rejected

    def _judge(
        self,
        miner: PeerRecord,
        asked: Challenge,
        answered: SpotCheckAnswer | AnswerRejected,
        others: dict[str, torch.Tensor],
    ) -> SpotCheck | None:
        """The verdict on one answer; ``others`` are this round's answers of other miners (copy detection)."""
        rules = self.rules
        epoch = self.sync.epoch

        def verdict(ok: bool, reason: str, answer_epoch=None, answer=None) -> SpotCheck:
            self.unjudged.pop(miner.hotkey, None)
            return SpotCheck(
                miner.hotkey,
                SpotCheckResult("pass" if ok else "fail", reason),
                asked.block_index,
                asked.seed,
                epoch,
                answer_epoch,
                answer,
            )

        if isinstance(answered, AnswerRejected):
            return verdict(False, str(answered))
        answer_epoch = answered.epoch
        answer = torch.tensor(answered.projection, dtype=torch.float32)  # (dim,)
        bound = self.plausible_epoch()
        if bound is not None and answer_epoch > bound:  # no sync for it: the swarm's records say no state is there
            return verdict(
                False,
                f"answered at epoch {answer_epoch}, beyond the swarm's progress (at most {bound})",
                answer_epoch,
                answer,
            )
        if answer_epoch > epoch and not self._synced:
            self._synced = True  # once per round: the swarm moved on while we asked, judge at its epoch if we can
            self.sync.sync()
            epoch = self.sync.epoch
        if answer_epoch > epoch + MAX_LAG_EPOCHS:
            why = f"answered at epoch {answer_epoch}, the validator holds {epoch} and could not sync to it"
            return self._not_judged(miner, asked, epoch, answer_epoch, answer, why)
        if answer_epoch < epoch - MAX_LAG_EPOCHS:
            return verdict(
                False, f"lags: answered at epoch {answer_epoch}, the swarm is at {epoch}", answer_epoch, answer
            )
        held = self.sync.holds(answer_epoch)
        why = (
            f"answered at epoch {answer_epoch}, the validator holds the parameters of {epoch}"
            f"{''.join(f' and {older}' for older in self.sync.held_epochs() if older != epoch)}"
        )
        if not held and rules.diloco:  # one DiLoCo epoch is a whole outer step: nothing to compare across it
            return self._not_judged(
                miner, asked, epoch, answer_epoch, answer, f"{why} (one DiLoCo epoch is a whole outer step)"
            )
        judged_at = answer_epoch if held else epoch
        batch = self.stream_for(miner.hotkey).get_batch(asked.block_index, rules.batch)  # (B, T), the miner's blocks
        with self.sync.parameters_at(judged_at):
            result = judge_spot_check(
                self.expected(batch, asked.seed),
                answer,
                rules.threshold,
                others,
                baseline=self.baseline(asked.seed, judged_at),
            )
        if not held and not result.passed and result.cosine is not None and result.reason.startswith("cosine"):
            # one epoch off only the floor fails: an honest answer one step away scores above it (0.72 at lr 3e-3),
            # noise below it; between the floor and the bar an answer is not judged
            if result.cosine >= CROSS_EPOCH_FLOOR:
                return self._not_judged(
                    miner, asked, epoch, answer_epoch, answer, f"{why}; cosine {result.cosine:.4f} at ours"
                )
            result = SpotCheckResult(
                "fail",
                f"cosine {result.cosine:.4f} at epoch {epoch}, the answer's neighbour, below {CROSS_EPOCH_FLOOR}: "
                "not a gradient of this batch one epoch off",
                result.cosine,
            )
        self.unjudged.pop(miner.hotkey, None)
        return SpotCheck(miner.hotkey, result, asked.block_index, asked.seed, epoch, answer_epoch, answer)

    def _not_judged(
        self, miner: PeerRecord, asked: Challenge, epoch: int, answer_epoch: int, answer: torch.Tensor, why: str
    ) -> SpotCheck | None:
        """None while the validator cannot judge (``why``); a failure once that happened ``spot_check_tries`` times in
        a row."""
        tries, limit = self.unjudged[miner.hotkey] + 1, self.rules.tries
        if tries < limit:
            self.unjudged[miner.hotkey] = tries
            logger.warning(f"cannot judge {miner.hotkey[:10]} yet ({tries}/{limit}): {why}")
            return None
        self.unjudged.pop(miner.hotkey, None)
        result = SpotCheckResult("fail", f"not judged {tries} times in a row: {why}")
        return SpotCheck(miner.hotkey, result, asked.block_index, asked.seed, epoch, answer_epoch, answer)

    def close(self) -> None:
        """Stop the pool; exchanges in flight end by their deadlines."""
        self.pool.shutdown(wait=False, cancel_futures=True)
