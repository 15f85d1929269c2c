"""The chain layer: who is in the swarm (uids, hotkeys, stake, role) and what validators weigh.

Two backends behind one ``Chain`` protocol:

* ``LocalChain`` (the default): a metagraph in Redis, so a swarm runs with no blockchain. Uids
  come from ``INCR`` in a Lua script, so concurrent registrations never collide and
  re-registering a hotkey returns its uid. Weights are normalized to sum 1 and stored with the
  time they were set, one record per validator. Anyone who can write to the run's Redis can
  write here: on this backend Redis access is the trust boundary.
* ``BittensorChain``: the same calls on a real subnet through the bittensor 11 SDK
  (``bt.Subtensor``: ``neurons.uid``, ``subnets.metagraph``, ``weights.weights``, and
  ``execute(bt.SetWeights(...), wallet)``). Registration burns TAO, so ``register`` never
  spends: it returns the uid of a hotkey registered beforehand (``btcli subnets register``) and
  raises ``ChainRegistrationError`` otherwise. Offline, every call fails fast with
  ``bt.RpcConnectionError``. The SDK is imported when this backend is built, not with the module: it
  takes about half a second, and the default local chain needs nothing from it.
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal, Protocol, runtime_checkable

import redis
from pydantic import Field

from hivetrain.log import get_logger
from hivetrain.protocol.records import Keys, Record
from hivetrain.wallet import Wallet

logger = get_logger(__name__)

ChainRole = Literal["miner", "validator"]
#: Stake a LocalChain neuron starts with; validators need stake to count, miners do not.
DEFAULT_STAKE: dict[str, float] = {"miner": 0.0, "validator": 1.0}
#: LocalChain keys live this long after the last write, so an abandoned run's metagraph goes away.
LOCAL_CHAIN_TTL_S = 7 * 24 * 3600


class ChainRegistrationError(RuntimeError):
    """The hotkey is not (and will not be automatically) registered on the chain."""


class Neuron(Record):
    """One row of the metagraph."""

    uid: int = Field(ge=0)
    hotkey: str = Field(min_length=1)
    endpoint: str = Field(description="where the neuron serves (multiaddr, URL or ip:port); empty if nothing is served")
    stake: float = Field(ge=0)
    role: ChainRole
    last_update: float = Field(description="unix time of the last registration (local) or chain update (bittensor)")


class WeightsRecord(Record):
    """One validator's latest weights, normalized to sum 1 (empty when it weighs nobody)."""

    validator_hotkey: str = Field(min_length=1)
    weights: dict[int, float]
    time: float = Field(default_factory=time.time)


@runtime_checkable
class Chain(Protocol):
    """What services need from a chain; ``LocalChain`` and ``BittensorChain`` implement it."""

    def register(self, hotkey: str, endpoint: str, role: ChainRole) -> int:
        """The hotkey's uid, registering it first where the backend can."""
        ...

    def metagraph(self) -> list[Neuron]:
        """Every registered neuron, by uid."""
        ...

    def set_weights(self, validator_hotkey: str, weights: dict[int, float]) -> None:
        """Replace the validator's weights (normalized to sum 1 by the backend)."""
        ...

    def weights(self, validator_hotkey: str) -> dict[int, float]:
        """The validator's latest weights, ``{}`` when it has set none."""
        ...

    def uid_for(self, hotkey: str) -> int | None:
        """The hotkey's uid, None when it is not registered."""
        ...

    def admitted(self, hotkeys: set[str]) -> set[str]:
        """Those of ``hotkeys`` whose peers may take part in training (``hivetrain.admission``)."""
        ...


def normalize(weights: dict[int, float]) -> dict[int, float]:
    """Weights scaled to sum 1, zeros dropped; ``{}`` when all are zero. ValueError on negatives or NaN."""
    for uid, weight in weights.items():
        if not isinstance(uid, int) or uid < 0:
            raise ValueError(f"weights are keyed by uid (int >= 0), got {uid!r}")
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight of uid {uid} must be finite and >= 0, got {weight!r}")
    total = math.fsum(weights.values())
    if total == 0:
        return {}
    return {uid: weight / total for uid, weight in sorted(weights.items()) if weight > 0}


# Assigns the next uid unless the hotkey already has one; sets the starting stake only once.
_REGISTER_LUA = """
local uid = redis.call('HGET', KEYS[1], ARGV[1])
if not uid then
  uid = redis.call('INCR', KEYS[2]) - 1
  redis.call('HSET', KEYS[1], ARGV[1], uid)
end
redis.call('HSETNX', KEYS[3], ARGV[1], ARGV[2])
return tonumber(uid)
"""


