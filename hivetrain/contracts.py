"""What services write to Redis, defined once: key names, TTLs, stream caps and record schemas.

Every registry record expires (a peer that stops heartbeating disappears on its own);
telemetry goes to capped streams so Redis memory stays bounded however long a swarm runs.
Records are strict pydantic models: a reader rejects anything that does not match.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

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


class Record(BaseModel):
    """Base of every record: strict types, unknown fields rejected, immutable."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, raw: str | bytes):
        return cls.model_validate_json(raw)


class PeerRecord(Record):
    """A live peer, as the bootstrap hands it out and the validator lists it."""

    schema_version: int = SCHEMA_VERSION
    peer_id: str = Field(min_length=1)
    role: PeerRole
    multiaddrs: list[str] = Field(description="addresses other peers can dial (announce addrs when set)")
    device: str = Field(default="cpu", description="cpu, cuda, cuda:0, ...")
    preset: str = Field(default="", description="model preset the peer trains")
    started_at: float = Field(description="unix time the process started")
    last_seen: float = Field(default_factory=time.time, description="unix time of the last heartbeat")


class BootstrapRecord(Record):
    """The bootstrap DHT's own addresses; listed first by /initial_peers."""

    schema_version: int = SCHEMA_VERSION
    peer_id: str = Field(min_length=1)
    multiaddrs: list[str]
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
