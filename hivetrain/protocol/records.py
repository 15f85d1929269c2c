"""What services write to Redis, defined once: key names, TTLs, stream caps and record schemas.

Every registry record expires (a peer that stops heartbeating disappears on its own);
telemetry goes to capped streams so Redis memory stays bounded however long a swarm runs.
Records are strict pydantic models: a reader rejects anything that does not match.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

SCHEMA_VERSION = 1

# --- registry -----------------------------------------------------------------------------
#: A peer's registration lives this long unless its heartbeat refreshes it.
PEER_TTL_S = 30
#: Heartbeats come this often, well inside the TTL so one missed beat does not drop a peer.
HEARTBEAT_INTERVAL_S = 10
#: The bootstrap DHT's own addresses, refreshed by its heartbeat.
BOOTSTRAP_TTL_S = 30

# --- telemetry streams (approximate MAXLEN, trimmed by Redis on every XADD) -----------------
STEPS_STREAM_MAXLEN = 100_000
ROUNDS_STREAM_MAXLEN = 20_000
EVALS_STREAM_MAXLEN = 10_000
OFFENCES_STREAM_MAXLEN = 20_000
RECEIPTS_STREAM_MAXLEN = 50_000
#: The validator's own heartbeat (its /readyz says not ready once this lapses).
VALIDATOR_TTL_S = 120
#: A validator's saved scores outlive its restarts by this much; an abandoned run's go away on their own.
VALIDATOR_STATE_TTL_S = 7 * 24 * 3600
#: Miners a validator's saved state holds at most, and spot checks per miner.
MAX_SAVED_MINERS = 10_000
MAX_SAVED_CHECKS = 50

#: The run's shard salt is this many lowercase hex characters (16 random bytes); anything else in its key is refused.
SHARD_SALT_HEX_CHARS = 32

PeerRole = Literal["miner", "validator", "bootstrap"]


class Keys:
    """Redis key names, namespaced by run so several swarms can share one Redis."""

    def __init__(self, run_id: str):
        if not run_id or any(c.isspace() or c == ":" for c in run_id):
            raise ValueError(f"run_id must be a non-empty word without ':' or spaces, got {run_id!r}")
        self.run_id = run_id
        self.prefix = f"hive:{run_id}"

    def peer(self, peer_id: str) -> str:
        """One peer's registration record (JSON, expires after PEER_TTL_S)."""
        return f"{self.prefix}:peer:{peer_id}"

    @property
    def peer_index(self) -> str:
        """Sorted set peer_id -> last heartbeat time, to list the freshest peers without SCAN."""
        return f"{self.prefix}:peers"

    def peer_source(self, peer_id: str) -> str:
        """The address the bootstrap received a peer's newest registration from (expires with the registration)."""
        return f"{self.prefix}:from:{peer_id}"

    def hotkey_peers(self, hotkey: str) -> str:
        """Sorted set of the live peer ids one hotkey registered through the bootstrap -> time signed."""
        return f"{self.prefix}:hotkey:{hotkey}:peers"

    def ingest_marks(self, hotkey: str) -> str:
        """Hash "peer_id|stream" -> time of the newest entry the bootstrap took from that peer (replays are older)."""
        return f"{self.prefix}:ingest:{hotkey}:marks"

    def ingest_taken(self, hotkey: str) -> str:
        """Hash "peer_id|stream" -> JSON list of the signing times of the entries in that peer's last post, so the
        same post sent again after its answer was lost is known as already stored, not as a replay."""
        return f"{self.prefix}:ingest:{hotkey}:taken"

    def ingest_quota(self, hotkey: str, minute: int) -> str:
        """Telemetry entries the bootstrap took from one hotkey in one minute (unix time // 60)."""
        return f"{self.prefix}:ingest:{hotkey}:quota:{minute}"

    def bootstrap(self, peer_id: str) -> str:
        """One bootstrap DHT's addresses (JSON, expires after BOOTSTRAP_TTL_S)."""
        return f"{self.prefix}:bootstrap:{peer_id}"

    @property
    def bootstrap_index(self) -> str:
        """Sorted set of bootstrap peer ids -> last heartbeat time."""
        return f"{self.prefix}:bootstraps"

    @property
    def steps(self) -> str:
        """Stream of StepRecord, one per local training step of every miner."""
        return f"{self.prefix}:telemetry:steps"

    @property
    def rounds(self) -> str:
        """Stream of RoundRecord, one per averaging round seen by every miner."""
        return f"{self.prefix}:telemetry:rounds"

    @property
    def offences(self) -> str:
        """Stream of OffenceRecord: peers a miner or validator caught (bad parts, answers, states, progress)."""
        return f"{self.prefix}:telemetry:offences"

    @property
    def receipts(self) -> str:
        """Stream of ReceiptRecord: whose parts each miner, as a reducer, received in a gradient round."""
        return f"{self.prefix}:telemetry:receipts"

    @property
    def evals(self) -> str:
        """Stream of EvalRecord, one per evaluation of the shared model by a validator."""
        return f"{self.prefix}:evals"

    def scores(self, validator_hotkey: str) -> str:
        """One validator's latest ScoreBoard (JSON), with the evidence behind every score."""
        return f"{self.prefix}:scores:{validator_hotkey}"

    def validator_alive(self, validator_hotkey: str) -> str:
        """A ValidatorStatus (JSON) set with a TTL by a running validator's loop; its API is ready while this exists."""
        return f"{self.prefix}:validator:{validator_hotkey}:alive"

    def validator_state(self, validator_hotkey: str) -> str:
        """A ValidatorState signed by that validator (JSON envelope): what it resumes after a restart."""
        return f"{self.prefix}:validator:{validator_hotkey}:state"

    @property
    def shard_salt(self) -> str:
        """The run's shard salt: 32 lowercase hex characters, written once by the bootstrap or a validator
        and never expiring. A miner's data shard follows from its hotkey and this salt
        (``hivetrain.data.shard_for``)."""
        return f"{self.prefix}:shard_salt"


