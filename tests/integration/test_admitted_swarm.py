"""A real swarm with ``HIVE_ADMISSION=chain``: 3 honest miners the launcher admitted, the validator, and three
strangers nobody admitted (tests/integration/cheaters.py, each with a fresh hotkey and libp2p key) attacking at
once: ``nan`` sends NaN gradients in the all-reduce, ``state`` serves NaN parameters at priority 1e9, ``progress``
publishes epoch 10^9 in properly signed progress records.

Before admission each of these reached the training path (issue 23): free keys joined groups, were asked for
their state first, and moved the epoch bound. Here the bootstrap refuses their registrations, they take part
in no gradient round of an honest miner, and the swarm learns as without them. They are refused, not named:
a stranger that is merely not admitted is no offender.
"""

from __future__ import annotations

import time

import pytest
from attack_helpers import assert_no_honest_peer_named, assert_training_survives, attacked_swarm, peer_ids
from swarm_helpers import wait_until

from hivetrain.chain import LocalChain
from hivetrain.protocol.records import Keys
from hivetrain.settings import domain_of
from hivetrain.store import Registry, connect_redis

pytestmark = pytest.mark.integration

HONEST = 3
STRANGERS = ("nan", "state", "progress")


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("admitted")
    with attacked_swarm(workdir, "admitted", HONEST, list(STRANGERS), admission="chain") as swarm:
        yield swarm


def test_only_the_admitted_miners_are_registered(swarm):
    chain = LocalChain(connect_redis(swarm.redis_url), swarm.settings.run_id)
    assert len(chain.admitted_hotkeys()) == HONEST
    honest = set(peer_ids(swarm.miners[:HONEST]))
    registry = Registry(connect_redis(swarm.redis_url), Keys(swarm.settings.run_id), domain_of(swarm.settings))
    wait_until(lambda: honest <= {p.peer_id for p in registry.live_peers(role="miner")}, 120, "the honest miners")
    strangers = set(peer_ids(swarm.miners[HONEST:]))
    time.sleep(10)  # several heartbeats of each stranger
    assert not strangers & {p.peer_id for p in registry.live_peers(limit=100)}
    refused = [(swarm.logs / f"miner-{i}.log").read_text() for i in range(HONEST, HONEST + 2)]
    assert all("not admitted" in log for log in refused), "the bootstrap did not say why it refused a stranger"


def test_no_stranger_takes_part_and_the_swarm_learns(swarm):
    honest, strangers = set(peer_ids(swarm.miners[:HONEST])), set(peer_ids(swarm.miners[HONEST:]))
    since = time.time()

    def honest_rounds():  # successful rounds of two or more peers, each merged from its members' reports
        rounds = [r for r in swarm.summary()["rounds"] if r["kind"] == "gradients" and r["time"] >= since]
        return rounds if len(rounds) >= 4 else None

    wait_until(honest_rounds, timeout=300, what="4 gradient rounds of the honest miners while the strangers run")
    assert_training_survives(swarm, HONEST)
    rounds = [r for r in swarm.summary()["rounds"] if r["kind"] == "gradients"]
    joined = [r for r in rounds if strangers & set(r["peers"])]
    assert not joined, f"a stranger averaged with admitted miners: {joined[:3]}"
    assert_no_honest_peer_named(swarm, honest)
