"""One typed settings model per service.

Each field is read from an environment variable ``HIVE_<FIELD>`` (what containers set) and
from a command-line flag ``--<field-with-dashes>`` (what people type); a flag wins over the
environment. A list setting takes JSON (``["a", "b"]``) or comma-separated values (``a,b``) in
both. Values are validated on load: a bad value or an unknown flag raises ``ConfigError`` with a
message that names both spellings and says what is accepted (the services exit 2 with it), and
a ``HIVE_*`` variable that nothing reads is named in a warning, with the closest setting.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import to_jsonable_python
from pydantic_settings import (
    BaseSettings,
    CliApp,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from hivetrain import __version__
from hivetrain.log import get_logger
from hivetrain.protocol.spotcheck import MAX_BATCH, MAX_DIM, SPOT_CHECK_THRESHOLD

if TYPE_CHECKING:
    from hivetrain.identity import Domain

logger = get_logger(__name__)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_BOOTSTRAP_URL = "http://127.0.0.1:8000"
Compression = Literal["none", "fp16", "8bit", "8bit-shared"]
StateCompression = Literal["none", "fp16", "8bit"]  # 8bit-shared averages gradients only


class ConfigError(ValueError):
    """Settings that cannot be used; the message names each variable and flag, and what is accepted."""


class _EnvSource(EnvSettingsSource):
    """``HIVE_*`` variables; a list setting also reads comma-separated values (``a,b``) besides JSON (``["a","b"]``)."""

    def prepare_field_value(self, field_name, field, value, value_is_complex):
        if isinstance(value, str) and field.annotation == list[str] and not value.lstrip().startswith("["):
            return [item.strip() for item in value.split(",") if item.strip()]
        return super().prepare_field_value(field_name, field, value, value_is_complex)


#: How every settings model here reads: ``HIVE_*`` variables and kebab-case flags, nothing unknown, defaults validated.
SETTINGS_CONFIG = SettingsConfigDict(
    env_prefix="HIVE_",
    cli_kebab_case=True,
    cli_implicit_flags=True,
    extra="forbid",
    validate_default=True,
)


class ServiceSettings(BaseSettings):
    """Settings every service shares."""

    model_config = SettingsConfigDict(**SETTINGS_CONFIG)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _EnvSource(settings_cls), dotenv_settings, file_secret_settings

    run_id: str = Field(
        "hivetrain",
        description="swarm name: DHT prefix, Redis namespace and signature domain; peers only meet (and trust records "
        "of) peers of the same run",
    )
    redis_url: str = Field(
        DEFAULT_REDIS_URL, description="Redis for the peer registry and telemetry (redis://[:password@]host:port/db)"
    )
    redis_url_file: str = Field(
        "",
        description="file holding the Redis URL with its user and password, read at start in place of redis_url "
        "(Docker volumes, Kubernetes secrets); empty = use redis_url",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="log level of hivetrain loggers"
    )
    # every service signs or verifies records of its run only: the run id and, on bittensor, the netuid are in every
    # signature
    chain: Literal["local", "bittensor"] = Field(
        "local",
        description="where validators are listed and weights go: local (Redis metagraph) or bittensor; every service "
        "of a run must agree (signatures name the chain)",
    )
    netuid: int = Field(
        0,
        ge=0,
        description="subnet uid (bittensor chain); part of every signature there, so records of one subnet are "
        "refused in another",
    )
    admission: Literal["", "chain", "open"] = Field(
        "",
        description="who takes part in training (all-reduce groups, parts, state downloads, progress records): "
        "'chain' = peers bound to a hotkey the chain admits (a uid on a Bittensor subnet; on the local chain, a "
        "hotkey admitted with python -m hivetrain.admission admit, or a validator); 'open' = any libp2p key, one "
        "operator with many keys counts as many peers (a throwaway local swarm); empty = chain on bittensor, open "
        "on the local chain",
    )

    @field_validator("run_id")
    @classmethod
    def _run_id_is_a_word(cls, value: str) -> str:
        if not value or not all(c.isalnum() or c in "-_." for c in value):
            raise ValueError("use letters, digits, '-', '_' or '.' only, e.g. HIVE_RUN_ID=my-swarm")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://, e.g. redis://127.0.0.1:6379/0")
        return value

    @model_validator(mode="after")
    def _redis_url_from_file(self):
        if self.redis_url_file:
            try:
                url = Path(self.redis_url_file).read_text().strip()
            except OSError as error:
                raise ValueError(
                    f"redis_url_file: cannot read {self.redis_url_file} ({error.strerror}); "
                    "is the volume or secret that holds it mounted?"
                ) from None
            self.redis_url = type(self)._redis_url_scheme(url)
        return self


class DHTSettings(ServiceSettings):
    """Settings of a service that runs a hivemind DHT peer."""

    host_maddrs: list[str] = Field(
        default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"],
        description="multiaddrs to listen on: a JSON list ('[\"/ip4/0.0.0.0/tcp/31337\"]') or comma-separated",
    )
    announce_maddrs: list[str] = Field(
        default_factory=list,
        description="multiaddrs other peers should dial (containers: the service's DNS name or pod IP); empty = what "
        "p2pd sees",
    )
    identity_path: str = Field(
        "",
        description="file with the libp2p private key, so the peer id survives restarts; empty = a new id each start",
    )
    use_relay: bool = Field(
        True,
        description="relay connections between peers that cannot dial each other (libp2p circuit relay); keep it on "
        "where miners may sit behind NAT",
    )

    def dht_options(self) -> dict:
        """The keyword arguments ``hivetrain.dht.make_dht`` takes from these settings."""
        return dict(
            host_maddrs=list(self.host_maddrs),
            announce_maddrs=list(self.announce_maddrs),
            identity_path=self.identity_path,
            use_relay=self.use_relay,
        )

    @field_validator("host_maddrs", "announce_maddrs")
    @classmethod
    def _are_multiaddrs(cls, value: list[str]) -> list[str]:
        for addr in value:
            if not addr.startswith("/"):
                raise ValueError(
                    f"{addr!r} is not a multiaddr; write e.g. /ip4/0.0.0.0/tcp/31337 or /dns4/miner-0/tcp/31337"
                )
        return value


class BootstrapSettings(DHTSettings):
    """``python -m hivetrain.bootstrap``: the long-lived DHT peer plus the /initial_peers HTTP API."""

    model_config = SettingsConfigDict(cli_prog_name="python -m hivetrain.bootstrap")

    http_host: str = Field("0.0.0.0", description="address gunicorn binds")
    http_port: int = Field(8000, ge=1, le=65535, description="port of the HTTP API")
    http_workers: int = Field(2, ge=1, le=64, description="gunicorn worker processes")
    max_initial_peers: int = Field(32, ge=1, le=1000, description="cap on the addresses /initial_peers returns")
    identity_path: str = Field(
        "bootstrap.id", description="file with the DHT private key, so the bootstrap's peer id survives restarts"
    )
    ingest_per_minute: int = Field(
        6000,
        ge=1,
        le=10_000_000,
        description="telemetry entries one hotkey may post a minute (a CPU miner sends about 60)",
    )


class IdentitySettings(ServiceSettings):
    """The sr25519 hotkey a service signs with (a bittensor wallet, created on first start)."""

    wallet_dir: str = Field("wallets", description="folder of bittensor wallets; created unencrypted on first start")
    wallet_name: str = Field("default", description="wallet (coldkey) name")
    wallet_hotkey: str = Field("default", description="hotkey name inside the wallet")
    record_window_s: float = Field(120.0, gt=0, description="signed records older than this are stale and dropped")


class PeerSettings(DHTSettings, IdentitySettings):
    """What every swarm member (miner, validator) must agree on: where the swarm is, the model and the data."""

    # where the swarm is
    bootstrap_url: str = Field(DEFAULT_BOOTSTRAP_URL, description="bootstrap HTTP API that hands out initial peers")
    initial_peers: list[str] = Field(
        default_factory=list, description="multiaddrs to dial instead of asking the bootstrap"
    )
    bootstrap_wait_s: float = Field(
        120.0,
        gt=0,
        description="give up with an error when the bootstrap has not answered (or, for a miner, not published the "
        "run's shard salt in Redis) after this long",
    )
    mode: Literal["hivemind", "diloco"] = Field(
        "hivemind",
        description="how miners train together, the same on every miner and validator: hivemind = hivemind.Optimizer "
        "(gradient averaging, or local updates with HIVE_USE_LOCAL_UPDATES); diloco = HIVE_INNER_STEPS local AdamW "
        'steps, then an outer Nesterov step on the swarm\'s averaged pseudo-gradients (README: "Training modes")',
    )
    # model and data
    preset: Literal["seed", "tiny"] = Field(
        "seed", description="model preset: seed = the original 32.3M GPT-2, tiny = CPU tests"
    )
    seed: int = Field(0, ge=0, description="init seed; every miner of a run must use the same one")
    dataset: str = Field(
        "bundled:sotu", description="bundled:sotu, a local json/jsonl/txt/parquet path, or an HF dataset name"
    )
    dataset_split: str = Field("train", description="dataset split to train on")
    text_key: str = Field("text", description="field holding the text (falcon-refinedweb: content)")
    tokenizer: str = Field("bundled", description="bundled GPT-2 BPE, or an HF name such as openai-community/gpt2")
    num_shards: int = Field(
        64,
        ge=1,
        description="documents are split into this many shards; each miner reads the one its hotkey and the run's "
        "shard salt (chosen by the bootstrap) pick",
    )
    block_size: int = Field(0, ge=0, description="tokens per sample; 0 = the preset's n_positions")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N")
    torch_threads: int = Field(0, ge=0, description="CPU threads for torch; 0 = torch's default")
    # the chain (HIVE_CHAIN, HIVE_NETUID: shared settings): who the validators are (miners answer only them), where
    # weights go
    subtensor_network: str = Field("finney", description="bittensor network name or ws:// endpoint (bittensor chain)")

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda") and not (value.startswith("cuda:") and value[5:].isdigit()):
            raise ValueError("use auto, cpu, cuda or cuda:N")
        return value

    @field_validator("bootstrap_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL, e.g. http://127.0.0.1:8000")
        return value.rstrip("/")


#: Outer steps between DiLoCo's parameter-averaging rounds when HIVE_AVERAGE_STATE_EVERY is unset.
DILOCO_AVERAGE_STATE_EVERY = 5


class MinerSettings(PeerSettings):
    """``python -m hivetrain.miner``: trains the shared GPT-2 with hivemind.Optimizer."""

    model_config = SettingsConfigDict(cli_prog_name="python -m hivetrain.miner")

    wallet_name: str = Field("miner", description="wallet (coldkey) name")
    batch_size: int = Field(8, ge=1, description="samples per local step")
    # challenges from validators
    challenge_host: str = Field("0.0.0.0", description="address the spot-check endpoint binds")
    challenge_port: int = Field(0, ge=0, le=65535, description="port of the spot-check endpoint; 0 = a free port")
    challenge_url: str = Field(
        "",
        description="URL validators use to reach the spot-check endpoint; empty = http://<challenge_host or "
        "127.0.0.1>:<port>",
    )
    challenge_rate: float = Field(
        0.5, gt=0, description="spot checks per second one validator hotkey may ask (token bucket)"
    )
    challenge_burst: int = Field(4, ge=1, description="spot checks one validator hotkey may ask at once")
    challenge_pending: int = Field(
        2,
        ge=1,
        le=32,
        description="spot checks of one validator that may wait for the training loop; more get 503, so one validator "
        "cannot take another's place",
    )
    challenge_max_dim: int = Field(
        128,
        ge=8,
        le=MAX_DIM,
        multiple_of=8,
        description="largest projection a spot check may ask for (a validator's HIVE_SPOT_CHECK_DIM must fit); larger "
        "gets 400",
    )
    challenge_max_batch: int = Field(
        4,
        ge=1,
        le=MAX_BATCH,
        description="most blocks in a spot check's batch (a validator's HIVE_SPOT_CHECK_BATCH must fit; each costs a "
        "forward and backward pass); more gets 400",
    )
    challenge_stream_blocks: int = Field(
        64,
        ge=1,
        description="on a streamed dataset, a spot check's block_index must be below this (reading up to it streams "
        "the shard); the bundled corpus allows its shard's first 4 passes",
    )
    validators_refresh_s: float = Field(
        30.0,
        gt=0,
        description="reread the chain's validators (the only hotkeys whose spot checks are answered) this often; a "
        "failed read keeps the last list",
    )
    validator_min_stake: float = Field(
        0.0, ge=0, description="stake a listed validator needs for its spot checks to be answered"
    )
    health_grace_s: float = Field(
        900.0,
        gt=0,
        description="/healthz is healthy this long after start before the first step (joining, loading state from "
        "peers)",
    )
    health_stall_s: float = Field(
        120.0,
        gt=0,
        description="/healthz answers 503 after this long without a training step, or 10x the usual time between "
        "steps if longer",
    )
    # optimisation
    target_batch_size: int = Field(4096, ge=1, description="samples the whole swarm accumulates per global epoch")
    lr: float = Field(6e-4, gt=0, description="peak learning rate of AdamW")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (not on biases and LayerNorm)")
    warmup_epochs: int = Field(10, ge=0, description="global epochs of linear warmup")
    grad_clip: float = Field(
        1.0,
        ge=0,
        description="clip the gradient each optimizer step applies (the swarm average in gradient mode) to this norm; "
        "0 = off",
    )
    # hivemind
    matchmaking_time: float = Field(5.0, gt=0, description="seconds to gather a group before an averaging round")
    averaging_timeout: float = Field(60.0, gt=0, description="give up on an averaging round after this many seconds")
    load_state_timeout: float = Field(300.0, gt=0, description="give up loading state from peers after this long")
    delay_grad_averaging: bool = Field(
        False, description="average gradients in the background while the next batch computes"
    )
    delay_optimizer_step: bool = Field(False, description="run the optimizer step in the background")
    delay_state_averaging: bool = Field(True, description="average parameters in the background")
    offload_optimizer: bool = Field(False, description="keep optimizer state on the host, off the GPU")
    reuse_grad_buffers: bool = Field(
        True,
        description="accumulate gradients in the model's own .grad between epochs instead of copying each step's into "
        "hivemind's accumulators (less memory, one copy fewer per step); gradient averaging only",
    )
    average_state_every: int = Field(
        1,
        ge=1,
        description="average parameters every this many epochs; diloco: every this many outer steps, right after the "
        "step (it brings back a peer whose round failed), 5 when unset",
    )
    grad_compression: Compression = Field(
        "none",
        description="wire format of gradients in all-reduce (of pseudo-gradients in diloco mode); 8bit-shared: 8-bit, "
        "and every peer of a round applies the same rounding of the average (needs robust aggregation; diloco's "
        "default when it is on)",
    )
    state_compression: StateCompression = Field(
        "none",
        description="wire format of parameters in state averaging and downloads (optimizer statistics always go exact)",
    )
    use_local_updates: bool = Field(
        False, description="step locally every batch and average parameters instead of gradients"
    )
    # DiLoCo (HIVE_MODE=diloco)
    inner_steps: int = Field(
        50,
        ge=1,
        description="diloco: local AdamW steps per miner between outer steps (the swarm's epoch ends when it has "
        "trained this many batches per peer)",
    )
    outer_lr: float = Field(
        0.7, gt=0, description="diloco: learning rate of the outer Nesterov SGD on the averaged pseudo-gradient"
    )
    outer_momentum: float = Field(
        0.9, ge=0, lt=1, description="diloco: momentum of the outer SGD (Nesterov; 0 = plain averaging steps)"
    )
    # reachability (README: "Miners behind NAT")
    client_mode: bool = Field(
        False,
        description="dial out only (behind NAT or a firewall that refuses incoming connections): the miner joins the "
        "DHT and averaging rounds through other peers and sends its parts, but reduces none and serves no state "
        "downloads",
    )
    use_auto_relay: bool = Field(
        False,
        description="behind NAT without client mode: reserve a slot on reachable peers (relays; within 3 minutes) and "
        "advertise and register /p2p-circuit addresses through their public addresses, so others dial this miner "
        "through them; needs HIVE_USE_RELAY",
    )
    bandwidth: float = Field(
        0.0,
        ge=0,
        description="this miner's upload bandwidth (any unit, the same on every miner): all-reduce gives each peer a "
        "part in proportion, so a slow link gets less to reduce; 0 = equal parts",
    )
    straggler_share: float = Field(
        0.25,
        ge=0,
        description="step out of averaging rounds after a round that took at least this share of the time between "
        "epochs (and 5 s) with this miner's own uplink busy for 3/4 of it: for 10x the uplink's time (at least 60 s, "
        "doubling while still slow), taking up the swarm's state each epoch instead; loopback traffic is not counted; "
        "0 = never",
    )
    # robust averaging (hivetrain/aggregation.py)
    robust_aggregation: bool = Field(
        True,
        description="aggregate each all-reduce partition robustly (non-finite parts dropped, declared weights capped, "
        "CenteredClip) and refuse bad answers from reducers; off = hivemind's weighted mean",
    )
    clip_factor: float = Field(
        1.0,
        gt=0,
        description="CenteredClip radius as a multiple of the parts' median distance from their median; larger = "
        "closer to the mean, more influence per attacker",
    )
    ban_s: float = Field(
        600.0,
        ge=0,
        description="seconds a peer caught sending or returning bad tensors, or serving "
        "a bad state, is left out of this miner's averaging and state downloads",
    )
    # hardware
    compile: bool = Field(False, description="torch.compile the model (CUDA)")
    bf16: bool = Field(True, description="bf16 autocast on CUDA")
    # checkpoints and lifetime
    checkpoint_dir: str = Field("checkpoints", description="where this miner writes checkpoints (and resumes from)")
    save_every: int = Field(10, ge=0, description="checkpoint every this many global epochs; 0 = only at shutdown")
    keep_checkpoints: int = Field(2, ge=1, description="how many checkpoints to keep")
    max_steps: int = Field(0, ge=0, description="stop after this many local steps; 0 = run until stopped")
    max_epochs: int = Field(0, ge=0, description="stop after this global epoch; 0 = run until stopped")

    @model_validator(mode="after")
    def _diloco_defaults(self) -> "MinerSettings":
        # an outer round leaves its members with the same parameters: a state round every outer step
        # would double DiLoCo's traffic to fix what rarely needs fixing (BENCHMARKS.md: "Training modes")
        if self.mode == "diloco" and "average_state_every" not in self.model_fields_set:
            self.average_state_every = DILOCO_AVERAGE_STATE_EVERY
        # pseudo-gradients go 8-bit, every member of a round applying the same rounding (they stay in step)
        if self.mode == "diloco" and "grad_compression" not in self.model_fields_set and self.robust_aggregation:
            self.grad_compression = "8bit-shared"
        return self

    @model_validator(mode="after")
    def _hivemind_combinations(self) -> "MinerSettings":
        # hivemind asserts these deep inside Optimizer; say it here, with the fix
        if self.mode == "diloco" and (self.use_local_updates or self.delay_grad_averaging or self.delay_optimizer_step):
            raise ValueError(
                "diloco mode runs its own schedule: unset HIVE_USE_LOCAL_UPDATES, HIVE_DELAY_GRAD_AVERAGING "
                "and HIVE_DELAY_OPTIMIZER_STEP (or set HIVE_MODE=hivemind)"
            )
        if self.grad_compression == "8bit-shared" and not self.robust_aggregation:
            raise ValueError(
                "HIVE_GRAD_COMPRESSION=8bit-shared is the robust all-reduce's: set HIVE_ROBUST_AGGREGATION=true, or "
                "use 8bit"
            )
        if self.use_local_updates and self.delay_grad_averaging:
            raise ValueError(
                "delay_grad_averaging needs gradient averaging: unset HIVE_USE_LOCAL_UPDATES or "
                "HIVE_DELAY_GRAD_AVERAGING"
            )
        if self.delay_grad_averaging and not self.delay_optimizer_step:
            raise ValueError("delay_grad_averaging needs delay_optimizer_step: set HIVE_DELAY_OPTIMIZER_STEP=true too")
        if self.delay_optimizer_step and not (self.offload_optimizer and self.delay_state_averaging):
            raise ValueError(
                "delay_optimizer_step needs offload_optimizer and delay_state_averaging: set "
                "HIVE_OFFLOAD_OPTIMIZER=true and HIVE_DELAY_STATE_AVERAGING=true"
            )
        return self


class ValidatorSettings(PeerSettings):
    """``python -m hivetrain.validator``: evaluates the shared model, checks miners' claims, scores them, sets
    weights."""

    model_config = SettingsConfigDict(cli_prog_name="python -m hivetrain.validator")

    wallet_name: str = Field("validator", description="wallet (coldkey) name")
    api_host: str = Field("0.0.0.0", description="address the validator API binds")
    api_port: int = Field(8100, ge=1, le=65535, description="port of the validator API")
    api_workers: int = Field(2, ge=1, le=64, description="gunicorn worker processes of the API")
    sync_every_s: float = Field(30.0, gt=0, description="load the swarm's state from peers this often")
    sync_timeout_s: float = Field(
        60.0,
        gt=0,
        description="one sync of the swarm's state gives up after this long; each server gets a third of it (a "
        "slower one is cut off and banned): the seed preset's state (about 384 MB) needs about 150 Mbit/s at the "
        "default, so raise it on slower links",
    )
    eval_blocks: int = Field(16, ge=1, description="fixed validation blocks each evaluation uses")
    eval_batch_size: int = Field(8, ge=1, description="blocks per forward pass during evaluation")
    check_every_s: float = Field(
        20.0, gt=0, description="check every live miner's claims and send it a spot check this often"
    )
    weights_every_s: float = Field(60.0, gt=0, description="set weights through the chain this often")
    spot_check_dim: int = Field(
        64, ge=8, le=MAX_DIM, multiple_of=8, description="size of the projected gradient a miner returns"
    )
    spot_check_batch: int = Field(2, ge=1, le=MAX_BATCH, description="blocks in a spot-check batch")
    spot_check_timeout_s: float = Field(
        30.0,
        gt=0,
        description="deadline of one spot check, all of it (connect, send, the whole answer); a miner that has not "
        "answered by then fails it",
    )
    spot_check_workers: int = Field(
        8,
        ge=1,
        le=256,
        description="spot checks in flight at once, and the most miners one check round asks (so a round takes one "
        "deadline, however many registered: miners whose last check passed get half, least recently checked first; "
        "the others, oldest first, the rest); a miner whose endpoint stalls is not asked again for a while",
    )
    spot_check_tries: int = Field(
        3,
        ge=1,
        description="a miner whose answers cannot be judged (an epoch the validator cannot reach) this many checks in "
        "a row fails",
    )
    spot_check_private_urls: bool = Field(
        False,
        description="send spot checks to any loopback or private address (a swarm on one machine: make swarm sets "
        "it); false: only to the address a miner's registration came from, as the bootstrap saw it, never loopback, "
        "so a registration cannot point the validator at internal services or at anyone else (compose and Kubernetes "
        "miners register from the address they serve on; link-local, multicast and reserved addresses are always "
        "refused)",
    )
    spot_check_threshold: float = Field(
        SPOT_CHECK_THRESHOLD,
        gt=-1,
        le=1,
        description="cosine an answer needs against the validator's own projection (bench/spot_check_threshold.py)",
    )
    audits_per_round: int = Field(
        1,
        ge=0,
        le=64,
        description="gradient rounds audited per check round (hivetrain.validator.audits): a sender's gradient "
        "recomputed from the blocks it declared and compared with what its reducers received; each costs one forward "
        "and backward pass per block the sender declared (BENCHMARKS.md: the seed preset's 16 blocks, 24 CPU-seconds); "
        "0: none. DiLoCo rounds are not audited",
    )
    audit_epochs: int = Field(
        4,
        ge=1,
        le=64,
        description="past epochs whose parameters the validator keeps, for audits (a round is audited at its own "
        "epoch's parameters, once its receipts are in) and spot checks answered an epoch behind: one copy of the "
        "model each (the seed preset: about 130 MB)",
    )
    max_samples_per_s: float = Field(
        10_000.0, gt=0, description="no miner is credited for more samples per second than this"
    )
    claim_tolerance: float = Field(
        1.0,
        ge=0,
        description="claims may exceed what hivemind's progress records showed by this fraction and still pass (polls "
        "miss each epoch's last samples); credit is never more than the records grew by",
    )
    claim_read_cap: int = Field(
        100_000,
        ge=1000,
        description="signed step records one poll reads at most (it reads everything new up to this; a warning says "
        "when more wait)",
    )
    score_ema_alpha: float = Field(0.3, gt=0, le=1, description="weight of the newest round in a miner's score EMA")


class SwarmSettings(ServiceSettings):
    """``python -m hivetrain.swarm``: Redis, the bootstrap and N miners as local processes."""

    model_config = SettingsConfigDict(cli_prog_name="python -m hivetrain.swarm")

    miners: int = Field(4, ge=0, le=64, description="number of miners to start")
    duration: float = Field(0.0, ge=0, description="stop everything after this many seconds; 0 = until Ctrl-C")
    workdir: str = Field("swarm-run", description="logs, Redis data, checkpoints and identities go here")
    preset: Literal["seed", "tiny"] = Field("tiny", description="model preset every miner trains")
    bootstrap_port: int = Field(8000, ge=0, le=65535, description="HTTP port of the bootstrap; 0 = a free port")
    validator: bool = Field(True, description="start a validator (its API on --validator-port)")
    validator_port: int = Field(8100, ge=0, le=65535, description="HTTP port of the validator API; 0 = a free port")
    redis_port: int = Field(0, ge=0, le=65535, description="port of the embedded Redis; 0 = a free port")
    external_redis: bool = Field(False, description="use HIVE_REDIS_URL as it is instead of starting an embedded Redis")
    summary: str = Field("", description="write a JSON summary (rounds, losses, checkpoints) here on exit")
    stop_timeout: float = Field(45.0, gt=0, description="seconds a process gets to stop after SIGTERM before SIGKILL")
    engine: Literal["local", "docker"] = Field(
        "local",
        description="local: processes on this machine; docker: containers built from services/ (needs a Docker engine)",
    )

    @model_validator(mode="after")
    def _docker_runs_its_own_redis(self) -> "SwarmSettings":
        # containers reach Redis as redis:6379 on the compose network; a URL that works from this
        # machine (127.0.0.1) would not work from inside them, so the two engines differ here
        if self.engine == "docker" and self.external_redis:
            raise ValueError(
                "--external-redis works with --engine local only: --engine docker runs the Redis of "
                "docker-compose.yml (users and passwords: deploy/redis/start.sh); drop --external-redis"
            )
        return self


class StatusSettings(BaseSettings):
    """``hivetrain status``: one miner's standing, as the validator's API shows it (a client: no Redis, no DHT)."""

    model_config = SettingsConfigDict(**SETTINGS_CONFIG, cli_prog_name="hivetrain status")

    validator_url: str = Field(
        "http://127.0.0.1:8100", description="the validator's API, where its dashboard is (make swarm prints it)"
    )
    hotkey: str = Field("", description="the miner's hotkey (ss58); empty = the hotkey of the wallet below")
    wallet_dir: str = Field("wallets", description="folder of bittensor wallets (read, never created here)")
    wallet_name: str = Field("miner", description="wallet (coldkey) name")
    wallet_hotkey: str = Field("default", description="hotkey name inside the wallet")
    as_json: bool = Field(False, description="print the standing as JSON, for scripts (--json for short)")
    timeout_s: float = Field(10.0, gt=0, description="deadline of the request to the validator")

    @field_validator("validator_url")
    @classmethod
    def _is_http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an HTTP URL; write e.g. http://127.0.0.1:8100")
        return value.rstrip("/")


S = TypeVar("S", bound=BaseSettings)


#: Every service's settings model, by the name of its image; deployment files are checked against these.
SERVICE_SETTINGS: dict[str, type[ServiceSettings]] = {
    "bootstrap": BootstrapSettings,
    "miner": MinerSettings,
    "validator": ValidatorSettings,
}


def domain_of(settings: ServiceSettings) -> "Domain":
    """The signature domain of a service: its run id and, when ``chain`` is ``bittensor``, its netuid.

    Every service of a run reads the same ``HIVE_RUN_ID``, ``HIVE_CHAIN`` and ``HIVE_NETUID`` and so
    derives the same domain.
    """
    from hivetrain.identity import Domain  # the keys binding loads with it: not for every settings import (--help)

    return Domain(settings.run_id, settings.netuid if settings.chain == "bittensor" else None)


def env_names(model: type[BaseSettings]) -> set[str]:
    """The environment variables a settings model reads."""
    prefix = model.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper() for name in model.model_fields}


#: pydantic's wrapper for each mode of a field validator, to run a model's field validators on one value.
_VALIDATOR_MODES = {"after": AfterValidator, "before": BeforeValidator, "plain": PlainValidator, "wrap": WrapValidator}


@lru_cache(maxsize=None)
def _field_adapter(model: type[BaseSettings], name: str) -> TypeAdapter:
    """Validates one value of ``model.<name>``: its type, its bounds (``ge=1``...) and its field validators."""
    field = model.model_fields[name]
    validators = [
        _VALIDATOR_MODES[decorator.info.mode](decorator.func)
        for decorator in model.__pydantic_decorators__.field_validators.values()
        if name in decorator.info.fields or "*" in decorator.info.fields
    ]
    metadata = [*field.metadata, *validators]
    return TypeAdapter(Annotated[(field.annotation, *metadata)] if metadata else field.annotation)


def service_env(model: type[BaseSettings], **values: object) -> dict[str, str]:
    """The environment that makes ``model`` read ``values`` (field name -> typed value), e.g.
    ``service_env(MinerSettings, batch_size=4, host_maddrs=["/ip4/0.0.0.0/tcp/0"])``.

    A name ``model`` does not have raises ``ValueError`` naming the field and the model, so a
    typo cannot silently become a variable nobody reads. Each value is validated against its
    field (type, bounds, field validators; model validators, which relate several fields, do not
    run). Values are written the way pydantic-settings parses them back: strings as they are,
    everything else as JSON (``true``, ``4``, ``["/ip4/..."]``).
    """
    prefix = model.model_config.get("env_prefix", "")
    env: dict[str, str] = {}
    for name, value in values.items():
        variable = f"{prefix}{name}".upper()
        if name not in model.model_fields:
            close = difflib.get_close_matches(name, model.model_fields, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(
                f"{model.__name__} has no setting {name!r} (nothing reads {variable}); {hint}"
                f"its settings are the fields of {model.__name__} in hivetrain/settings.py"
            )
        try:
            valid = _field_adapter(model, name).validate_python(value)
        except ValidationError as error:
            reason = "; ".join(err["msg"] for err in error.errors())
            raise ValueError(f"{model.__name__}.{name} ({variable}): {reason} (got {value!r})") from None
        env[variable] = valid if isinstance(valid, str) else json.dumps(to_jsonable_python(valid))
    return env


def format_errors(model: type[BaseSettings], error: ValidationError) -> str:
    """One line per bad field, naming the env var and the flag that set it."""
    prefix = model.model_config.get("env_prefix", "")
    lines = [f"invalid {model.__name__}:"]
    for err in error.errors():
        field = str(err["loc"][0]) if err["loc"] else ""
        where = f"{prefix}{field}".upper() + f" / --{field.replace('_', '-')}" if field else "settings"
        got = f" (got {err['input']!r})" if field and "input" in err else ""
        lines.append(f"  {where}: {err['msg']}{got}")
    return "\n".join(lines)


#: ``HIVE_*`` variables that are no setting but are read all the same: by compose and the Makefile
#: (image tags, the miners' CPU share, the published address) and by the tests.
OTHER_VARIABLES = frozenset(
    {
        "HIVE_E2E_COMPOSE",
        "HIVE_E2E_DOCKER_HOST",
        "HIVE_IMAGE_CACHE",
        "HIVE_IMAGE_TAG",
        "HIVE_MINER_CPUS",
        "HIVE_PUBLISH_ADDRESS",
        "HIVE_TEST_ARTIFACTS",
    }
)


def _settings_models(root: type[BaseSettings]) -> list[type[BaseSettings]]:
    return [root] + [model for sub in root.__subclasses__() for model in _settings_models(sub)]


def known_variables() -> set[str]:
    """Every ``HIVE_*`` variable something here reads: the settings of every service, and ``OTHER_VARIABLES``."""
    models = [*_settings_models(ServiceSettings), StatusSettings]
    return set(OTHER_VARIABLES).union(*(env_names(model) for model in models))


def unread_variables(environ: dict[str, str] | None = None) -> list[str]:
    """One line per ``HIVE_*`` variable in ``environ`` that nothing reads (a misspelling), with the closest name."""
    known = known_variables()
    lines = []
    for name in sorted(os.environ if environ is None else environ):
        if name.startswith("HIVE_") and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            lines.append(f"{name} is set but no setting reads it" + (f"; did you mean {close[0]}?" if close else ""))
    return lines


def _flag_problem(model: type[BaseSettings], args: list[str]) -> str | None:
    """Why a flag in ``args`` is none of ``model``'s (with the closest one), or None; argparse would print its usage."""
    flags = {"help", "h"}
    for name, field in model.model_fields.items():
        flag = (field.alias or name).replace("_", "-")
        flags |= {flag, f"no-{flag}"} if field.annotation is bool else {flag}
    for arg in args:
        if arg == "--":
            return None
        if arg.startswith("--") and (flag := arg[2:].split("=", 1)[0]) not in flags:
            close = difflib.get_close_matches(flag, flags, n=1)
            hint = f"did you mean --{close[0]}? " if close else ""
            return f"{model.__name__} has no flag --{flag}; {hint}--help lists them"
    return None


def load_settings(model: type[S], argv: list[str] | None = None) -> S:
    """Build ``model`` from the environment and ``argv`` (flags).

    Raises ``ConfigError`` with a fix-it message when a setting is invalid or a flag unknown; logs a
    warning for each ``HIVE_*`` variable nothing reads; ``--version`` prints the version and exits.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if "--version" in args:
        print(f"hivetrain {__version__}")
        raise SystemExit(0)
    if (problem := _flag_problem(model, args)) is not None:
        raise ConfigError(problem)
    for line in unread_variables():
        logger.warning(line)
    try:
        return CliApp.run(model, cli_args=args)
    except ValidationError as error:
        raise ConfigError(format_errors(model, error)) from None
    except SettingsError as error:  # a value the environment source cannot even parse (JSON)
        field = match.group(1) if (match := re.search(r'field "(\w+)"', str(error))) else None
        where = f"{model.model_config.get('env_prefix', '')}{field}".upper() if field else "a HIVE_* variable"
        raise ConfigError(f"invalid {model.__name__}:\n  {where}: cannot parse its value ({error})") from None