class Record(BaseModel):
    """Base of every record: strict types, unknown fields rejected, immutable."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, raw: str | bytes):
        return cls.model_validate_json(raw)


#: A registration's stored size at most (a real one is about 1 kB): readers drop bigger ones unparsed.
MAX_REGISTRATION_BYTES = 16_384
#: Addresses one peer may register (a peer has a few: TCP and QUIC, IPv4 and IPv6, announce addresses).
MAX_MULTIADDRS = 16
Multiaddr = Annotated[str, Field(min_length=1, max_length=512)]


class PeerRecord(Record):
    """A live peer, as the bootstrap hands it out and the validator lists it."""

    schema_version: int = SCHEMA_VERSION
    peer_id: str = Field(min_length=1, max_length=128)
    role: PeerRole
    hotkey: str = Field(default="", max_length=64, description="ss58 hotkey that signs this peer's records")
    challenge_url: str = Field(default="", max_length=512, description="where validators send spot checks (miners)")
    multiaddrs: list[Multiaddr] = Field(
        max_length=MAX_MULTIADDRS, description="addresses other peers can dial (announce addrs when set)"
    )
    device: str = Field(default="cpu", max_length=64, description="cpu, cuda, cuda:0, ...")
    preset: str = Field(default="", max_length=64, description="model preset the peer trains")
    peer_key: str = Field(default="", max_length=1200, description="base64 libp2p public key whose hash is peer_id")
    peer_signature: str = Field(
        default="",
        max_length=800,
        description="base64 signature by that key over (run id, peer id, hotkey): "
        "hivetrain.protocol.binding; readers drop registrations without a valid one",
    )
    started_at: float = Field(description="unix time the process started")
    last_seen: float = Field(default_factory=time.time, description="unix time of the last heartbeat")
    # the address the bootstrap saw the registration come from: the registry attaches it as it reads;
    # it is no field, so no payload can carry it (an unknown field is refused) and no signature covers it
    _registered_from: str = PrivateAttr(default="")

    @property
    def registered_from(self) -> str:
        """The address the bootstrap received this registration from ('' when not known): where a validator may
        send spot checks on a public subnet (``hivetrain.validator.bounded_http``)."""
        return self._registered_from

    def seen_from(self, address: str) -> PeerRecord:
        """This record, as received from ``address``."""
        copy = self.model_copy()
        copy._registered_from = address
        return copy


#: Peers one hotkey may have registered through the bootstrap at once (one machine runs a few at most).
MAX_PEERS_PER_HOTKEY = 8
#: Telemetry entries one POST to the bootstrap carries at most, and one entry's size at most.
MAX_INGEST_ENTRIES = 500
MAX_INGEST_ENTRY_BYTES = 16_384


class Departure(Record):
    """A peer leaving: signed by its hotkey, it makes the bootstrap drop the peer's registration."""

    schema_version: int = SCHEMA_VERSION
    peer_id: str = Field(min_length=1, max_length=128)


class BootstrapRecord(Record):
    """The bootstrap DHT's own addresses; listed first by /initial_peers."""

    schema_version: int = SCHEMA_VERSION
    peer_id: str = Field(min_length=1, max_length=128)
    multiaddrs: list[Multiaddr] = Field(max_length=MAX_MULTIADDRS)
    last_seen: float = Field(default_factory=time.time)


