"""Dishonest miners for the integration tests: real processes, real keys, real lies.

``python tests/integration/cheaters.py KIND`` with the usual ``HIVE_*`` miner environment:

* ``inflate``: trains honestly but reports ten times the samples it trained on;
* ``freeload``: trains and reports what it trained, but sends no part to any round (it steps on its own
  gradients);
* ``lazy``: trains, but answers spot checks with noise instead of computing them;
* ``replay``: trains nothing; registers its own hotkey and posts other miners' signed step records
  to the bootstrap, as they are (a replay) and rewritten to name itself (a forgery), counting what
  the bootstrap refused in ``replay-refusals.json`` in its checkpoint folder;
* ``nan`` / ``scaled`` / ``flip``: attack the averaging itself: every gradient it contributes to the
  all-reduce is NaN / multiplied by 1e30 / multiplied by -3 (tests/integration/test_attacks.py runs
  them with ``HIVE_ROBUST_AGGREGATION=false``: an attacker runs hivemind's own all-reduce, so it
  also reduces its partitions the plain way);
* ``negate``: trains, claims and answers spot checks honestly, but every gradient it sends the swarm is
  its own negated (honest size: CenteredClip dampens it, and only an audit of its rounds names it);
* ``weight``: flips its gradient and declares the weight 1e30 for it (hivemind's reducer obeys);
  in DiLoCo mode (``HIVE_MODE=diloco``) these poison the pseudo-gradient it sends instead, since
  its gradients only feed its own inner steps;
* ``state``: trains, but serves NaN parameters (at its true epoch) to whoever downloads its state,
  and declares a state-sharing priority of 1e9 so that hivemind asks it first;
* ``progress``: no training; a DHT peer that publishes a signed progress record at epoch 10^9.

They live in the tests, not in the package: the miner ships no switch to cheat.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import requests
import torch
from hivemind.averaging import DecentralizedAverager

from hivetrain.hivemind_compat import DiLoCoOptimizer, SafeStateAverager
from hivetrain.hivemind_compat.averagers import SHARED_ROUNDING_SUFFIX
from hivetrain.identity import load_or_create_wallet
from hivetrain.miner.reporting import BootstrapRegistry
from hivetrain.miner.train import Miner
from hivetrain.protocol.binding import bind, identity_peer_id, new_ed25519_identity
from hivetrain.protocol.records import Keys, PeerRecord, StepRecord
from hivetrain.protocol.spotcheck import Challenge
from hivetrain.runtime import install_stop_handlers, reset_signal_handlers_in_children
from hivetrain.settings import MinerSettings, domain_of, load_settings
from hivetrain.store import connect_redis


class InflatingMiner(Miner):
    def _make_reporting(self) -> None:
        super()._make_reporting()
        put = self.telemetry.put

        def inflated(record):
            if isinstance(record, StepRecord):
                record = record.model_copy(
                    update={"samples": record.samples * 10, "samples_per_s": record.samples_per_s * 10}
                )
            put(record)

        self.telemetry.put = inflated


class LazyMiner(Miner):
    def _answer_challenge(self, challenge: Challenge, batch: torch.Tensor) -> tuple[int, list[float]]:
        return self.opt.local_epoch, torch.randn(challenge.dim).tolist()


class FreeloadingMiner(Miner):
    """Trains and claims what it trains (step records, DHT progress alike), but never sends a part: its gradient
    averager joins no round, and it steps on its own gradients at each epoch. (Its spot-check answers are at its own
    parameters, which drift from the swarm's: what the test asserts is the payment, not the checks.)"""

    def _make_optimizer(self) -> None:
        super()._make_optimizer()

        def no_round(*args, **kwargs):
            raise RuntimeError("a freeloader sends no parts")  # hivemind logs it and steps with local gradients

        self.opt.grad_averager.step = no_round
        self.opt.grad_averager.schedule_step = lambda *args, **kwargs: None


class PoisoningMiner(Miner):
    """Trains as usual, but poisons its gradients right before hivemind accumulates and sends them."""

    POISON = {
        "nan": lambda grad: grad.fill_(float("nan")),
        "scaled": lambda grad: grad.mul_(1e30),
        "flip": lambda grad: grad.mul_(-3.0),
        "negate": lambda grad: grad.neg_(),
        "weight": lambda grad: grad.mul_(-1.0),
    }
    kind = "nan"

    def _make_optimizer(self) -> None:
        if self.settings.mode == "diloco":
            # honest DiLoCo miners average 8bit-shared, under a prefix of their own: the attacker joins them there
            # with hivemind's own all-reduce (it reads their answers as differences; it does not care), in hivemind's
            # 8-bit, so that its parts are cut to the honest parts' size (float32 parts are 4x shorter: refused for
            # their shape before their values are looked at)
            self.settings = self.settings.model_copy(update={"grad_compression": "8bit"})
            make = DiLoCoOptimizer._pseudo_gradient_averager

            def joining_the_honest(opt, **kwargs):
                return make(opt, **{**kwargs, "prefix": kwargs["prefix"] + SHARED_ROUNDING_SUFFIX})

            DiLoCoOptimizer._pseudo_gradient_averager = joining_the_honest  # in this process only
        super()._make_optimizer()
        step, poison = self.opt.step, self.POISON[self.kind]
        if self.kind == "weight":
            averager_step = self.opt.grad_averager.step
            self.opt.grad_averager.step = lambda *args, **kwargs: averager_step(*args, **{**kwargs, "weight": 1e30})
        # what goes on the wire: Δ (DiLoCo), or the mean gradient, loaded right before the round (negate: exactly its
        # own, negated; with hivemind's reused gradient buffers, poisoning .grad before each step sends another sum)
        if isinstance(self.opt, DiLoCoOptimizer) or self.kind == "negate":
            averager = self.opt.grad_averager
            load = averager.load_accumulators_into_averager_

            def poisoned_load():
                load()
                with torch.no_grad(), averager.get_tensors() as deltas:
                    for delta in deltas:
                        poison(delta)

            averager.load_accumulators_into_averager_ = poisoned_load
            return

        def poisoned_step(*args, **kwargs):
            with torch.no_grad():
                for param in self.model.parameters():
                    if param.grad is not None:
                        poison(param.grad)
            return step(*args, **kwargs)

        self.opt.step = poisoned_step


class PoisonedStateMiner(Miner):
    """Trains as usual; whoever downloads its state gets NaN parameters, and it asks to be downloaded first."""

    def _make_optimizer(self) -> None:
        # patched on the class, in this process only, before the state averager exists: hivemind hands its
        # serving thread the bound method at construction, and sorts candidates by this property's value
        honest_state = SafeStateAverager.get_current_state

        def poisoned_state(averager):
            metadata, tensors, infos = honest_state(averager)
            return metadata, [torch.full_like(t, float("nan")) for t in tensors], infos

        SafeStateAverager.get_current_state = poisoned_state
        SafeStateAverager.state_sharing_priority = property(
            lambda averager: 1e9,
            lambda averager, value: DecentralizedAverager.state_sharing_priority.fset(averager, 1e9),
        )
        super()._make_optimizer()
        self.opt.state_averager.state_sharing_priority = 0  # declares 1e9


def publish_progress(settings: MinerSettings, stop: threading.Event) -> None:
    """A DHT peer of the swarm that claims, in a validly signed progress record, to be at epoch 10^9."""
    from hivemind.optim.progress_tracker import LocalTrainingProgress, ProgressTracker
    from hivemind.utils import get_dht_time

    from hivetrain.dht import make_dht
    from hivetrain.discovery import fetch_initial_peers
    from hivetrain.hivemind_compat.progress import identity_signing_key

    # signed with the DHT identity's key, as a miner signs: the record speaks for this peer and only the epoch lies
    identity = Path(settings.checkpoint_dir) / "progress-identity.key"
    identity.parent.mkdir(parents=True, exist_ok=True)
    settings = settings.model_copy(update={"identity_path": str(identity)})
    dht = make_dht(fetch_initial_peers(settings.bootstrap_url, stop=stop), **settings.dht_options())
    print(f"DHT up: peer {dht.peer_id.to_base58()}", flush=True)  # how the tests learn a peer id
    # an unstarted tracker registers the record schema and our signing key with the DHT
    key = identity_signing_key(identity.read_bytes())
    tracker = ProgressTracker(dht, settings.run_id, settings.target_batch_size, start=False, private_key=key)
    try:
        while not stop.wait(2.0):
            record = LocalTrainingProgress(
                peer_id=dht.peer_id.to_bytes(),
                epoch=10**9,
                samples_accumulated=1,
                samples_per_second=10.0,
                time=get_dht_time(),
                client_mode=False,
            )
            dht.store(
                tracker.training_progress_key,
                subkey=tracker._local_public_key,
                value=record.dict(),
                expiration_time=get_dht_time() + 30,
            )
    finally:
        dht.shutdown()


def replay(settings: MinerSettings, stop: threading.Event) -> None:
    """Register, then post every new step record of other miners back to the bootstrap, as it is and
    rewritten to credit us; what the bootstrap refused is counted in ``replay-refusals.json``."""
    wallet = load_or_create_wallet(settings.wallet_dir, settings.wallet_name, settings.wallet_hotkey)
    client, keys, domain = connect_redis(settings.redis_url), Keys(settings.run_id), domain_of(settings)
    registrar = BootstrapRegistry(settings.bootstrap_url, domain)  # a miner's Redis user only reads
    # a registration as real as any miner's: its own libp2p identity vouches for its hotkey
    identity = Path(settings.checkpoint_dir) / "replay-identity.key"
    identity.parent.mkdir(parents=True, exist_ok=True)
    if not identity.exists():
        identity.write_bytes(new_ed25519_identity())
    peer_id = identity_peer_id(identity.read_bytes())
    peer_key, peer_signature = bind(identity, domain, peer_id, wallet.hotkey.ss58_address)
    me = PeerRecord(
        peer_id=peer_id,
        role="miner",
        multiaddrs=[],
        started_at=time.time(),
        peer_key=peer_key,
        peer_signature=peer_signature,
    )
    info = client.xrevrange(keys.steps, count=1)
    last_id = info[0][0].decode() if info else "0-0"
    last_beat = 0.0
    copied: set[bytes] = set()  # each original once
    refusals = {"posted": 0, "replay": 0, "forgery": 0, "stored": 0}
    tally = Path(settings.checkpoint_dir) / "replay-refusals.json"
    while not stop.wait(0.5):
        if time.time() - last_beat > 5:
            registrar.register(me, wallet)
            last_beat = time.time()
        entries = []
        for entry_id, fields in client.xrange(keys.steps, min=f"({last_id}", count=100):
            last_id = entry_id.decode()
            raw = fields.get(b"env")
            if raw is None or raw in copied:
                continue
            copied.add(raw)
            entries += [raw.decode(), _claim_as(raw, me.peer_id).decode()]  # replayed as it is; rewritten to credit us
        if not entries:
            continue
        answer = requests.post(
            f"{settings.bootstrap_url}/v1/telemetry",
            timeout=10,
            json={"entries": [{"stream": "steps", "env": env} for env in entries]},
        )
        refusals["posted"] += len(entries)
        if answer.status_code == 200:
            body = answer.json()
            refusals["stored"] += body["stored"]
            for refused in body["refused"]:
                refusals["replay" if "replay" in refused["reason"] else "forgery"] += 1
            # an exact copy of an entry in its signer's last post is answered as a duplicate: not stored again either
            refusals["replay"] += len(body.get("duplicates", []))
        partial = tally.with_suffix(".partial")
        partial.write_text(json.dumps(refusals))
        partial.replace(tally)  # the test may read it at any moment: never a half-written file
    try:
        registrar.deregister(me.peer_id)
    except Exception:
        pass


def _claim_as(raw: bytes, peer_id: str) -> bytes:
    envelope = json.loads(raw)
    envelope["payload"]["peer_id"] = peer_id
    return json.dumps(envelope).encode()


def main() -> int:
    kind = sys.argv[1]
    settings = load_settings(MinerSettings, sys.argv[2:])
    stop = threading.Event()
    install_stop_handlers(stop)
    reset_signal_handlers_in_children()
    if kind in ("replay", "progress"):
        {"replay": replay, "progress": publish_progress}[kind](settings, stop)
        return 0
    cheaters = {"inflate": InflatingMiner, "lazy": LazyMiner, "state": PoisonedStateMiner, "freeload": FreeloadingMiner}
    miner = cheaters.get(kind, PoisoningMiner)(settings, stop)
    if isinstance(miner, PoisoningMiner):
        miner.kind = kind
    try:
        miner.setup()
        miner.train()
    finally:
        miner.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