class LocalChain:
    """A Redis-backed metagraph for one run (see the module docstring)."""

    def __init__(self, client: redis.Redis, run_id: str, ttl_s: int = LOCAL_CHAIN_TTL_S):
        self.client, self.ttl_s = client, int(ttl_s)
        prefix = f"{Keys(run_id).prefix}:chain"
        self._uids, self._next_uid = f"{prefix}:uids", f"{prefix}:next_uid"
        self._stake, self._neurons = f"{prefix}:stake", f"{prefix}:neurons"
        self._weights_prefix = f"{prefix}:weights:"
        self._admitted = f"{prefix}:admitted"  # hotkey -> unix time the operator admitted it
        self._register = client.register_script(_REGISTER_LUA)

    def _all_keys(self) -> list[str]:
        return [self._uids, self._next_uid, self._stake, self._neurons, self._admitted]

    def admit(self, hotkey: str) -> None:
        """Let ``hotkey``'s peers take part in training (an operator's decision: on this chain hotkeys are free).

        Needs a Redis credential that writes the run's keys (the admin's, the bootstrap's or a validator's);
        a miner's is read-only."""
        if not isinstance(hotkey, str) or not hotkey.strip():
            raise ValueError("hotkey must be a non-empty ss58 address")
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self._admitted, hotkey.strip(), repr(time.time()))
            pipe.expire(self._admitted, self.ttl_s)
            pipe.execute()

    def revoke(self, hotkey: str) -> bool:
        """Take ``hotkey``'s admission back; whether it had one. Its peers are refused within a refresh."""
        return bool(self.client.hdel(self._admitted, hotkey))

    def admitted(self, hotkeys: set[str]) -> set[str]:
        """Those of ``hotkeys`` the operator admitted, and the registered validators (their own Redis user
        registers them: a miner cannot)."""
        ordered = sorted(hotkeys)
        if not ordered:
            return set()
        flags = self.client.hmget(self._admitted, ordered)
        found = {hotkey for hotkey, flag in zip(ordered, flags) if flag is not None}
        return found | {n.hotkey for n in self.metagraph() if n.role == "validator" and n.hotkey in hotkeys}

    def admitted_hotkeys(self) -> dict[str, float]:
        """Every hotkey the operator admitted, with the unix time it was."""
        return {hotkey.decode(): float(at) for hotkey, at in self.client.hgetall(self._admitted).items()}

    def register(self, hotkey: str, endpoint: str, role: ChainRole) -> int:
        if role not in DEFAULT_STAKE:
            raise ValueError(f"role must be one of {sorted(DEFAULT_STAKE)}, got {role!r}")
        if not hotkey:
            raise ValueError("hotkey must be a non-empty ss58 address")
        uid = int(
            self._register(keys=[self._uids, self._next_uid, self._stake], args=[hotkey, repr(DEFAULT_STAKE[role])])
        )
        # stake lives in its own hash (set_stake changes it); the stored row carries 0
        record = Neuron(uid=uid, hotkey=hotkey, endpoint=endpoint, stake=0.0, role=role, last_update=time.time())
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self._neurons, str(uid), record.to_json())
            for key in self._all_keys():
                pipe.expire(key, self.ttl_s)
            pipe.execute()
        return uid

    def set_stake(self, hotkey: str, stake: float) -> None:
        """Give a registered hotkey ``stake`` (validators' stake weighs their weights)."""
        if not math.isfinite(stake) or stake < 0:
            raise ValueError(f"stake must be finite and >= 0, got {stake!r}")
        if self.uid_for(hotkey) is None:
            raise ValueError(f"{hotkey} is not registered; call register() first")
        self.client.hset(self._stake, hotkey, repr(float(stake)))

    def uid_for(self, hotkey: str) -> int | None:
        uid = self.client.hget(self._uids, hotkey)
        return None if uid is None else int(uid)

    def metagraph(self) -> list[Neuron]:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(self._neurons)
            pipe.hgetall(self._stake)
            raw_neurons, raw_stake = pipe.execute()
        stake = {hotkey.decode(): float(value) for hotkey, value in raw_stake.items()}
        neurons = (Neuron.from_json(raw) for raw in raw_neurons.values())
        return sorted((n.model_copy(update={"stake": stake.get(n.hotkey, 0.0)}) for n in neurons), key=lambda n: n.uid)

    def set_weights(self, validator_hotkey: str, weights: dict[int, float]) -> None:
        """Store the validator's weights over registered uids; ValueError for non-validators or unknown uids."""
        by_hotkey = {n.hotkey: n for n in self.metagraph()}
        validator = by_hotkey.get(validator_hotkey)
        if validator is None or validator.role != "validator":
            raise ValueError(
                f"{validator_hotkey} is not a registered validator; register(hotkey, endpoint, 'validator') first"
            )
        known = {n.uid for n in by_hotkey.values()}
        unknown = sorted(set(weights) - known)
        if unknown:
            raise ValueError(f"uids {unknown} are not registered; weights must use uids from metagraph()")
        record = WeightsRecord(validator_hotkey=validator_hotkey, weights=normalize(weights))
        self.client.set(self._weights_prefix + validator_hotkey, record.to_json(), ex=self.ttl_s)

    def weights_record(self, validator_hotkey: str) -> WeightsRecord | None:
        """The validator's latest weights with the time they were set."""
        raw = self.client.get(self._weights_prefix + validator_hotkey)
        return None if raw is None else WeightsRecord.from_json(raw)

    def weights(self, validator_hotkey: str) -> dict[int, float]:
        record = self.weights_record(validator_hotkey)
        return {} if record is None else dict(record.weights)