class StepRecord(Record):
    """One local training step of one miner."""

    schema_version: int = SCHEMA_VERSION
    peer_id: str = Field(min_length=1)
    step: int = Field(ge=0, description="local step counter since the process started")
    local_epoch: int = Field(ge=0)
    global_epoch: int = Field(ge=0)
    loss: float
    samples: int = Field(ge=0, description="samples this miner has trained on since it started")
    samples_per_s: float = Field(ge=0)
    tokens_per_s: float = Field(ge=0)
    checkpoint_epoch: int = Field(
        default=-1, ge=-1, description="epoch of this miner's newest checkpoint; -1 before the first"
    )
    compute_s: float = Field(
        default=0.0,
        ge=0,
        allow_inf_nan=False,
        description="seconds inside forward, backward and the (inner) optimizer step since this process began training",
    )
    time: float = Field(default_factory=time.time)


class RoundRecord(Record):
    """One averaging round as one miner saw it."""

    schema_version: int = SCHEMA_VERSION
    peer_id: str = Field(min_length=1)
    epoch: int = Field(ge=0, description="the epoch this round completed")
    kind: Literal["gradients", "state"] = "gradients"
    group_size: int = Field(ge=0, description="peers in the all-reduce group, this one included")
    group: list[str] = Field(default_factory=list, description="peer ids in the group")
    duration_s: float = Field(ge=0)
    success: bool
    time: float = Field(default_factory=time.time)


class OffenceRecord(Record):
    """A peer one miner (or validator) caught: in an averaging round (then left out of its aggregation
    for a while), serving a state that failed verification (then not asked again for a while), or
    publishing implausible progress (then left out of its view of the swarm's epoch)."""

    schema_version: int = SCHEMA_VERSION
    peer_id: str = Field(min_length=1, description="the miner or validator that caught it (signs this record)")
    offender: str = Field(min_length=1, description="peer id of the offender")
    averager: str = Field(min_length=1, description="the DHT prefix of the averager or progress key that saw it")
    role: Literal["sender", "reducer", "state", "progress"] = Field(
        description="sender: its all-reduce part was bad; reducer: its answer was; state: the training state it "
        "served; progress: its DHT progress record"
    )
    reason: str = Field(min_length=1, max_length=500)
    banned_s: float = Field(ge=0, description="how long this miner ignores the offender")
    time: float = Field(default_factory=time.time)


class EvalRecord(Record):
    """One evaluation of the shared model on the fixed validation blocks."""

    schema_version: int = SCHEMA_VERSION
    validator: str = Field(min_length=1, description="hotkey of the validator")
    epoch: int = Field(ge=0, description="global epoch of the evaluated parameters")
    loss: float
    perplexity: float
    blocks: int = Field(ge=1, description="validation blocks evaluated")
    tokens: int = Field(ge=1)
    duration_s: float = Field(ge=0)
    time: float = Field(default_factory=time.time)


class ValidatorStatus(Record):
    """What a running validator holds, refreshed with its heartbeat: the dashboard's model panel."""

    schema_version: int = SCHEMA_VERSION
    validator: str = Field(min_length=1, description="hotkey of the validator")
    preset: str = Field(min_length=1, description="model preset of the shared model")
    parameters: int = Field(ge=0, description="parameters of the shared model")
    epoch: int = Field(ge=0, description="global epoch of the parameters the validator holds")
    synced_at: float = Field(
        ge=0, description="unix time it last adopted a verified state from peers; 0 before the first"
    )
    time: float = Field(default_factory=time.time)


class MinerScore(Record):
    """One miner on a validator's score board: the score, the weight it set, and why."""

    hotkey: str = Field(min_length=1)
    uid: int | None = Field(description="uid in the chain's metagraph; None if not registered")
    peer_id: str = Field(default="", description="hivemind peer id of its registration")
    score: float = Field(ge=0, description="EMA of round scores")
    weight: float = Field(ge=0, le=1, description="normalized weight last set through the chain")
    evidence: list[dict] = Field(default_factory=list, description="ScoreEvidence of the latest rounds, newest last")


class ScoreBoard(Record):
    """A validator's latest scores and weights (written each time it sets weights)."""

    schema_version: int = SCHEMA_VERSION
    validator: str = Field(min_length=1, description="hotkey of the validator")
    uid: int | None = None
    epoch: int = Field(ge=0, description="global epoch of the model the validator held")
    rounds: int = Field(ge=0, description="scoring rounds so far")
    weights_set_at: float = Field(description="unix time the weights were set")
    miners: list[MinerScore] = Field(default_factory=list)
    rejected: dict[str, int] = Field(default_factory=dict, description="telemetry records dropped, by reason")


class SavedCheck(Record):
    """One spot check in a validator's saved history."""

    verdict: Literal["pass", "fail"]
    reason: str = Field(max_length=1000)
    cosine: float | None = Field(default=None, allow_inf_nan=False)


