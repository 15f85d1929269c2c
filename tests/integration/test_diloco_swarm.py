"""A DiLoCo swarm (HIVE_MODE=diloco): 3 miners, a late joiner, a validator that scores them.

Checked: outer rounds with all 4 miners; their global parameters are identical, to the bit, at some common
epoch (each checkpoint keeps them, apart from the inner ones; 8bit-shared pseudo-gradients, the default),
the joiner's included: a miner that
stepped with its own pseudo-gradient takes up the swarm's; the joiner downloads them and catches up;
the validator's held-out loss falls and every miner earns weight (spot checks at the global
parameters pass).
"""

from __future__ import annotations

import re

import pytest
import torch
from swarm_helpers import stop_and_check, validator_get, wait_until

from hivetrain.identity import load_or_create_wallet
from hivetrain.models import build_model
from hivetrain.protocol.checkpoints import list_checkpoints
from hivetrain.protocol.training import param_groups
from hivetrain.settings import SwarmSettings
from hivetrain.swarm.launcher import Swarm

pytestmark = pytest.mark.integration

ENV = {
    "HIVE_MODE": "diloco",
    "HIVE_INNER_STEPS": "10",
    "HIVE_BATCH_SIZE": "4",
    "HIVE_LR": "0.001",
    "HIVE_SAVE_EVERY": "1",
    "HIVE_KEEP_CHECKPOINTS": "50",
    "HIVE_TORCH_THREADS": "1",
    "HIVE_AVERAGING_TIMEOUT": "15",
    "HIVE_SYNC_EVERY_S": "10",
    "HIVE_CHECK_EVERY_S": "8",
    "HIVE_WEIGHTS_EVERY_S": "20",
    "HIVE_SPOT_CHECK_TIMEOUT_S": "20",
    "HIVE_EVAL_BLOCKS": "8",
}


def _global_parameters(folder, epoch: int) -> torch.Tensor:
    """The global parameters a miner's checkpoint of ``epoch`` keeps (its optimizer state), flattened."""
    state = torch.load(folder / f"epoch-{epoch:06d}" / "optimizer.pt", weights_only=True)
    return torch.cat([t.flatten() for t in state["global"]])


def _full_rounds(swarm: Swarm, size: int) -> list[dict]:
    return [r for r in swarm.summary()["rounds"] if r["kind"] == "gradients" and r["group_size"] == size]


def test_diloco_miners_average_pseudo_gradients_agree_and_are_scored(tmp_path):
    settings = SwarmSettings(
        miners=3,
        workdir=str(tmp_path),
        preset="tiny",
        bootstrap_port=0,
        validator_port=0,
        run_id="diloco",
        stop_timeout=45,
    )
    swarm = Swarm(settings, extra_env=ENV)
    try:
        swarm.start()
        wait_until(lambda: len(_full_rounds(swarm, 3)) >= 2, timeout=300, what="2 outer rounds of the first 3 miners")
        joiner = swarm.add_miner()
        wait_until(lambda: len(_full_rounds(swarm, 4)) >= 3, timeout=300, what="3 outer rounds with the joiner in")
        assert joiner.alive()
        assert "loaded state from peers" in (tmp_path / "logs" / "miner-3.log").read_text(errors="replace")

        hotkeys = {
            load_or_create_wallet(str(tmp_path / f"miner-{i}" / "wallets"), "miner").hotkey.ss58_address
            for i in range(4)
        }

        def scored():
            board = validator_get(swarm, "/api/scores")
            if not board or board["rounds"] < 2:
                return None
            miners = {m["hotkey"]: m for m in board["miners"]}
            return board if hotkeys <= set(miners) and all(miners[h]["weight"] > 0 for h in hotkeys) else None

        board = wait_until(scored, timeout=300, what="a scoring round that gives every miner weight")
        evidence = [r for m in board["miners"] for e in m["evidence"] for r in e["reasons"]]
        assert any("spot check pass" in r for r in evidence), evidence
        evals = validator_get(swarm, "/api/evals")["evals"]
        assert len(evals) >= 2 and evals[-1]["epoch"] > evals[0]["epoch"] and evals[-1]["loss"] < evals[0]["loss"], (
            evals
        )
        # stopping the miners one by one breaks the rounds under way: a peer left alone steps with its own
        # pseudo-gradient and keeps that θ, as it should. Compare where all 4 had averaged before the stop.
        together = max(r["epoch"] for r in _full_rounds(swarm, 4) if len(r["reported_by"]) == 4)
    finally:
        stop_and_check(swarm)

    folders = [tmp_path / f"miner-{i}" for i in range(4)]
    epochs = set.intersection(*({int(p.name.split("-")[1]) for p in list_checkpoints(f)} for f in folders))
    # a miner that stepped without the group's average (its round failed, or it kept its own Δ on some
    # partitions) saves that epoch's checkpoint before it takes up the swarm's θ: those are known to differ
    missed = {
        int(step) + 1
        for i in range(4)
        for step in re.findall(
            r"outer step (\d+) without the swarm's", (tmp_path / "logs" / f"miner-{i}.log").read_text(errors="replace")
        )
    }
    epochs = {e for e in epochs if e <= together and e not in missed}
    assert epochs, f"no common checkpoint up to epoch {together} (their last round together) but {sorted(missed)}"
    init = torch.cat([p.flatten() for group in param_groups(build_model("tiny"), 0.0) for p in group["params"]])
    # 8bit-shared (DiLoCo's default): the members of a round apply the same averaged pseudo-gradient, to the bit, so
    # miners that held the same θ hold the same θ after it: identical, not merely close (hivemind's 8bit leaves each
    # its own rounding; even exact pseudo-gradients differ in the last bits). Some common epoch must show it, the
    # joiner's θ included. (Not every one: matchmaking can split the swarm into pairs that each keep a θ of their
    # own until a state round joins them; seen once, pairs apart by 2.5% of the movement: issue 27.)
    apart = {}
    for epoch in sorted(epochs):
        thetas = [_global_parameters(folder, epoch) for folder in folders]
        apart[epoch] = max((theta - thetas[0]).abs().mean().item() for theta in thetas[1:])
        if all(torch.equal(theta, thetas[0]) for theta in thetas[1:]):
            assert (thetas[0] - init).abs().mean().item() > 1e-4, f"at epoch {epoch} θ has not moved from the init"
            break
    else:
        pytest.fail(f"at no common epoch are the 4 miners' global parameters identical: mean |Δθ| by epoch {apart}")