class BittensorChain:
    """``Chain`` on a real subnet; ``client`` is a ``bt.Subtensor`` (or anything with its namespaces).

    ``wallet`` (a validator's, to set weights): a ``hivetrain.wallet.Wallet``, handed to the SDK as its own
    ``bt.Wallet`` over the same files, or a ``bt.Wallet``."""

    def __init__(self, netuid: int, network: str = "finney", wallet: Wallet | Any = None, client: Any = None):
        import bittensor as bt  # here, not at module level: see the module docstring

        if netuid < 0:
            raise ValueError(f"netuid must be >= 0, got {netuid}")
        if isinstance(wallet, Wallet):
            wallet = bt.Wallet(name=wallet.name, hotkey=wallet.hotkey_str, path=wallet.path)
        self.netuid, self.wallet = netuid, wallet
        self.client = client if client is not None else bt.Subtensor(network)

    def uid_for(self, hotkey: str) -> int | None:
        return self.client.neurons.uid(hotkey_ss58=hotkey, netuid=self.netuid)

    def admitted(self, hotkeys: set[str]) -> set[str]:
        """Those of ``hotkeys`` with a uid on the subnet: registering one cost its operator."""
        return {n.hotkey for n in self.metagraph()} & set(hotkeys)

    def register(self, hotkey: str, endpoint: str, role: ChainRole) -> int:
        """The uid of a hotkey registered beforehand; never burns TAO on its own.

        ``endpoint`` and ``role`` are not published: peers find each other through the DHT and
        the bootstrap, and the chain decides validator permits by stake.
        """
        uid = self.uid_for(hotkey)
        if uid is None:
            raise ChainRegistrationError(
                f"hotkey {hotkey} is not registered on netuid {self.netuid}; registration burns TAO, so do it "
                f"deliberately first: btcli subnets register --netuid {self.netuid} --wallet.name <name> "
                "--wallet.hotkey <hotkey>"
            )
        return uid

    def metagraph(self) -> list[Neuron]:
        from bittensor.settings import BLOCKTIME

        graph = self.client.subnets.metagraph(netuid=self.netuid, commitments=False)
        if graph is None:
            raise ValueError(
                f"subnet {self.netuid} does not exist on {getattr(self.client, 'network', 'this network')}"
            )
        now = time.time()
        return [
            Neuron(
                uid=int(n.uid),
                hotkey=str(n.hotkey),
                endpoint=n.axon or "",
                stake=float(n.total_stake.amount),
                role="validator" if n.validator_permit else "miner",
                last_update=now - max(0, graph.block - int(n.last_update)) * BLOCKTIME,
            )
            for n in graph.neurons
        ]

    def set_weights(self, validator_hotkey: str, weights: dict[int, float]) -> None:
        if self.wallet is None or self.wallet.hotkey.ss58_address != validator_hotkey:
            raise ValueError(
                f"setting weights for {validator_hotkey} needs its wallet: BittensorChain(..., wallet=<that wallet>)"
            )
        import bittensor as bt

        normalized = normalize(weights)
        if not normalized:
            raise ValueError("all weights are zero; the chain needs at least one positive weight")
        intent = bt.SetWeights(netuid=self.netuid, uids=list(normalized), weights=list(normalized.values()))
        self.client.execute(intent, self.wallet).raise_for_failure()

    def weights(self, validator_hotkey: str) -> dict[int, float]:
        uid = self.uid_for(validator_hotkey)
        if uid is None:
            return {}
        return dict(self.client.weights.weights(netuid=self.netuid).get(uid, {}))


def make_chain(
    kind: Literal["local", "bittensor"],
    *,
    redis_client: redis.Redis | None = None,
    run_id: str = "",
    **bittensor_args: Any,
) -> Chain:
    """``make_chain("local", redis_client=..., run_id=...)`` or ``make_chain("bittensor", netuid=..., network=...,
    wallet=...)``."""
    if kind == "local":
        if redis_client is None or not run_id:
            raise ValueError("the local chain needs redis_client= and run_id= (the swarm's HIVE_RUN_ID)")
        return LocalChain(redis_client, run_id)
    if kind == "bittensor":
        if "netuid" not in bittensor_args:
            raise ValueError("the bittensor chain needs netuid= (and usually network= and wallet=)")
        return BittensorChain(**bittensor_args)
    raise ValueError(f"chain kind must be 'local' or 'bittensor', got {kind!r}")
