"""The miner's training loop: a plain PyTorch loop around hivemind.Optimizer.

Order of start-up matters: the DHT and the optimizer's averagers are forked processes, so they
are created before anything touches CUDA's runtime in this process beyond moving the model.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from hivetrain.admission import make_admission
from hivetrain.chain import make_chain
from hivetrain.data import BlockStream, shard_for
from hivetrain.dht import make_dht, visible_maddrs
from hivetrain.discovery import fetch_initial_peers, wait_for_shard_salt
from hivetrain.hivemind_compat import DHT, RoundInfo, StateRoundLogHandler, TrackedOptimizer
from hivetrain.identity import load_or_create_wallet
from hivetrain.log import get_logger
from hivetrain.miner.challenge import ChallengeLimits, ChallengeServer
from hivetrain.miner.checkpoint import CheckpointError, resume_checkpoint, save_checkpoint
from hivetrain.miner.health import TrainingHealth
from hivetrain.miner.metrics import MinerMetrics
from hivetrain.miner.optim import make_optimizer
from hivetrain.miner.reporting import BootstrapRegistry, BootstrapSink, TelemetryWriter
from hivetrain.miner.validators import ValidatorList
from hivetrain.models import build_model, model_config, num_parameters
from hivetrain.protocol.binding import bind
from hivetrain.protocol.checkpoints import TrainerState
from hivetrain.protocol.projection import projected_gradient
from hivetrain.protocol.records import HEARTBEAT_INTERVAL_S, MAX_MULTIADDRS, Keys, PeerRecord, RoundRecord, StepRecord
from hivetrain.protocol.spotcheck import CHALLENGE_PASSES, Challenge
from hivetrain.runtime import set_torch_threads
from hivetrain.settings import MinerSettings, domain_of
from hivetrain.store import connect_redis
from hivetrain.tokenizer import load_tokenizer

logger = get_logger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; an explicit CUDA device without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"HIVE_DEVICE={name} but CUDA is not available here; use HIVE_DEVICE=auto or cpu")
    return device


def challenge_block_limit(stream: BlockStream, stream_blocks: int) -> int:
    """The block index a spot check must stay below: the shard's first ``CHALLENGE_PASSES`` passes when
    it is in memory (the bundled corpus: any index there costs the same), else ``stream_blocks``
    (a streamed shard is read from its start up to the index)."""
    per_pass = stream.blocks_per_pass if stream.materialize else None
    return CHALLENGE_PASSES * per_pass if per_pass else stream_blocks


class Heartbeat:
    """Registers the peer (through the bootstrap) every HEARTBEAT_INTERVAL_S from a thread; outages are logged, not
    fatal.

    ``addrs``: asked before each registration for the peer's addresses, when they change while it runs
    (a relayed miner's /p2p-circuit addresses appear once a relay has reserved a slot)."""

    def __init__(
        self,
        registry: BootstrapRegistry,
        record: PeerRecord,
        wallet,
        interval_s: float = HEARTBEAT_INTERVAL_S,
        addrs: Callable[[], list[str]] | None = None,
    ):
        self.registry, self.record, self.wallet, self.interval_s = registry, record, wallet, interval_s
        self.addrs = addrs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                if self.addrs is not None:
                    self._refresh_addrs()
                self.registry.register(self.record, self.wallet)
                failures = 0
            except Exception as error:  # network boundary: keep training, keep trying
                failures += 1
                if failures == 1 or failures % 10 == 0:
                    logger.warning("heartbeat to the bootstrap failed (%d in a row): %r", failures, error)
            self._stop.wait(self.interval_s if failures == 0 else min(self.interval_s, 2.0 * failures))

    def _refresh_addrs(self) -> None:
        addrs = self.addrs()[:MAX_MULTIADDRS]
        if addrs and addrs != self.record.multiaddrs:
            logger.info(f"now visible at {addrs}")
            self.record = self.record.model_copy(update={"multiaddrs": addrs})

    def stop(self, deregister: bool = True) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if deregister:
            try:
                self.registry.deregister(self.record.peer_id)
            except Exception:
                logger.warning("could not deregister through the bootstrap", exc_info=True)


class Miner:
    """One miner: build everything in ``setup``, train in ``train``, always ``shutdown``."""

    def __init__(self, settings: MinerSettings, stop: threading.Event | None = None):
        self.settings = settings
        self.stop = stop or threading.Event()
        self.dht: DHT | None = None
        self.opt: TrackedOptimizer | None = None
        self.heartbeat: Heartbeat | None = None
        self.telemetry: TelemetryWriter | None = None
        self.challenges: ChallengeServer | None = None
        self.validators: ValidatorList | None = None
        self._state_log_handler: StateRoundLogHandler | None = None
        self.metrics = MinerMetrics()
        self.step = self.samples = self.next_block = 0
        self.compute_s = 0.0  # seconds inside forward, backward and the (inner) optimizer step (this process)
        self.last_saved_epoch = -1
        self.checkpoint_epoch = -1  # epoch of the newest checkpoint on disk (telemetry shows it)

    # --- set-up ---------------------------------------------------------------------------
    def setup(self) -> None:
        s = self.settings
        set_torch_threads(s.torch_threads)  # 0: torch's default, within the container's CPU limit
        self.started_at = time.time()
        self.health = TrainingHealth(s.health_grace_s, s.health_stall_s)
        self.config = model_config(s.preset)
        self.block_size = s.block_size or self.config.n_positions
        if self.block_size > self.config.n_positions:
            raise ValueError(
                f"HIVE_BLOCK_SIZE={self.block_size} exceeds the {s.preset} preset's n_positions "
                f"({self.config.n_positions}); use 0 for the default"
            )
        self.checkpoint_dir = Path(s.checkpoint_dir)
        self.wallet = load_or_create_wallet(s.wallet_dir, s.wallet_name, s.wallet_hotkey)
        self._make_dht()
        self.device = resolve_device(s.device)
        self._make_model()
        self.redis = connect_redis(s.redis_url)  # the shard salt first, then registry and telemetry
        self._make_data()
        self._make_reporting()
        self._make_optimizer()
        self._resume_or_sync()

    def _make_dht(self) -> None:
        s = self.settings
        if not s.identity_path:
            # a restarted miner keeps its peer id: the identity lives next to its checkpoints
            s = self.settings = s.model_copy(update={"identity_path": str(self.checkpoint_dir / "identity.key")})
        initial_peers = list(s.initial_peers) or fetch_initial_peers(
            s.bootstrap_url, s.bootstrap_wait_s, stop=self.stop
        )
        self.dht = make_dht(
            initial_peers, **s.dht_options(), client_mode=s.client_mode, use_auto_relay=s.use_auto_relay
        )
        self.peer_id = self.dht.peer_id.to_base58()
        self.maddrs = visible_maddrs(self.dht)  # none in client mode: nobody can dial it
        logger.info(f"DHT up: peer {self.peer_id}, {len(initial_peers)} initial peers, visible at {self.maddrs}")

    def _make_model(self) -> None:
        self.model = build_model(self.settings.preset, seed=self.settings.seed)  # same init on every miner
        self.resume_from, self.resume_opt_state = None, None
        resumed = resume_checkpoint(self.checkpoint_dir, self.model, self.settings.preset)
        if resumed is not None:
            self.resume_from, self.resume_opt_state, state = resumed
            self.step, self.samples, self.next_block = state.step, state.samples, state.next_block
            self.checkpoint_epoch = state.epoch
            logger.info(f"resuming from {self.resume_from} (epoch {state.epoch}, step {state.step})")
        self.model.to(self.device)
        self.train_model = self.model
        if self.settings.compile and self.device.type == "cuda":
            self.train_model = torch.compile(self.model)
        logger.info(
            f"model {self.settings.preset}: {num_parameters(self.model) / 1e6:.1f}M parameters on {self.device}"
        )

    def _make_data(self) -> None:
        s = self.settings
        # our shard follows from our hotkey and the run's salt, not from the peer id that anyone can mint
        salt = wait_for_shard_salt(self.redis, Keys(s.run_id), s.bootstrap_wait_s, stop=self.stop)
        hotkey = self.wallet.hotkey.ss58_address
        self.shard = shard_for(hotkey, salt, s.num_shards)
        logger.info(f"data shard {self.shard} of {s.num_shards}: from hotkey {hotkey} and the run's shard salt {salt}")
        self.tokenizer = load_tokenizer(s.tokenizer)
        if len(self.tokenizer) > self.config.vocab_size:
            raise ValueError(
                f"tokenizer {s.tokenizer!r} has {len(self.tokenizer)} tokens, more than the model's "
                f"vocabulary ({self.config.vocab_size}); use a GPT-2 tokenizer"
            )
        self.stream = BlockStream(
            s.dataset,
            s.dataset_split,
            s.text_key,
            self.tokenizer,
            self.block_size,
            num_shards=s.num_shards,
            shard=self.shard,
            seed=s.seed,
        )
        self.batches = self.stream.batches(s.batch_size, start_index=self.next_block)
        logger.info(f"data: {self.stream!r}, starting at block {self.next_block}")
        # spot checks read their batches on a thread of their own: their own stream and tokenizer
        self.challenge_stream = BlockStream(
            s.dataset,
            s.dataset_split,
            s.text_key,
            load_tokenizer(s.tokenizer),
            self.block_size,
            num_shards=s.num_shards,
            shard=self.shard,
            seed=s.seed,
        )

    def _challenge_limits(self) -> ChallengeLimits:
        s = self.settings
        return ChallengeLimits(
            max_dim=s.challenge_max_dim,
            max_batch=s.challenge_max_batch,
            block_limit=challenge_block_limit(self.challenge_stream, s.challenge_stream_blocks),
            rate=s.challenge_rate,
            burst=s.challenge_burst,
            pending=s.challenge_pending,
        )

    def _make_reporting(self) -> None:
        s = self.settings
        domain = domain_of(s)  # what we sign is valid in this run and subnet only
        client = self.redis  # read only: the chain's validators; every write goes through the bootstrap
        self.telemetry = TelemetryWriter(BootstrapSink(s.bootstrap_url), domain, self.wallet)
        self.metrics.watch_telemetry(self.telemetry)
        self.metrics.describe(self.peer_id, self.wallet.hotkey.ss58_address, s.preset, str(self.device))
        bittensor = {} if s.chain == "local" else {"netuid": s.netuid, "network": s.subtensor_network}
        chain = make_chain(s.chain, redis_client=client, run_id=s.run_id, **bittensor)
        self.validators = ValidatorList(chain, s.validator_min_stake, s.validators_refresh_s).start()
        self.challenges = ChallengeServer(
            self.wallet,
            s.challenge_host,
            s.challenge_port,
            self.validators,
            self._challenge_limits(),
            domain=domain,
            window_s=s.record_window_s,
            prepare=self._challenge_batch,
            health=self.health,
            metrics=self.metrics,
        ).start()
        host = "127.0.0.1" if s.challenge_host in ("0.0.0.0", "::", "") else s.challenge_host
        challenge_url = s.challenge_url or f"http://{host}:{self.challenges.port}"
        hotkey = self.wallet.hotkey.ss58_address
        peer_key, peer_signature = bind(
            s.identity_path, domain, self.peer_id, hotkey
        )  # our DHT key vouches for the hotkey
        record = PeerRecord(
            peer_id=self.peer_id,
            role="miner",
            hotkey=hotkey,
            challenge_url=challenge_url,
            multiaddrs=self.maddrs,
            device=str(self.device),
            preset=s.preset,
            started_at=self.started_at,
            peer_key=peer_key,
            peer_signature=peer_signature,
        )
        relayed = s.use_auto_relay and not s.client_mode  # its reachable addresses come later, through relays
        self.heartbeat = Heartbeat(
            BootstrapRegistry(s.bootstrap_url, domain),
            record,
            self.wallet,
            addrs=(lambda: visible_maddrs(self.dht, latest=True)) if relayed else None,
        ).start()
        logger.info(f"hotkey {self.wallet.hotkey.ss58_address}, spot checks at {challenge_url}")

    def _make_optimizer(self) -> None:
        self.opt = make_optimizer(
            self.model,
            self.dht,
            self.settings,
            on_round=self._record_round,
            on_state_loaded=self.metrics.record_state_load,
            admission=make_admission(self.settings),
        )
        if self.settings.use_local_updates:
            self._state_log_handler = StateRoundLogHandler(lambda: self.opt.local_epoch, self._record_round).attach()

    def _resume_or_sync(self) -> None:
        """Own checkpoint first; then, if the swarm is ahead, its state from peers before the first step."""
        if self.resume_opt_state is not None:
            self.opt.load_state_dict(self.resume_opt_state)
            self.resume_opt_state = None
        tracker = self.opt.tracker
        tracker.fetched_global_progress_this_epoch.wait(timeout=min(30.0, self.settings.load_state_timeout))
        if tracker.global_epoch > self.opt.local_epoch:
            logger.info(
                f"swarm is at epoch {tracker.global_epoch}, we are at {self.opt.local_epoch}: loading state from peers"
            )
            started = time.perf_counter()
            self.opt.load_state_from_peers()
            logger.info(
                f"loaded state from peers in {time.perf_counter() - started:.1f}s: now at epoch {self.opt.local_epoch}"
            )
        self.last_saved_epoch = self.opt.local_epoch

    # --- training -------------------------------------------------------------------------
    def train(self) -> None:
        s = self.settings
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.device.type == "cuda" and s.bf16
            else contextlib.nullcontext()
        )
        speed = None  # EMA of samples/s
        self.model.train()
        began = time.perf_counter()  # utilization: compute time over the wall time since
        while not self.stop.is_set():
            first_block, batch = next(self.batches)
            batch = batch.to(self.device, non_blocking=True)  # (B, T)
            self.opt.declare_blocks(self.opt.local_epoch, first_block)  # the epoch's first step: its blocks start here
            started, waited = time.perf_counter(), self.opt.swarm_wait_s
            with autocast:
                loss = self.train_model(input_ids=batch, labels=batch).loss
            loss.backward()
            self.opt.step()
            self.opt.zero_grad()
            loss_value = loss.item()
            elapsed = time.perf_counter() - started
            # forward, backward and the (inner) optimizer step: the step's time less what it spent on the swarm
            self.compute_s += max(0.0, elapsed - (self.opt.swarm_wait_s - waited))
            self.step += 1
            self.samples += batch.shape[0]
            self.next_block = first_block + batch.shape[0]
            rate = batch.shape[0] / max(elapsed, 1e-9)
            speed = rate if speed is None else 0.9 * speed + 0.1 * rate
            if not math.isfinite(loss_value):
                logger.warning(f"step {self.step}: loss is {loss_value}")
            self.telemetry.put(
                StepRecord(
                    peer_id=self.peer_id,
                    step=self.step,
                    local_epoch=self.opt.local_epoch,
                    global_epoch=self.opt.tracker.global_epoch,
                    loss=loss_value if math.isfinite(loss_value) else 1e9,
                    samples=self.samples,
                    samples_per_s=speed,
                    tokens_per_s=speed * self.block_size,
                    checkpoint_epoch=self.checkpoint_epoch,
                    compute_s=self.compute_s,
                )
            )
            if self.step % 50 == 0 or self.step == 1:
                logger.info(
                    f"step {self.step} epoch {self.opt.local_epoch} loss {loss_value:.4f} "
                    f"{speed * self.block_size:,.0f} tokens/s"
                )
            self.metrics.record_step(
                batch.shape[0],
                batch.numel(),
                speed * self.block_size,
                loss_value,
                self.opt.local_epoch,
                self.opt.tracker.global_epoch,
            )
            self.metrics.record_compute(self.compute_s, time.perf_counter() - began)
            self.health.step_done()
            self._report_offences()
            self.challenges.answer_pending(self._answer_challenge)
            self._maybe_checkpoint()
            if (s.max_steps and self.step >= s.max_steps) or (s.max_epochs and self.opt.local_epoch >= s.max_epochs):
                logger.info(f"reached the configured limit at step {self.step}, epoch {self.opt.local_epoch}")
                break

    def _challenge_batch(self, challenge: Challenge) -> torch.Tensor:
        """The blocks a spot check names, (B, T) of our own shard (read on the endpoint's data thread)."""
        return self.challenge_stream.get_batch(challenge.block_index, challenge.batch_size)

    def _answer_challenge(self, challenge: Challenge, batch: torch.Tensor) -> tuple[int, list[float]]:
        """A validator's spot check, computed between two steps at the parameters we train with (DiLoCo: the global
        ones)."""
        dtype = torch.bfloat16 if self.device.type == "cuda" and self.settings.bf16 else None
        with self.opt.at_global_parameters(self.model):  # DiLoCo: the validator holds those, not our inner ones
            projection = projected_gradient(self.model, batch, challenge.seed, challenge.dim, autocast_dtype=dtype)
        return self.opt.local_epoch, projection.tolist()

    def _maybe_checkpoint(self) -> None:
        every = self.settings.save_every
        epoch = self.opt.local_epoch
        if every and epoch != self.last_saved_epoch and epoch % every == 0 and epoch > 0:
            try:
                self.save()
                self.metrics.checkpoints.labels(outcome="saved").inc()
            except CheckpointError as error:  # a full disk must not stop training; the next save tries again
                self.metrics.checkpoints.labels(outcome="failed").inc()
                logger.error(f"checkpoint at epoch {epoch} failed, training on: {error}")

    def save(self) -> Path:
        self.last_saved_epoch = self.opt.local_epoch
        state = TrainerState(
            peer_id=self.peer_id,
            preset=self.settings.preset,
            epoch=self.opt.local_epoch,
            step=self.step,
            samples=self.samples,
            next_block=self.next_block,
        )
        path = save_checkpoint(self.checkpoint_dir, self.model, self.opt, state, keep=self.settings.keep_checkpoints)
        self.checkpoint_epoch = state.epoch
        return path

    def _report_offences(self) -> None:
        """Peers our averagers caught, and whose parts our gradient averager received (they run in forked
        children and only queue what they saw)."""
        records = self.opt.offences.drain_records(self.peer_id)
        self.metrics.offences.inc(len(records))
        self.telemetry.put_many(records)
        if self.opt.receipts is not None:
            self.telemetry.put_many(self.opt.receipts.drain_records(self.peer_id))

    def _record_round(self, info: RoundInfo) -> None:
        self.metrics.record_round(info)
        if info.success:
            logger.info(
                f"averaging round for epoch {info.epoch} ({info.kind}): {info.group_size} peers, {info.duration_s:.2f}s"
            )
        else:
            logger.info(f"averaging round for epoch {info.epoch} ({info.kind}) failed or ran alone")
        if self.telemetry is not None:
            self.telemetry.put(
                RoundRecord(
                    peer_id=self.peer_id,
                    epoch=info.epoch,
                    kind=info.kind,
                    group_size=info.group_size,
                    group=list(info.group),
                    duration_s=info.duration_s,
                    success=info.success,
                    time=info.time,
                )
            )

    # --- shutdown -------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Checkpoint, deregister, stop hivemind; each part runs even if an earlier one failed."""
        if self.opt is not None and self.step > 0:
            try:
                self.save()
            except Exception:
                logger.exception("final checkpoint failed")
        if self.heartbeat is not None:
            self.heartbeat.stop(deregister=True)
        if self.challenges is not None:
            self.challenges.stop()
        if self.validators is not None:
            self.validators.stop()
        if self._state_log_handler is not None:
            self._state_log_handler.detach()
        if self.opt is not None:
            self.opt.shutdown()
            self.opt.admission.close()
        if self.telemetry is not None:
            self.telemetry.close(timeout=5)
        if self.dht is not None:
            self.dht.shutdown()
        logger.info(f"miner {getattr(self, 'peer_id', '?')} stopped after {self.step} steps (pid {os.getpid()})")
