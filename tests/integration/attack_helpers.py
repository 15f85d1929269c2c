"""What the attack tests assert of every swarm with an attacker in it, whatever the attack."""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path

import requests
import torch
from safetensors.torch import load_file
from swarm_helpers import peer_id_of, stop_and_check, wait_until

from hivetrain.protocol.checkpoints import latest_checkpoint
from hivetrain.protocol.records import Keys, OffenceRecord
from hivetrain.settings import SwarmSettings, domain_of
from hivetrain.store import connect_redis, read_stream
from hivetrain.swarm.launcher import Swarm

CHEATERS_PY = str(Path(__file__).with_name("cheaters.py"))
TEST_ENV = {
    "HIVE_TORCH_THREADS": "1",
    "HIVE_SAVE_EVERY": "2",
    "HIVE_AVERAGING_TIMEOUT": "15",
    "HIVE_SYNC_EVERY_S": "10",
    "HIVE_CHECK_EVERY_S": "15",
    "HIVE_EVAL_BLOCKS": "8",
}


@contextlib.contextmanager
def attacked_swarm(
    workdir: Path,
    run_id: str,
    honest: int,
    attackers: list[str],
    env: dict[str, str] | None = None,
    admission: str = "",
):
    """A running swarm: ``honest`` miners, then one cheaters.py process per attacker kind; stopped and checked after.

    Attackers run hivemind's own all-reduce (an attacker does not run our defences for us). ``env``
    adds to every service's environment. With ``admission="chain"`` the launcher admits the honest
    miners only: the attackers are strangers.
    """
    settings = SwarmSettings(
        miners=honest,
        workdir=str(workdir),
        preset="tiny",
        bootstrap_port=0,
        validator_port=0,
        run_id=run_id,
        stop_timeout=45,
        admission=admission,
    )
    swarm = Swarm(settings, extra_env={**TEST_ENV, **(env or {})})
    try:
        swarm.start()
        for kind in attackers:
            argv = [sys.executable, CHEATERS_PY, kind]
            swarm.add_miner(env={"HIVE_ROBUST_AGGREGATION": "false"}, argv=argv, admit=False)
        yield swarm
    finally:
        stop_and_check(swarm, workdir / "summary.json")


def offences(swarm: Swarm) -> list[OffenceRecord]:
    return read_stream(
        connect_redis(swarm.redis_url), Keys(swarm.settings.run_id), domain_of(swarm.settings), OffenceRecord
    )


def peer_ids(services) -> list[str]:
    """Each service's DHT peer id, once every one has logged it."""
    return wait_until(
        lambda: (ids := [peer_id_of(s) for s in services]) and all(ids) and ids, timeout=120, what="the peers' DHTs"
    )


def wait_named(swarm: Swarm, offender: str, role: str | None, timeout: float = 300) -> list[OffenceRecord]:
    """Offence records naming ``offender`` (in ``role``, if given), once there is one."""
    return wait_until(
        lambda: [o for o in offences(swarm) if o.offender == offender and role in (None, o.role)],
        timeout=timeout,
        what=f"an honest peer to name {offender} ({role or 'any role'})",
    )


def assert_no_honest_peer_named(swarm: Swarm, honest: set[str]) -> None:
    wrongly = [o for o in offences(swarm) if o.offender in honest]
    assert not wrongly, f"honest peers were named: {wrongly}"


def assert_honest_miners_learn(swarm: Swarm, honest: set[str], by: float = 0.3) -> None:
    def learned():
        miners = swarm.summary()["miners"]
        return all(miners.get(p, {}).get("last_loss", 99) < miners[p]["first_loss"] - by for p in honest)

    wait_until(learned, timeout=240, what=f"every honest miner's loss to fall by {by} nats despite the attackers")
    losses = [m["last_loss"] for p, m in swarm.summary()["miners"].items() if p in honest]
    assert all(math.isfinite(loss) and loss < 1e8 for loss in losses), losses  # a NaN loss is reported as 1e9


def assert_checkpoints_finite(swarm: Swarm, indices) -> None:
    for index in indices:
        latest = wait_until(
            lambda: latest_checkpoint(Path(swarm.workdir) / f"miner-{index}"),
            timeout=120,
            what=f"a checkpoint of miner-{index}",
        )
        weights = load_file(latest / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values()), f"{latest} holds NaN"


def assert_training_survives(swarm: Swarm, honest: int) -> None:
    """The first ``honest`` miners keep learning and their checkpoints stay finite; so does the validator's model,
    its held-out loss falling."""
    assert_honest_miners_learn(swarm, set(peer_ids(swarm.miners[:honest])))
    assert_checkpoints_finite(swarm, range(honest))
    assert_validator_model_finite_and_learning(swarm)


def assert_validator_model_finite_and_learning(swarm: Swarm) -> None:
    def evals():
        try:
            found = requests.get(f"{swarm.validator_url}/api/evals", timeout=10).json()["evals"]
        except (requests.RequestException, ValueError, KeyError):
            return None
        return found if len(found) >= 3 and found[-1]["loss"] < found[0]["loss"] else None

    found = wait_until(evals, timeout=240, what="3 evaluations by the validator, the last below the first")
    assert all(math.isfinite(e["loss"]) for e in found), found
