"""The validator's model sync against real hivemind peers: a poisoned state is refused, an honest one adopted.

The attacker is plain hivemind, as an attacker would run it: a TrainingStateAverager under the
swarm's prefix that declares a huge state-sharing priority (hivemind downloads from the highest)
and serves NaN parameters or an epoch far beyond the swarm's.
"""

from __future__ import annotations

import time

import hivemind
import pytest
import torch
from hivemind.optim.state_averager import TrainingStateAverager

from hivetrain.models import build_model
from hivetrain.protocol.training import ClippedAdamW, param_groups
from hivetrain.validator.sync import ModelSync

pytestmark = pytest.mark.integration

RUN = "synctest"


@pytest.fixture(scope="module")
def dhts():
    serving = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    client = hivemind.DHT(start=True, client_mode=True, initial_peers=[str(a) for a in serving.get_visible_maddrs()])
    yield serving, client
    client.shutdown()
    serving.shutdown()


def _serve(dht, epoch: int, poison: bool) -> TrainingStateAverager:
    model = build_model("tiny", seed=3)
    if poison:
        with torch.no_grad():
            for param in model.parameters():
                param.fill_(float("nan"))
    averager = TrainingStateAverager(dht=dht, prefix=f"{RUN}_state_averager", optimizer=lambda p: ClippedAdamW(p, lr=1e-3),
                                     params=param_groups(model, 0.0), start=True)
    averager.local_epoch = epoch
    averager.state_sharing_priority = 1e9
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


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("epoch, poison, why", [
    (10**9, True, "NaN parameters at epoch 10^9"),
    (10**9, False, "an epoch the swarm's progress does not support"),
])
def test_a_poisoned_state_is_refused_and_the_model_kept(dhts, epoch, poison, why):
    serving, client = dhts
    sync = ModelSync(client, RUN, "tiny", seed=0, timeout_s=20, max_epoch=lambda: 7)
    attacker = _serve(serving, epoch, poison)
    try:
        before = _params(sync.model)
        assert not _sync_until(sync, lambda result: sync.averager.rejected_states > 0 or result), why
        assert sync.epoch == 0, why
        assert all(torch.equal(a, b) for a, b in zip(before, _params(sync.model))), why
        assert all(torch.isfinite(p).all() for p in sync.model.parameters())
    finally:
        attacker.shutdown()
        sync.shutdown()


def test_an_honest_state_within_the_bound_is_adopted(dhts):
    serving, client = dhts
    sync = ModelSync(client, RUN, "tiny", seed=0, timeout_s=20, max_epoch=lambda: 7)
    honest = _serve(serving, 5, poison=False)
    try:
        assert _sync_until(sync, lambda result: result)
        assert sync.epoch == 5 and sync.averager.rejected_states == 0
        assert torch.equal(next(sync.model.parameters()), next(build_model("tiny", seed=3).parameters()))
    finally:
        honest.shutdown()
        sync.shutdown()
