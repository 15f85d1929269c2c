"""A real swarm with an attacker in the all-reduce: 3 honest miners, the validator, and 1 poisoning miner.

The attacker (``nan`` in tests/integration/cheaters.py) runs plain hivemind and sends NaN gradients.
The honest miners aggregate robustly (the default): they must keep finite parameters, keep
learning, name the attacker in signed telemetry and no honest peer; the validator's model must
stay finite and its held-out loss must fall.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import load_file
from swarm_helpers import peer_id_of, stop_and_check, wait_until

from hivetrain.protocol.checkpoints import latest_checkpoint
from hivetrain.protocol.records import Keys, OffenceRecord
from hivetrain.settings import SwarmSettings
from hivetrain.store import connect_redis, read_stream
from hivetrain.swarm.launcher import Swarm

pytestmark = pytest.mark.integration

HONEST = 3
ATTACKERS = ("nan",)
CHEATERS_PY = str(Path(__file__).with_name("cheaters.py"))
TEST_ENV = {
    "HIVE_TORCH_THREADS": "1",
    "HIVE_SAVE_EVERY": "2",
    "HIVE_AVERAGING_TIMEOUT": "15",
    "HIVE_SYNC_EVERY_S": "10",
    "HIVE_CHECK_EVERY_S": "15",
    "HIVE_EVAL_BLOCKS": "8",
}


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("attacks")
    settings = SwarmSettings(miners=HONEST, workdir=str(workdir), preset="tiny", bootstrap_port=0, validator_port=0,
                             run_id="atest", stop_timeout=45)
    swarm = Swarm(settings, extra_env=TEST_ENV)
    try:
        swarm.start()
        for kind in ATTACKERS:
            swarm.add_miner(env={"HIVE_ROBUST_AGGREGATION": "false"}, argv=[sys.executable, CHEATERS_PY, kind])
        yield swarm
    finally:
        stop_and_check(swarm, workdir / "summary.json")


def offences(swarm: Swarm) -> list[OffenceRecord]:
    return read_stream(connect_redis(swarm.redis_url), Keys(swarm.settings.run_id), OffenceRecord)


def test_a_nan_attacker_is_named_and_the_honest_miners_keep_learning(swarm):
    attacker = wait_until(lambda: peer_id_of(swarm.miners[HONEST]), timeout=120, what="the attacker's DHT")
    honest = wait_until(lambda: (ids := {peer_id_of(m) for m in swarm.miners[:HONEST]}) and all(ids) and ids,
                        timeout=120, what="the honest miners' DHTs")
    caught = wait_until(lambda: [o for o in offences(swarm) if o.offender == attacker], timeout=300,
                        what="an honest miner to name the attacker")
    assert {o.peer_id for o in caught} <= honest and all("NaN" in o.reason for o in caught), caught
    wrongly = [o for o in offences(swarm) if o.offender in honest]
    assert not wrongly, f"honest miners were named: {wrongly}"

    def learned():
        miners = swarm.summary()["miners"]
        return all(miners.get(p, {}).get("last_loss", 99) < miners[p]["first_loss"] - 0.3 for p in honest)

    wait_until(learned, timeout=240, what="every honest miner's loss to fall by 0.3 nats despite the attacker")
    losses = [m["last_loss"] for p, m in swarm.summary()["miners"].items() if p in honest]
    assert all(math.isfinite(loss) and loss < 1e8 for loss in losses), losses  # a NaN loss is reported as 1e9


def test_honest_checkpoints_and_the_validators_model_stay_finite(swarm):
    for index in range(HONEST):
        latest = wait_until(lambda: latest_checkpoint(Path(swarm.workdir) / f"miner-{index}"), timeout=120,
                            what=f"a checkpoint of miner-{index}")
        weights = load_file(latest / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values()), f"{latest} holds NaN"

    def evals():
        try:
            found = requests.get(f"{swarm.validator_url}/api/evals", timeout=10).json()["evals"]
        except (requests.RequestException, ValueError, KeyError):
            return None
        return found if len(found) >= 3 else None

    found = wait_until(evals, timeout=180, what="3 evaluations by the validator")
    assert all(math.isfinite(e["loss"]) for e in found)
    assert found[-1]["loss"] < found[0]["loss"]
