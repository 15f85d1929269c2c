"""The validator's model sync against real hivemind peers: a poisoned state is refused, an honest one adopted.

The attacker is plain hivemind, as an attacker would run it: a TrainingStateAverager under the
swarm's prefix that declares a huge state-sharing priority (hivemind downloads from the highest)
and serves NaN parameters or an epoch far beyond the swarm's. It must be named (an offence with
role "state") and, when an honest peer with a lower priority also serves, that peer's state adopted.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

import hivemind
import pytest
import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2

from hivetrain.hivemind_compat import OffenceLog
from hivetrain.models import build_model
from hivetrain.protocol.admission import Admission
from hivetrain.protocol.training import ClippedAdamW, param_groups
from hivetrain.validator.sync import ModelSync

pytestmark = pytest.mark.integration

RUN = "synctest"


@pytest.fixture(scope="module")
def dhts():
    serving = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    initial_peers = [str(a) for a in serving.get_visible_maddrs()]
    second = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=initial_peers)
    client = hivemind.DHT(start=True, client_mode=True, initial_peers=initial_peers)
    yield serving, client, second
    for dht in (client, second, serving):
        dht.shutdown()


def _serve(dht, epoch: int, poison: bool, priority: float = 1e9, seed: int = 3) -> TrainingStateAverager:
    model = build_model("tiny", seed=seed)
    if poison:
        with torch.no_grad():
            for param in model.parameters():
                param.fill_(float("nan"))
    averager = TrainingStateAverager(
        dht=dht,
        prefix=f"{RUN}_state_averager",
        optimizer=lambda p: ClippedAdamW(p, lr=1e-3),
        params=param_groups(model, 0.0),
        start=True,
    )
    averager.local_epoch = epoch
    averager.state_sharing_priority = priority
    return averager


def _sync_until(sync: ModelSync, done, timeout: float = 60.0) -> bool:
    """Call sync() until ``done()`` (the serving peer's declaration takes a moment to reach the DHT)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = sync.sync()
        if done(result):
            return result
        time.sleep(1.0)
    pytest.fail(f"no verdict on the served state after {timeout:.0f}s")


def _wait_declared(dht, peers: set[str], timeout: float = 60.0) -> None:
    """Until every peer in ``peers`` has declared its state-sharing priority where a download looks."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found, _ = dht.get(f"{RUN}_state_averager.all_averagers", latest=True) or ({}, None)
        if isinstance(found, dict) and peers <= {PeerID(key).to_base58() for key in found}:
            return
        time.sleep(0.5)
    pytest.fail(f"the serving peers did not declare themselves within {timeout:.0f}s")


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "epoch, poison, why",
    [
        (10**9, True, "NaN parameters at epoch 10^9"),
        (10**9, False, "an epoch the swarm's progress does not support"),
    ],
)
def test_a_poisoned_state_is_refused_the_model_kept_and_its_server_named(dhts, epoch, poison, why):
    serving, client, _ = dhts
    sync = ModelSync(client, RUN, "tiny", seed=0, timeout_s=20, max_epoch=lambda: 7)
    attacker = _serve(serving, epoch, poison)
    named = []
    try:
        before = _params(sync.model)
        assert not _sync_until(sync, lambda result: named.extend(sync.offences.drain()) or named or result), why
        assert [(o.peer_id, o.role) for o in named] == [(serving.peer_id.to_base58(), "state")], named
        assert sync.epoch == 0, why
        assert all(torch.equal(a, b) for a, b in zip(before, _params(sync.model))), why
        assert all(torch.isfinite(p).all() for p in sync.model.parameters())
    finally:
        attacker.shutdown()
        sync.shutdown()


def test_an_honest_state_within_the_bound_is_adopted(dhts):
    serving, client, _ = dhts
    sync = ModelSync(client, RUN, "tiny", seed=0, timeout_s=20, max_epoch=lambda: 7)
    honest = _serve(serving, 5, poison=False)
    try:
        assert _sync_until(sync, lambda result: result)
        assert sync.epoch == 5 and sync.averager.rejected_states == 0
        assert torch.equal(next(sync.model.parameters()), next(build_model("tiny", seed=3).parameters()))
    finally:
        honest.shutdown()
        sync.shutdown()


def test_the_next_peer_is_asked_when_the_highest_priority_state_is_poisoned(dhts):
    serving, client, second = dhts
    sync = ModelSync(client, RUN, "tiny", seed=0, timeout_s=20, max_epoch=lambda: 7, offences=OffenceLog())
    attacker = _serve(serving, 6, poison=True, priority=1e9)
    honest = _serve(second, 5, poison=False, priority=5)
    try:
        _wait_declared(client, {serving.peer_id.to_base58(), second.peer_id.to_base58()})
        assert _sync_until(sync, lambda result: result)
        assert sync.epoch == 5
        assert all(torch.isfinite(p).all() for p in sync.model.parameters())
        named = sync.offences.drain()
        assert {(o.peer_id, o.role) for o in named} == {(serving.peer_id.to_base58(), "state")}, named
        assert "not a finite tensor" in named[0].reason
    finally:
        attacker.shutdown()
        honest.shutdown()
        sync.shutdown()


def test_a_server_no_admitted_hotkey_vouches_for_is_never_asked_for_its_state(dhts):
    """Issue 23: a plausible wrong state (finite, the right shapes, an epoch within the bound: a random init) at
    priority 1e9 was adopted at once. Its server is not admitted: the admitted server's state is adopted instead,
    and nobody is named (the stranger sent nothing to refuse)."""
    serving, client, second = dhts
    admission = Admission.fixed({second.peer_id.to_base58(): "5Honest"})
    sync = ModelSync(client, RUN, "tiny", seed=0, timeout_s=20, max_epoch=lambda: 7, admission=admission)
    stranger = _serve(serving, 6, poison=False, priority=1e9, seed=7)  # plausible, and wrong
    honest = _serve(second, 5, poison=False, priority=5)
    try:
        _wait_declared(client, {serving.peer_id.to_base58(), second.peer_id.to_base58()})
        assert _sync_until(sync, lambda result: result)
        assert sync.epoch == 5
        assert torch.equal(next(sync.model.parameters()), next(build_model("tiny", seed=3).parameters()))
        assert sync.offences.drain() == []
    finally:
        stranger.shutdown()
        honest.shutdown()
        sync.shutdown()


class DrippingAverager(TrainingStateAverager):
    """A state server that sends its metadata, then one tiny message a second, forever: each message inside the
    downloader's per-message timeout, the whole never done."""

    @classmethod
    def _get_handle_name(cls, namespace, method_name: str) -> str:
        return TrainingStateAverager._get_handle_name(namespace, method_name)  # hivemind's RPC names

    async def rpc_download_state(
        self, _request: averaging_pb2.DownloadRequest, _context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        metadata = self.serializer.dumps(dict(epoch=5))
        part = serialize_torch_tensor(torch.zeros(1))
        yield averaging_pb2.DownloadData(tensor_part=part, metadata=metadata)
        for _ in range(600):  # bounded: ten minutes
            await asyncio.sleep(1.0)
            yield averaging_pb2.DownloadData(tensor_part=runtime_pb2.Tensor(buffer=b"\0"))


def test_a_server_dripping_its_state_is_cut_off_named_and_the_next_one_adopted(dhts):
    """Issue 23: a server dripping empty messages never hit a total deadline: every sync waited out its timeout
    on it (priority 1e9, so asked first each time) and the validator's model stopped moving."""
    serving, client, second = dhts
    sync = ModelSync(client, RUN, "tiny", seed=0, timeout_s=12, max_epoch=lambda: 7, offences=OffenceLog())
    model = build_model("tiny", seed=3)
    dripping = DrippingAverager(
        dht=serving,
        prefix=f"{RUN}_state_averager",
        optimizer=lambda p: ClippedAdamW(p, lr=1e-3),
        params=param_groups(model, 0.0),
        start=True,
    )
    dripping.state_sharing_priority = 1e9
    honest = _serve(second, 5, poison=False, priority=5)
    try:
        _wait_declared(client, {serving.peer_id.to_base58(), second.peer_id.to_base58()})
        assert _sync_until(sync, lambda result: result, timeout=45)
        assert sync.epoch == 5
        named = sync.offences.drain()
        assert {(o.peer_id, o.role) for o in named} == {(serving.peer_id.to_base58(), "state")}, named
        assert "deadline" in named[0].reason
    finally:
        dripping.shutdown()
        honest.shutdown()
        sync.shutdown()
