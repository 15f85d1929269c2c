"""The validator's loop: sync and evaluate the shared model, check miners, score them, set weights.

Three schedules run in one loop, each on its own clock (not on incoming requests, as the original
HiveMiner did): ``sync_every_s`` loads the swarm's state and evaluates it on fixed validation
blocks; ``check_every_s`` reads new signed telemetry and sends each live miner a spot check;
``weights_every_s`` closes a scoring window, scores it and sets weights through the chain.
"""

from __future__ import annotations

import collections
import random
import threading
import time
from collections import Counter

import torch

from hivetrain.chain import make_chain
from hivetrain.data import validation_blocks
from hivetrain.dht import make_dht
from hivetrain.hivemind_compat.bans import drain_offence_records
from hivetrain.identity import RedisNonceStore, Verifier, load_or_create_wallet
from hivetrain.log import get_logger
from hivetrain.models import model_config, num_parameters
from hivetrain.protocol.discovery import fetch_initial_peers
from hivetrain.protocol.records import VALIDATOR_TTL_S, EvalRecord, Keys, MinerScore, PeerRecord, ScoreBoard, ValidatorStatus
from hivetrain.settings import ValidatorSettings
from hivetrain.store import Registry, append, connect_redis
from hivetrain.tokenizer import load_tokenizer
from hivetrain.validator.claims import ClaimReader
from hivetrain.validator.evaluate import evaluate
from hivetrain.validator.progress import ProgressPoller
from hivetrain.validator.scoring import normalize_weights, score_round
from hivetrain.validator.spot import SpotCheck, SpotChecker
from hivetrain.validator.sync import ModelSync
from hivetrain.validator.verdicts import ClaimCheckResult, SpotCheckResult, check_claimed_samples

logger = get_logger(__name__)

EVIDENCE_KEPT = 10  # rounds of evidence kept per miner on the score board
CHECKS_KEPT = 10  # recent spot checks a miner's pass rate is taken over


