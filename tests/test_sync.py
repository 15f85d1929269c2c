"""The validator's model sync against real hivemind peers: a poisoned state is refused, an honest one adopted.

The attacker is plain hivemind, as an attacker would run it: a TrainingStateAverager under the
swarm's prefix that declares a huge state-sharing priority (hivemind downloads from the highest)
and serves NaN parameters or an epoch far beyond the swarm's. It must be named (an offence with
role "state") and, when an honest peer with a lower priority also serves, that peer's state adopted.
A plausible wrong state (finite, the right shapes and epoch) is refused because two honest servers
agree with each other and not with it; two peer ids of one hotkey count as one voter.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Callable

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


@pytest.fixture(scope="module")
def third(dhts):
    """A third serving peer of the same DHT (agreement needs two honest servers beside an attacker)."""
    serving = dhts[0]
    dht = hivemind.DHT(
        start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=[str(a) for a in serving.get_visible_maddrs()]
    )
    yield dht
    dht.shutdown()


def _serve(
    dht, epoch: int, poison: bool, priority: float = 1e9, seed: int = 3, change: Callable | None = None
) -> TrainingStateAverager:
    model = build_model("tiny", seed=seed)
    with torch.no_grad():
        for index, param in enumerate(model.parameters()):
            if poison:
                param.fill_(float("nan"))
            elif change is not None:
                param.copy_(change(index, param))
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


def _a_step(index: int, param: torch.Tensor) -> torch.Tensor:
    """An honest peer one epoch on: every coordinate moved by an Adam-sized step (lr 1e-3)."""
    return param + 1e-3 * torch.randn(param.shape, generator=torch.Generator().manual_seed(index)).sign()


def _noise(index: int, param: torch.Tensor) -> torch.Tensor:
    """Honest parameters + 0.5σ Gaussian noise (σ: the tensor's own standard deviation): plausible, and wrong."""
    sigma = param.std() if param.numel() > 1 else 0.0
    return param + 0.5 * sigma * torch.randn(param.shape, generator=torch.Generator().manual_seed(100 + index))


@pytest.mark.parametrize(
    "wrong, named",
    [
        (dict(seed=7), True),  # a random init of another seed: about as far as states get (1.41), named
        (dict(change=_noise), False),  # 0.45 apart: not agreed with, nor far enough to name an honest peer for
    ],
    ids=["random-init", "noise"],
)
def test_a_plausible_wrong_state_at_priority_1e9_is_refused_and_the_agreed_state_adopted(dhts, third, wrong, named):
    """Issue 23 item 5: a plausible wrong state (finite, the right shapes, the swarm's epoch) served at priority 1e9
    was adopted because it was asked first. Two honest servers (epochs 5 and 6, a step apart) agree with each
    other and not with it: the newer honest state is adopted, and a server of a state far from both is named."""
    serving, client, second = dhts
    sync = ModelSync(client, RUN, "tiny", seed=0, timeout_s=20, max_epoch=lambda: 7, offences=OffenceLog())
    attacker = _serve(serving, 6, poison=False, priority=1e9, **wrong)
    newer = _serve(second, 6, poison=False, priority=5, change=_a_step)
    older = _serve(third, 5, poison=False, priority=4)
    try:
        _wait_declared(client, {d.peer_id.to_base58() for d in (serving, second, third)})
        assert _sync_until(sync, lambda result: result)
        assert sync.epoch == 6
        expected = build_model("tiny", seed=3)
        with torch.no_grad():
            for index, param in enumerate(expected.parameters()):
                param.copy_(_a_step(index, param))
        assert all(torch.equal(a, b) for a, b in zip(_params(sync.model), _params(expected)))
        offences = sync.offences.drain()
        if named:
            assert [(o.peer_id, o.role) for o in offences] == [(serving.peer_id.to_base58(), "state")], offences
            assert "disagreed" in offences[0].reason and "2 other voters agree on" in offences[0].reason
        else:
            assert offences == []
    finally:
        for averager in (attacker, newer, older):
            averager.shutdown()
        sync.shutdown()


def test_two_peers_of_one_hotkey_are_one_vote_and_their_wrong_state_is_not_adopted(dhts, third):
    """One hotkey, one vote: two peer ids of one admitted hotkey serving the same wrong state (at priority 1e9)
    beside one honest server of another hotkey do not agree with each other; no state is adopted (two voters
    disagree: nobody can tell who lies, so nobody is named)."""
    serving, client, second = dhts
    liars = {serving.peer_id.to_base58(), third.peer_id.to_base58()}
    admission = Admission.fixed({**{peer: "5Liar" for peer in liars}, second.peer_id.to_base58(): "5Honest"})
    sync = ModelSync(
        client, RUN, "tiny", seed=0, timeout_s=20, max_epoch=lambda: 7, offences=OffenceLog(), admission=admission
    )
    wrong = [
        _serve(dht, 6, poison=False, priority=priority, seed=7) for dht, priority in ((serving, 1e9), (third, 1e8))
    ]
    honest = _serve(second, 5, poison=False, priority=5)
    try:
        _wait_declared(client, liars | {second.peer_id.to_base58()})
        before = _params(sync.model)
        assert not any(sync.sync() for _ in range(3))
        assert sync.epoch == 0
        assert all(torch.equal(a, b) for a, b in zip(before, _params(sync.model)))
        assert sync.offences.drain() == []
    finally:
        for averager in (*wrong, honest):
            averager.shutdown()
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


def test_the_parameters_of_the_last_kept_epochs_are_held(dhts):
    """Audits recompute a round's gradients at its own epoch's parameters, seconds after it: the sync keeps the
    parameters of the ``kept`` epochs it held before the current one, and runs at any of them."""
    serving, client, _ = dhts
    sync = ModelSync(client, RUN, "tiny", seed=0, timeout_s=20, max_epoch=lambda: 7, kept=2)
    server = _serve(serving, 2, poison=False)
    held = {}
    try:
        for epoch in (2, 3, 4, 5):
            with torch.no_grad():
                for param in server.main_parameters:
                    param.add_(1.0)
            server.local_epoch = epoch
            assert _sync_until(sync, lambda result: result and sync.epoch == epoch)
            held[epoch] = _params(sync.model)
        assert sync.held_epochs() == [3, 4, 5] and not sync.holds(2)
        for epoch in (3, 4):
            with sync.parameters_at(epoch):
                assert all(torch.equal(a, b) for a, b in zip(held[epoch], _params(sync.model))), epoch
        assert all(torch.equal(a, b) for a, b in zip(held[5], _params(sync.model)))  # and back at the current one
        with pytest.raises(ValueError, match="not held"):
            with sync.parameters_at(2):
                pass
    finally:
        server.shutdown()
        sync.shutdown()