class SavedCatch(Record):
    """A hotkey a validator caught itself (it scores 0 until ``until``), in the validator's saved state."""

    until: float = Field(allow_inf_nan=False, description="when its ban ends (time.time())")
    why: str = Field(max_length=500)


class SavedCredit(Record):
    """Samples a validator carries for one miner from window to window (``hivetrain.validator.receipts.CreditLedger``),
    in its saved state."""

    owed: float = Field(ge=0, allow_inf_nan=False, description="verified by the claims check, not yet received")
    banked: float = Field(ge=0, allow_inf_nan=False, description="received by the swarm, not yet claimed")


class ValidatorState(Record):
    """What a validator resumes after a restart: each miner's EMA score, recent spot checks, unjudged streak and
    carried credit, and the hotkeys it caught (saved, signed by its hotkey, each time it sets weights)."""

    schema_version: int = SCHEMA_VERSION
    validator: str = Field(min_length=1, description="hotkey of the validator (the one that signed this)")
    rounds: int = Field(ge=0, description="scoring rounds so far")
    scores: dict[str, Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]] = Field(
        default_factory=dict, max_length=MAX_SAVED_MINERS
    )
    checks: dict[str, Annotated[list[SavedCheck], Field(max_length=MAX_SAVED_CHECKS)]] = Field(
        default_factory=dict, max_length=MAX_SAVED_MINERS
    )
    unjudged: dict[str, Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict, max_length=MAX_SAVED_MINERS, description="spot checks in a row that could not be judged"
    )
    caught: dict[str, SavedCatch] = Field(
        default_factory=dict, max_length=MAX_SAVED_MINERS, description="hotkeys caught by this validator, zeroed"
    )
    credit: dict[str, SavedCredit] = Field(
        default_factory=dict, max_length=MAX_SAVED_MINERS, description="samples carried to the next window, per miner"
    )
    saved_at: float = Field(default_factory=time.time)


#: Senders one receipt names at most (hivemind's groups are far smaller: ``target_group_size``).
MAX_RECEIPT_SENDERS = 64
#: Senders whose parts one receipt samples at most, and coordinates sampled per sender (a receipt stays well under
#: ``MAX_INGEST_ENTRY_BYTES``).
MAX_SAMPLED_SENDERS = 16
AUDIT_COORDINATES = 16
PeerId = Annotated[str, Field(min_length=1, max_length=128)]


class PartSample(Record):
    """What a reducer received from one sender at a few coordinates of the round's vector, drawn by the reducer
    after the sender had committed to its parts, and what the sender declared with them (gathered in matchmaking):
    the epoch it accumulated gradients at and the first block of its shard it trained on since
    (``hivetrain.validator.audits`` recomputes that gradient and compares)."""

    epoch: int = Field(ge=0, description="the epoch whose gradients the sender declared it sent")
    first_block: int = Field(ge=0, description="the sender's first block of the epoch; one block per sample from it")
    indices: list[Annotated[int, Field(ge=0, le=2**40)]] = Field(
        max_length=AUDIT_COORDINATES, description="coordinates of the flattened vector, in the averager's order"
    )
    values: list[Annotated[float, Field(allow_inf_nan=False)]] = Field(
        max_length=AUDIT_COORDINATES, description="what the sender's part held there, as received"
    )

    @model_validator(mode="after")
    def _paired(self) -> "PartSample":
        if len(self.indices) != len(self.values):
            raise ValueError(f"{len(self.indices)} indices but {len(self.values)} values")
        return self


class ReceiptRecord(Record):
    """What one miner, reducing its partition of one gradient round, received: every part of each sender named,
    counted at the weight (samples) the sender declared. A sender's credit comes from the receipts of the other
    members of its rounds (``hivetrain.validator.receipts``), not from what it says about itself."""

    schema_version: int = SCHEMA_VERSION
    peer_id: str = Field(min_length=1, max_length=128, description="the reducer (signs this record)")
    averager: str = Field(min_length=1, max_length=256, description="the DHT prefix of the gradient averager")
    group: str = Field(pattern=r"^[0-9a-f]{2,128}$", description="the round's group id, hex")
    senders: dict[PeerId, Annotated[float, Field(ge=0, allow_inf_nan=False)]] = Field(
        max_length=MAX_RECEIPT_SENDERS,
        description="peer id -> declared weight of each other sender whose every part this reducer counted",
    )
    samples: dict[PeerId, PartSample] = Field(
        default_factory=dict,
        max_length=MAX_SAMPLED_SENDERS,
        description="peer id -> the sender's part at coordinates this reducer drew, for audits (senders named above)",
    )
    time: float = Field(default_factory=time.time)