class Validator:
    """Build in ``setup``, loop in ``run`` until ``stop`` is set, always ``shutdown``."""

    def __init__(self, settings: ValidatorSettings, stop: threading.Event | None = None):
        self.settings = settings
        self.stop = stop or threading.Event()
        self.dht = self.sync = self.poller = None
        self.scores: dict[str, float] = {}
        self.evidence: dict[str, list[dict]] = {}
        self.spot_checks: dict[str, list[SpotCheck]] = {}
        self.check_history: dict[str, collections.deque] = {}
        self.rounds = 0
        self.window_started = time.time()

    # --- set-up ---------------------------------------------------------------------------
    def setup(self) -> None:
        s = self.settings
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        self.wallet = load_or_create_wallet(s.wallet_dir, s.wallet_name, s.wallet_hotkey)
        self.hotkey = self.wallet.hotkey.ss58_address
        self.client = connect_redis(s.redis_url)
        self.keys = Keys(s.run_id)
        self.registry = Registry(self.client, self.keys)
        self.chain = make_chain(s.chain, redis_client=self.client, run_id=s.run_id, **self._bittensor_args())
        self.uid = self.chain.register(self.hotkey, f"http://{s.api_host}:{s.api_port}", "validator")
        initial_peers = list(s.initial_peers) or fetch_initial_peers(s.bootstrap_url, s.bootstrap_wait_s, stop=self.stop)
        self.dht = make_dht(s, initial_peers=initial_peers, client_mode=True)
        self.poller = ProgressPoller(self.dht, s.run_id, max_samples_per_s=s.max_samples_per_s).start()
        self.sync = ModelSync(self.dht, s.run_id, s.preset, seed=s.seed, max_epoch=self.poller.plausible_epoch)
        self.parameters = num_parameters(self.sync.model)
        config = model_config(s.preset)
        self.block_size = s.block_size or config.n_positions
        tokenizer = load_tokenizer(s.tokenizer)
        self.eval_blocks = validation_blocks(tokenizer, self.block_size, s.eval_blocks)  # (N, T), fixed for the run
        # telemetry nonces are remembered per validator: two validators each read every record once
        nonces = RedisNonceStore(self.client, Keys(f"{s.run_id}.{self.hotkey}"), s.record_window_s + 5.0)
        self.claims = ClaimReader(self.client, self.keys, Verifier(nonces, s.record_window_s))
        self.claims.start()
        self.checker = SpotChecker(self.wallet, self.sync, s, tokenizer, self.block_size, self.eval_blocks)
        logger.info(f"validator {self.hotkey} (uid {self.uid}) joined the DHT as a client via {len(initial_peers)} initial peers")

    def _bittensor_args(self) -> dict:
        s = self.settings
        return {} if s.chain == "local" else {"netuid": s.netuid, "network": s.subtensor_network, "wallet": self.wallet}

    # --- loop -----------------------------------------------------------------------------
    def run(self) -> None:
        s = self.settings
        due = {"sync": 0.0, "check": time.monotonic() + s.check_every_s / 2, "weights": time.monotonic() + s.weights_every_s}
        while not self.stop.is_set():
            self._beat()
            now = time.monotonic()
            if now >= due["sync"]:
                self.sync_and_evaluate()
                due["sync"] = time.monotonic() + s.sync_every_s
            if now >= due["check"]:
                self.check_miners()
                due["check"] = time.monotonic() + s.check_every_s
            if now >= due["weights"]:
                self.score_and_set_weights()
                due["weights"] = time.monotonic() + s.weights_every_s
            self._record_offences()
            self.stop.wait(max(0.1, min(due.values()) - time.monotonic()))

    def _beat(self) -> None:
        try:
            status = ValidatorStatus(validator=self.hotkey, preset=self.settings.preset, parameters=self.parameters,
                                     epoch=self.sync.epoch, synced_at=self.sync.synced_at)
            self.client.set(self.keys.validator_alive(self.hotkey), status.to_json(), ex=VALIDATOR_TTL_S)
        except Exception:  # Redis boundary
            logger.warning("could not refresh the validator heartbeat", exc_info=True)

    def _record_offences(self) -> None:
        """Name, in signed telemetry, the peers whose state our model sync refused (and now skips)."""
        for record in drain_offence_records(self.dht.peer_id.to_base58()):
            try:
                append(self.client, self.keys, record, signer=self.wallet)
            except Exception:  # Redis boundary: the ban holds, the record is lost
                logger.warning("could not record an offence", exc_info=True)

    def sync_and_evaluate(self) -> None:
        """Load the swarm's state, then measure held-out loss on the fixed blocks and record it."""
        if not self.sync.sync():
            return
        started = time.perf_counter()
        loss, perplexity = evaluate(self.sync.model, self.eval_blocks, self.settings.eval_batch_size)
        record = EvalRecord(validator=self.hotkey, epoch=self.sync.epoch, loss=loss, perplexity=perplexity,
                            blocks=self.eval_blocks.shape[0], tokens=self.eval_blocks.numel(),
                            duration_s=time.perf_counter() - started)
        logger.info(f"eval at epoch {record.epoch}: loss {loss:.4f}, perplexity {perplexity:.1f}")
        try:
            append(self.client, self.keys, record)
        except Exception:  # Redis boundary
            logger.warning("could not record the evaluation", exc_info=True)

    def live_miners(self) -> dict[str, PeerRecord]:
        """Verified live registrations of miners, by hotkey; each gets a uid in the local chain."""
        miners = {p.hotkey: p for p in self.registry.live_peers(limit=1000, role="miner") if p.hotkey}
        if self.settings.chain == "local":
            for hotkey, peer in miners.items():
                self.chain.register(hotkey, peer.challenge_url, "miner")
        return miners

    def check_miners(self) -> None:
        """Read new telemetry, then one spot check per live miner (in random order)."""
        miners = self.live_miners()
        self.claims.poll(miners)
        if not miners:
            return
        self.sync.sync()  # challenge at the swarm's current parameters
        seed = random.getrandbits(62)
        answers: dict[str, torch.Tensor] = {}
        for hotkey in random.sample(sorted(miners), len(miners)):
            if self.stop.is_set():
                return
            peer = miners[hotkey]
            if not peer.challenge_url:
                continue
            check = self.checker.check(peer, seed, {k: v for k, v in answers.items() if k != hotkey})
            if check is None:
                continue
            if check.answer is not None and check.answer.numel() == self.settings.spot_check_dim:
                answers[hotkey] = check.answer
            self.spot_checks.setdefault(hotkey, []).append(check)
            logger.info(f"spot check {hotkey[:10]}: {check.result.verdict} ({check.explain()})")

    def score_and_set_weights(self) -> None:
        """Close the window: claims vs DHT progress, spot checks, EMA, weights through the chain."""
        s = self.settings
        miners = self.live_miners()
        self.claims.poll(miners)
        claims, (progress, progress_since_seen) = self.claims.close_window(), self.poller.close_window()
        self.window_started = time.time()
        verdicts = {hotkey: self._claim_verdict(c, progress.get(c.peer_id), progress_since_seen.get(c.peer_id))
                    for hotkey, c in claims.items()}
        # each miner's recent checks, not just this window's: an unlucky window without a check
        # neither erases a cheater's failures nor, for a miner never checked, verifies anything
        for hotkey, found in self.spot_checks.items():
            history = self.check_history.setdefault(hotkey, collections.deque(maxlen=CHECKS_KEPT))
            history.extend(SpotCheckResult(c.result.verdict, c.explain(), c.result.cosine) for c in found)
        self.spot_checks = {}
        results = {hotkey: list(history) for hotkey, history in self.check_history.items() if hotkey in miners or hotkey in claims}
        evidence = score_round(verdicts, results, {k: v for k, v in self.scores.items() if k in miners or k in claims}, s.score_ema_alpha)
        self.scores = {hotkey: e.new_ema for hotkey, e in evidence.items()}
        for hotkey, item in evidence.items():
            self.evidence[hotkey] = (self.evidence.get(hotkey, []) + [item.model_dump(mode="json")])[-EVIDENCE_KEPT:]
        weights = normalize_weights(self.scores)
        uids = {hotkey: self.chain.uid_for(hotkey) for hotkey in weights}
        try:
            self.chain.set_weights(self.hotkey, {uids[h]: w for h, w in weights.items() if uids[h] is not None})
        except Exception:  # chain boundary: keep scoring, try again next window
            logger.exception("setting weights failed")
        self.rounds += 1
        self._publish(weights, uids, miners)

    def _claim_verdict(self, claims, dht_window: int | None, dht_since_seen: int | None) -> ClaimCheckResult:
        """Judge what a miner claimed since we first saw it (polling lag stays a constant, not a per-window
        error); credit this window's claim, at most what its DHT records grew by (with the tolerance)."""
        s = self.settings
        elapsed = max(1e-3, time.time() - claims.seen_since)
        total = check_claimed_samples(claims.claimed_since_seen, dht_since_seen, elapsed, s.max_samples_per_s, s.claim_tolerance)
        window = (f"this window: claims {claims.claimed}, DHT shows {dht_window if dht_window is not None else 'nothing'}; "
                  f"since first seen {elapsed:.0f}s ago: ")
        if not total.passed:
            return ClaimCheckResult("fail", window + total.reason, claimed_samples=claims.claimed)
        credit = min(claims.claimed, int((dht_window or 0) * (1 + s.claim_tolerance)))
        return ClaimCheckResult("pass", window + total.reason, verified_samples=credit, claimed_samples=claims.claimed)

    def _publish(self, weights: dict[str, float], uids: dict[str, int | None], miners: dict[str, PeerRecord]) -> None:
        board = ScoreBoard(
            validator=self.hotkey, uid=self.uid, epoch=self.sync.epoch, rounds=self.rounds, weights_set_at=time.time(),
            miners=[MinerScore(hotkey=h, uid=uids.get(h), peer_id=miners[h].peer_id if h in miners else "",
                               score=self.scores[h], weight=weights.get(h, 0.0), evidence=self.evidence.get(h, []))
                    for h in sorted(self.scores)],
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
        if self.poller is not None:
            self.poller.stop()
        if self.sync is not None:
            self.sync.shutdown()
        if self.dht is not None:
            self.dht.shutdown()
        try:
            if getattr(self, "client", None) is not None:
                self.client.delete(self.keys.validator_alive(self.hotkey))
        except Exception:
            logger.warning("could not clear the validator heartbeat", exc_info=True)
        logger.info("validator stopped")
