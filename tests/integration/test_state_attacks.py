"""A real swarm with a poisoned state server and a forged progress record; then an honest late joiner.

3 honest miners and the validator, plus (tests/integration/cheaters.py) ``state``: a miner that
trains but serves NaN parameters and declares a state-sharing priority of 1e9, so hivemind asks it
first; and ``progress``: a DHT peer whose validly signed progress record claims epoch 10^9. The
validator must refuse the poisoned state, name its server and adopt an honest peer's; a miner
joining late must do the same; the forged record must be named and left out of every honest
miner's swarm epoch; everyone keeps learning.
"""

from __future__ import annotations

import re

import pytest
from attack_helpers import (
    assert_checkpoints_finite,
    assert_no_honest_peer_named,
    assert_training_survives,
    attacked_swarm,
    peer_ids,
    wait_named,
)
from swarm_helpers import hotkey_of, peer_id_of, validator_get, wait_until

pytestmark = pytest.mark.integration

HONEST = 3


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    with attacked_swarm(tmp_path_factory.mktemp("state-attacks"), "stest", HONEST, ["state", "progress"]) as swarm:
        yield swarm


def test_the_poisoned_state_server_and_the_forged_progress_are_named(swarm):
    honest = set(peer_ids(swarm.miners[:HONEST]))
    poisoner, forger = peer_ids(swarm.miners[HONEST : HONEST + 2])
    refused = wait_named(swarm, poisoner, "state")  # by the validator's model sync, the first to download
    assert all("not a finite tensor" in o.reason for o in refused), refused
    forged = wait_until(
        lambda: (found := wait_named(swarm, forger, "progress")) and {o.peer_id for o in found} & honest and found,
        timeout=120,
        what="an honest miner to name the forged progress record",
    )
    assert all("epoch 1000000000" in o.reason for o in forged), forged
    assert_no_honest_peer_named(swarm, honest)
    epochs = [m["last_epoch"] for p, m in swarm.summary()["miners"].items() if p in honest]
    assert all(epoch is not None and epoch < 1000 for epoch in epochs), epochs


def test_the_poisoners_hotkey_is_zeroed_and_the_honest_miners_keep_their_weight(swarm):
    # the poisoner trains and answers spot checks honestly: only what its state server sent gives it away
    (poisoner,), operator = peer_ids(swarm.miners[HONEST : HONEST + 1]), hotkey_of(swarm, HONEST)
    honest = {hotkey_of(swarm, i) for i in range(HONEST)}
    wait_named(swarm, poisoner, "state")

    def zeroed():
        board = validator_get(swarm, "/api/scores")
        miners = {m["hotkey"]: m for m in board["miners"]} if board else {}
        caught = operator in miners and any(
            r.startswith("caught by this validator: peer") for r in miners[operator]["evidence"][-1]["reasons"]
        )
        return miners if caught and all(miners.get(h, {}).get("weight", 0.0) > 0 for h in honest) else None

    miners = wait_until(zeroed, timeout=420, what="a scoring round with the operator caught and every honest weight")
    assert miners[operator]["weight"] == 0.0 and miners[operator]["score"] == 0.0, miners[operator]
    assert abs(sum(m["weight"] for m in miners.values()) - 1.0) < 1e-6


def test_the_honest_miners_and_the_validator_keep_learning(swarm):
    assert_training_survives(swarm, HONEST)


def test_a_late_joiner_refuses_the_poisoned_state_and_loads_an_honest_one(swarm):
    poisoner = peer_id_of(swarm.miners[HONEST])
    wait_named(swarm, poisoner, "state")  # it has declared its priority: a joiner's download asks it first
    wait_until(
        lambda: max((m["last_epoch"] or 0 for m in swarm.summary()["miners"].values()), default=0) >= 1,
        timeout=240,
        what="the swarm to reach epoch 1 (so that a joiner must load state)",
    )
    joiner = swarm.add_miner()
    joiner_id = peer_ids([joiner])[0]
    wait_until(
        lambda: [o for o in wait_named(swarm, poisoner, "state") if o.peer_id == joiner_id],
        timeout=240,
        what="the late joiner to refuse the poisoned state",
    )
    honest = peer_ids(swarm.miners[:HONEST])
    log = wait_until(
        lambda: "loaded state from peers" in (text := joiner.log_path.read_text(errors="replace")) and text,
        timeout=120,
        what="the late joiner to load a state",
    )
    adopted = re.findall(r"verified the state from (\w+)", log)  # a refused one is named instead
    assert adopted and set(adopted) <= set(honest), f"the late joiner adopted the state of {adopted}, not of {honest}"
    assert_checkpoints_finite(swarm, [len(swarm.miners) - 1])
