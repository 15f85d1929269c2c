"""The validator's loop: sync and evaluate the shared model, check miners, score them, set weights.

Three schedules run in one loop, each on its own clock (not on incoming requests, as the original
HiveMiner did): ``sync_every_s`` loads the swarm's state and evaluates it on fixed validation
blocks; ``check_every_s`` reads new signed telemetry and sends each live miner a spot check;
``weights_every_s`` closes a scoring window, scores it and sets weights through the chain; weights that
come due while a check round's answers are being judged are set between two judgements.

Every step crosses a network boundary (Redis, the chain, the DHT, miners' HTTP). A step that
fails is logged (with the traceback the first time, then at 1, 2, 4, 8... failures in a row) and
tried again with backoff; the loop itself never ends on an outage. When weights are set, the
validator registers again if its registration is gone (a flushed Redis, on the local chain) and
saves its scores, EMA and spot-check history in Redis (``hivetrain.validator.state``), which
it resumes from when it starts.

A miner is paid for what the swarm received from it: the samples its claims check verified, bounded by what the
other members of its gradient rounds signed they received from it (``hivetrain.validator.receipts``); a miner
that sends no parts is paid nothing, whatever it claims.

What the validator catches itself is first-hand evidence: a peer whose state its model sync refused for what
the state held (``Offence.proven``; a server that was only slow is banned, not zeroed) costs its hotkey the
whole score, EMA included, for as long as the ban holds (``score_round``'s ``caught``), whichever of the
hotkey's peers served it. Progress records it leaves out are not: they are already not credited, and an
honest peer far ahead of a stalled swarm's median looks the same.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import random
import threading
import time
from collections import Counter
from typing import Callable

from hivetrain.admission import make_admission
from hivetrain.chain import make_chain
from hivetrain.data import validation_blocks
from hivetrain.dht import make_dht
from hivetrain.discovery import fetch_initial_peers
from hivetrain.hivemind_compat import OffenceLog
from hivetrain.identity import Verifier, load_or_create_wallet
from hivetrain.log import get_logger
from hivetrain.models import model_config, num_parameters
from hivetrain.protocol.records import (
    VALIDATOR_TTL_S,
    EvalRecord,
    Keys,
    MinerScore,
    PeerRecord,
    ScoreBoard,
    ValidatorStatus,
)
from hivetrain.runtime import set_torch_threads
from hivetrain.settings import ValidatorSettings, domain_of
from hivetrain.store import RedisNonceStore, Registry, append, connect_redis, shard_salt
from hivetrain.tokenizer import load_tokenizer
from hivetrain.validator.audits import Auditor
from hivetrain.validator.claims import ClaimReader
from hivetrain.validator.evaluate import evaluate
from hivetrain.validator.progress import ProgressPoller
from hivetrain.validator.receipts import CreditLedger, ReceiptReader, Received
from hivetrain.validator.scoring import normalize_weights, score_round
from hivetrain.validator.spot import CheckSchedule, MinerShards, SpotCheck, SpotChecker, SpotCheckRules
from hivetrain.validator.state import history_of, load_state, save_state, state_of
from hivetrain.validator.sync import ModelSync
from hivetrain.validator.verdicts import ClaimCheckResult, SpotCheckResult, judge_claims

logger = get_logger(__name__)

#: The offences (by role) for which the validator zeroes the offender's hotkey: those its own model sync proves.
ZEROED_ROLES = frozenset({"state"})
EVIDENCE_KEPT = 10  # rounds of evidence kept per miner on the score board
CHECKS_KEPT = 10  # recent spot checks a miner's pass rate is taken over
CARRY_WINDOWS = 3  # claimed-but-unreceived (and received-but-unclaimed) samples carried, in windows at the ceiling
RETRY_FIRST_S, RETRY_LONGEST_S = 1.0, 60.0  # a failed loop step is tried again after 1, 2, 4... up to 60 s


class Validator:
    """Built whole in ``__init__``, loops in ``run`` until ``stop`` is set, always ``shutdown``.

    Each part's cleanup is registered as the part is made, so a start that fails halfway (no
    bootstrap, a stop signal) undoes what it built, and ``shutdown`` undoes everything, last part first.
    """

    def __init__(self, settings: ValidatorSettings, stop: threading.Event | None = None):
        s = self.settings = settings
        self.stop = stop or threading.Event()
        self.scores: dict[str, float] = {}
        self.evidence: dict[str, list[dict]] = {}
        self.spot_checks: dict[str, list[SpotCheck]] = {}
        self.check_history: dict[str, collections.deque] = {}
        self.caught: dict[str, tuple[float, str]] = {}  # hotkey -> (its ban's end, time.time(); why)
        self.rounds = 0
        self.window_started = time.time()
        self.failures: Counter[str] = Counter()  # loop step -> failures in a row
        self.due: dict[str, float] = {}  # loop step -> when it runs next (time.monotonic()), set by ``run``
        self._cleanup = contextlib.ExitStack()
        try:
            set_torch_threads(s.torch_threads)  # 0: torch's default, within the container's CPU limit
            self.wallet = load_or_create_wallet(s.wallet_dir, s.wallet_name, s.wallet_hotkey)
            self.hotkey = self.wallet.hotkey.ss58_address
            self.keys, self.domain = (
                Keys(s.run_id),
                domain_of(s),
            )  # records of other runs and subnets fail their signatures
            self.client = connect_redis(s.redis_url)
            self._cleanup.callback(self._clear_heartbeat)
            self.registry = Registry(self.client, self.keys, self.domain)
            # read once (created if the bootstrap has not yet): the miners' shards we rebuild follow from it
            self.shard_salt = shard_salt(self.client, self.keys, create=True)
            logger.info(f"the run's shard salt: {self.shard_salt} ({self.keys.shard_salt})")
            self.chain = make_chain(s.chain, redis_client=self.client, run_id=s.run_id, **self._bittensor_args())
            self.endpoint = f"http://{s.api_host}:{s.api_port}"
            self.uid = self.chain.register(self.hotkey, self.endpoint, "validator")
            self.claims = self._make_claim_reader()
            # what the other members of each miner's rounds received from it: what its claims are paid against
            self.receipts = ReceiptReader(self.client, self.keys, self.domain).start()
            self.credit = CreditLedger(carry=CARRY_WINDOWS * s.max_samples_per_s * s.weights_every_s)
            initial_peers = list(s.initial_peers) or fetch_initial_peers(
                s.bootstrap_url, s.bootstrap_wait_s, stop=self.stop
            )
            self.dht = make_dht(initial_peers, **s.dht_options(), client_mode=True)
            self._cleanup.callback(self.dht.shutdown)
            self.offences = OffenceLog()  # what the poller and the model sync catch, drained by _record_offences
            self.admission = make_admission(s, self.chain)  # whose progress counts, whose state we download
            self._cleanup.callback(self.admission.close)
            self.poller = ProgressPoller(
                self.dht,
                s.run_id,
                max_samples_per_s=s.max_samples_per_s,
                offences=self.offences,
                admission=self.admission,
            ).start()
            self._cleanup.callback(self.poller.stop)
            self.sync = ModelSync(
                self.dht,
                s.run_id,
                s.preset,
                seed=s.seed,
                timeout_s=s.sync_timeout_s,
                max_epoch=self.poller.plausible_epoch,
                mode=s.mode,
                offences=self.offences,
                admission=self.admission,
                kept=s.audit_epochs,
            )
            self._cleanup.callback(self.sync.shutdown)
            self.parameters = num_parameters(self.sync.model)
            self.block_size = s.block_size or model_config(s.preset).n_positions
            tokenizer = load_tokenizer(s.tokenizer)
            self.eval_blocks = validation_blocks(tokenizer, self.block_size, s.eval_blocks)  # (N, T), fixed for the run
            self.checker = self._make_checker(tokenizer)
            per_round = s.audits_per_round if s.mode != "diloco" else 0  # pseudo-gradients are not recomputed
            self.auditor = Auditor(self.sync, self.checker.shards, s.spot_check_batch, per_round)
            self.schedule = CheckSchedule(per_round=settings.spot_check_workers)
            self._cleanup.callback(self.checker.close)
            self._resume()
        except BaseException:
            self._cleanup.close()
            raise
        logger.info(
            f"validator {self.hotkey} (uid {self.uid}) joined the DHT as a client via {len(initial_peers)} initial "
            "peers"
        )

    def _make_claim_reader(self) -> ClaimReader:
        """The reader of miners' signed telemetry, started."""
        s = self.settings
        # telemetry nonces are remembered per validator: two validators each read every record once
        nonces = RedisNonceStore(self.client, self.keys, s.record_window_s + 5.0, scope=f"validator-{self.hotkey}")
        claims = ClaimReader(
            self.client, self.keys, Verifier(nonces, self.domain, s.record_window_s), cap=s.claim_read_cap
        )
        claims.start()
        return claims

    def _make_checker(self, tokenizer) -> SpotChecker:
        """The spot checker, judging at our model copy, with each miner's shard rebuilt from the run's salt."""
        s = self.settings
        rules = SpotCheckRules(
            batch=s.spot_check_batch,
            dim=s.spot_check_dim,
            threshold=s.spot_check_threshold,
            timeout_s=s.spot_check_timeout_s,
            workers=s.spot_check_workers,
            tries=s.spot_check_tries,
            private_urls=s.spot_check_private_urls,
            window_s=s.record_window_s,
            diloco=s.mode == "diloco",
        )
        shards = MinerShards(
            s.dataset, s.dataset_split, s.text_key, tokenizer, self.block_size, s.num_shards, s.seed, self.shard_salt
        )
        return SpotChecker(
            self.wallet,
            self.domain,
            self.sync,
            rules,
            shards,
            self.eval_blocks,
            plausible_epoch=self.poller.plausible_epoch,
        )

    def _resume(self) -> None:
        """Take up the scores, EMA, spot-check history and carried credit our last run saved (nothing if there is
        none)."""
        state = load_state(self.client, self.keys, self.domain, self.hotkey)
        if state is None:
            return
        self.scores, self.rounds = dict(state.scores), state.rounds
        self.check_history = history_of(state, CHECKS_KEPT)
        self.checker.unjudged.update(state.unjudged)
        self.caught = {hotkey: (c.until, c.why) for hotkey, c in state.caught.items() if c.until > time.time()}
        self.credit.restore({hotkey: (c.owed, c.banked) for hotkey, c in state.credit.items()})
        logger.info(
            f"resumed the state saved at round {state.rounds}: {len(state.scores)} miners' scores and spot checks"
        )

    def _bittensor_args(self) -> dict:
        s = self.settings
        return {} if s.chain == "local" else {"netuid": s.netuid, "network": s.subtensor_network, "wallet": self.wallet}

    # --- loop -----------------------------------------------------------------------------
    def run(self) -> None:
        """The three schedules until ``stop`` is set; a failing step is tried again with backoff, the loop goes on."""
        s = self.settings
        steps = {
            "sync": (s.sync_every_s, self.sync_and_evaluate),
            "check": (s.check_every_s, self.check_miners),
            "weights": (s.weights_every_s, self.score_and_set_weights),
        }
        now = time.monotonic()
        due = self.due = {"sync": now, "check": now + s.check_every_s / 2, "weights": now + s.weights_every_s}
        while not self.stop.is_set():
            self._attempt("heartbeat", self._beat)
            for name, (every_s, step) in steps.items():
                if time.monotonic() >= due[name] and not self.stop.is_set():
                    self._step(name, every_s, step)
            self._attempt("offences", self._record_offences)
            self.stop.wait(max(0.1, min(due.values()) - time.monotonic()))

    def _step(self, name: str, every_s: float, step: Callable[[], None]) -> None:
        wait_s = every_s if self._attempt(name, step) else min(every_s, self._retry_in(name))
        self.due[name] = time.monotonic() + wait_s

    def _weights_if_due(self) -> None:
        """Close the scoring window now if its time came while a check round is being judged: weights keep their
        interval however long a round takes (what the round judged so far counts in the next window)."""
        if "weights" in self.due and time.monotonic() >= self.due["weights"] and not self.stop.is_set():
            self._step("weights", self.settings.weights_every_s, self.score_and_set_weights)

    def _attempt(self, name: str, step: Callable[[], None]) -> bool:
        """Run one loop step; True when it went through. A failure is counted and logged, never raised."""
        try:
            step()
        except Exception as error:  # every step's network boundary: Redis, the chain, the DHT, miners' HTTP
            self.failures[name] += 1
            count = self.failures[name]
            if count & (count - 1) == 0:  # 1, 2, 4, 8...: an outage is logged as it goes on, not once a second
                logger.warning(
                    f"{name} failed ({count} in a row, trying again): {type(error).__name__}: {error}",
                    exc_info=count == 1,
                )
            return False
        if self.failures.pop(name, 0):
            logger.info(f"{name} works again")
        return True

    def _retry_in(self, name: str) -> float:
        return min(RETRY_LONGEST_S, RETRY_FIRST_S * 2 ** max(0, self.failures[name] - 1))

    def _beat(self) -> None:
        status = ValidatorStatus(
            validator=self.hotkey,
            preset=self.settings.preset,
            parameters=self.parameters,
            epoch=self.sync.epoch,
            synced_at=self.sync.synced_at,
        )
        self.client.set(self.keys.validator_alive(self.hotkey), status.to_json(), ex=VALIDATOR_TTL_S)

    def _record_offences(self) -> None:
        """Name, in signed telemetry, the peers whose state our model sync refused (and now skips), and the
        progress records left out; a proven offence zeroes its hotkey while the ban holds."""
        caught_by = self.dht.peer_id.to_base58()
        for offence in self.offences.drain():
            if offence.proven and offence.role in ZEROED_ROLES:
                self._catch(offence.peer_id, f"{offence.role}: {offence.reason}")
            try:
                append(
                    self.client,
                    self.keys,
                    self.domain,
                    offence.record(caught_by, self.offences.ban_s),
                    signer=self.wallet,
                )
            except Exception:  # Redis boundary: the ban holds, the record is lost
                logger.warning("could not record an offence", exc_info=True)

    def _catch(self, peer_id: str, why: str) -> None:
        """Zero the hotkey ``peer_id`` is bound to (admission's, or a live registration's) until its ban ends."""
        hotkey = self.admission.hotkey_of(peer_id)
        if hotkey is None:
            try:
                registration = self.registry.live_peer(peer_id)
            except Exception:  # Redis boundary: the peer stays banned, its hotkey is not zeroed
                logger.warning(f"could not look up the hotkey of {peer_id}", exc_info=True)
                return
            hotkey = registration.hotkey if registration is not None and registration.hotkey else None
        if hotkey is None:
            logger.info(f"caught {peer_id}, bound to no hotkey: banned, nothing to zero")
            return
        logger.warning(f"hotkey {hotkey} scores 0 for {self.offences.ban_s:.0f}s: its peer {peer_id} {why}")
        self.caught[hotkey] = (time.time() + self.offences.ban_s, f"peer {peer_id}: {why}"[:500])

    def caught_now(self) -> dict[str, str]:
        """The hotkeys caught whose ban still holds, and why (expired ones are forgotten)."""
        now = time.time()
        self.caught = {hotkey: entry for hotkey, entry in self.caught.items() if entry[0] > now}
        return {hotkey: why for hotkey, (_, why) in self.caught.items()}

    def sync_and_evaluate(self) -> None:
        """Load the swarm's state, then measure held-out loss on the fixed blocks and record it."""
        if not self.sync.sync():
            return
        started = time.perf_counter()
        loss, perplexity = evaluate(self.sync.model, self.eval_blocks, self.settings.eval_batch_size)
        record = EvalRecord(
            validator=self.hotkey,
            epoch=self.sync.epoch,
            loss=loss,
            perplexity=perplexity,
            blocks=self.eval_blocks.shape[0],
            tokens=self.eval_blocks.numel(),
            duration_s=time.perf_counter() - started,
        )
        logger.info(f"eval at epoch {record.epoch}: loss {loss:.4f}, perplexity {perplexity:.1f}")
        try:
            append(self.client, self.keys, self.domain, record)
        except Exception:  # Redis boundary
            logger.warning("could not record the evaluation", exc_info=True)

    def live_miners(self) -> dict[str, PeerRecord]:
        """Verified live registrations of admitted miners, by hotkey; each gets a uid in the local chain. (A
        registration stored before its hotkey's admission was revoked is neither checked nor weighed.)"""
        registered = self.registry.live_peers(limit=1000, role="miner")
        miners = {p.hotkey: p for p in registered if p.hotkey and self.admission.admits(p.peer_id)}
        if self.settings.chain == "local":
            for hotkey, peer in miners.items():
                self.chain.register(hotkey, peer.challenge_url, "miner")
        return miners

    def check_miners(self) -> None:
        """Read new telemetry, then spot-check every live miner that serves challenges, all at once."""
        miners = self.live_miners()
        self.claims.poll(miners)
        self.receipts.poll(miners)
        self.schedule.forget(set(miners))
        # at most one wave of exchanges: a round costs one deadline however many miners registered
        asked = self.schedule.pick([peer for _, peer in sorted(miners.items()) if peer.challenge_url])
        if not asked:
            return
        self.sync.sync()  # challenge at the swarm's current parameters
        checks = self.checker.check_round(asked, random.getrandbits(62), self.stop, between=self._weights_if_due)
        self.schedule.record(asked, checks, self.checker.stalled)
        for hotkey, check in checks.items():
            self.spot_checks.setdefault(hotkey, []).append(check)
            logger.info(f"spot check {hotkey[:10]}: {check.result.verdict} ({check.explain()})")
        self.audit_rounds(set(miners))

    def audit_rounds(self, live: set[str]) -> None:
        """Audit a few settled gradient rounds at epochs whose parameters we hold (``hivetrain.validator.audits``);
        a sender most of whose reducers received something else than its declared blocks' gradient is zeroed as a
        proven offence is, for the ban's length."""
        self.auditor.offer(self.receipts.take_candidates())
        self.auditor.forget(live)
        for result in self.auditor.run(live, self.stop, between=self._weights_if_due):
            cosines = ", ".join(f"{c:.3f}" for c in result.cosines.values())
            logger.info(f"audit {result.hotkey[:10]}: {result.verdict} ({result.reason}; cosines {cosines})")
            if result.verdict == "fail":
                logger.warning(f"hotkey {result.hotkey} scores 0 for {self.offences.ban_s:.0f}s: {result.reason}")
                self.caught[result.hotkey] = (time.time() + self.offences.ban_s, result.reason[:500])

    def score_and_set_weights(self) -> None:
        """Close the window: claims vs DHT progress, spot checks, EMA, weights through the chain."""
        s = self.settings
        miners = self.live_miners()
        self.claims.poll(miners)
        self.receipts.poll(miners)
        claims, (progress, progress_since_seen) = self.claims.close_window(), self.poller.close_window()
        received = self.receipts.close_window()
        self.window_started = time.time()
        verdicts = {
            hotkey: self._paid(
                hotkey,
                self._claim_verdict(c, progress.get(c.peer_id), progress_since_seen.get(c.peer_id)),
                received.get(hotkey, Received()),
            )
            for hotkey, c in claims.items()
        }
        self.credit.forget(set(miners) | set(claims))
        # each miner's recent checks, not just this window's: an unlucky window without a check
        # neither erases a cheater's failures nor, for a miner never checked, verifies anything
        for hotkey, found in self.spot_checks.items():
            history = self.check_history.setdefault(hotkey, collections.deque(maxlen=CHECKS_KEPT))
            history.extend(SpotCheckResult(c.result.verdict, c.explain(), c.result.cosine) for c in found)
        self.spot_checks = {}
        results = {
            hotkey: list(history)
            for hotkey, history in self.check_history.items()
            if hotkey in miners or hotkey in claims
        }
        self._record_offences()  # what the sync caught up to now counts in this window
        evidence = score_round(
            verdicts,
            results,
            {k: v for k, v in self.scores.items() if k in miners or k in claims},
            s.score_ema_alpha,
            caught=self.caught_now(),
        )
        self.scores = {hotkey: e.new_ema for hotkey, e in evidence.items()}
        for hotkey, item in evidence.items():
            self.evidence[hotkey] = (self.evidence.get(hotkey, []) + [item.model_dump(mode="json")])[-EVIDENCE_KEPT:]
        # miners that left the scores leave everything else too: memory follows the live swarm
        self.evidence = {hotkey: e for hotkey, e in self.evidence.items() if hotkey in self.scores}
        self.check_history = {hotkey: h for hotkey, h in self.check_history.items() if hotkey in self.scores}
        weights = normalize_weights(self.scores)
        self.rounds += 1
        uids = self._set_weights(weights)
        self._publish(weights, uids, miners)
        self._save_state()

    def _set_weights(self, weights: dict[str, float]) -> dict[str, int | None]:
        """Set ``weights`` through the chain, registering again first if our registration is gone (a flushed
        Redis, on the local chain); the uids used. On failure the scores stay and the next window tries again."""
        try:
            if self.chain.uid_for(self.hotkey) is None:
                self.uid = self.chain.register(self.hotkey, self.endpoint, "validator")
                logger.warning(
                    f"our chain registration was gone (a flushed Redis?): registered again as uid {self.uid}"
                )
            uids = {hotkey: self.chain.uid_for(hotkey) for hotkey in weights}
            self.chain.set_weights(self.hotkey, {uids[h]: w for h, w in weights.items() if uids[h] is not None})
        except Exception:  # chain boundary (Redis, on the local chain)
            logger.warning(
                "setting weights failed; the scores are kept and the next window sets weights again", exc_info=True
            )
            return {}
        return uids

    def _save_state(self) -> None:
        state = state_of(
            self.hotkey,
            self.rounds,
            self.scores,
            self.check_history,
            self.checker.unjudged,
            self.caught,
            self.credit.saved(),
        )
        try:
            save_state(self.client, self.keys, self.domain, self.wallet, state)
        except Exception:  # Redis boundary: the next window saves again
            logger.warning("could not save the validator's state", exc_info=True)

    def _claim_verdict(self, claims, dht_window: int | None, dht_since_seen: int | None) -> ClaimCheckResult:
        """Pass or fail on what the miner claimed since we first saw it; credit min(this window's claim, DHT growth)."""
        s = self.settings
        elapsed = max(1e-3, time.time() - claims.seen_since)
        return judge_claims(
            claims.claimed,
            dht_window,
            claims.claimed_since_seen,
            dht_since_seen,
            elapsed,
            s.max_samples_per_s,
            s.claim_tolerance,
        )

    def _paid(self, hotkey: str, verdict: ClaimCheckResult, received: Received) -> ClaimCheckResult:
        """``verdict`` with its credit bounded by what the other members of the miner's rounds received from it
        (``hivetrain.validator.receipts``): a miner that sends no parts is paid nothing, whatever it claims."""
        paid = self.credit.pay(hotkey, verdict.verified_samples if verdict.passed else 0, received.samples)
        reason = (
            f"{verdict.reason}; the swarm received {received.samples:.0f} samples from it in {received.rounds} "
            f"rounds; paid {paid}"
        )
        return dataclasses.replace(verdict, reason=reason, verified_samples=paid)

    def _publish(self, weights: dict[str, float], uids: dict[str, int | None], miners: dict[str, PeerRecord]) -> None:
        board = ScoreBoard(
            validator=self.hotkey,
            uid=self.uid,
            epoch=self.sync.epoch,
            rounds=self.rounds,
            weights_set_at=time.time(),
            miners=[
                MinerScore(
                    hotkey=h,
                    uid=uids.get(h),
                    peer_id=miners[h].peer_id if h in miners else "",
                    score=self.scores[h],
                    weight=weights.get(h, 0.0),
                    evidence=self.evidence.get(h, []),
                )
                for h in sorted(self.scores)
            ],
            rejected=dict(Counter(self.claims.rejected)),
        )
        summary = ", ".join(f"{m.hotkey[:8]}={m.weight:.2f}" for m in board.miners)
        logger.info(f"weights set (round {self.rounds}, epoch {board.epoch}): {summary or 'no miners'}")
        try:
            self.client.set(self.keys.scores(self.hotkey), board.to_json())
        except Exception:  # Redis boundary
            logger.warning("could not publish the score board", exc_info=True)

    # --- shutdown -------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Undo everything ``__init__`` built, last part first; safe to call twice."""
        self._cleanup.close()
        logger.info("validator stopped")

    def _clear_heartbeat(self) -> None:
        try:
            self.client.delete(self.keys.validator_alive(self.hotkey))
        except Exception:  # Redis boundary: the heartbeat expires on its own
            logger.warning("could not clear the validator heartbeat", exc_info=True)
