"""The validator against a real swarm: 3 honest miners and 4 cheaters, scored over real HTTP.

Cheaters (tests/integration/cheaters.py): one reports inflated samples, one answers spot checks without
computing, one replays other miners' signed records through the bootstrap (refused there, so none reach the
validator), one trains and claims honestly but sends no part to any round (so nobody signs that they received
anything from it). The bound we hold them to: weight 0.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import requests
from swarm_helpers import hotkey_of, stop_and_check, validator_get, wait_until

from hivetrain.settings import SwarmSettings
from hivetrain.swarm.launcher import Swarm

pytestmark = pytest.mark.integration

HONEST = 3
CHEATERS = ("inflate", "lazy", "replay", "freeload", "negate")
CHEATERS_PY = str(Path(__file__).with_name("cheaters.py"))
TEST_ENV = {
    "HIVE_TORCH_THREADS": "1",
    "HIVE_LR": "0.001",
    "HIVE_SYNC_EVERY_S": "10",
    "HIVE_CHECK_EVERY_S": "8",
    "HIVE_WEIGHTS_EVERY_S": "25",
    "HIVE_SPOT_CHECK_TIMEOUT_S": "20",
    "HIVE_EVAL_BLOCKS": "8",
}
ROUNDS = 3


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("vswarm")
    settings = SwarmSettings(
        miners=HONEST,
        workdir=str(workdir),
        preset="tiny",
        bootstrap_port=0,
        validator_port=0,
        run_id="vtest",
        stop_timeout=45,
    )
    swarm = Swarm(settings, extra_env=TEST_ENV)
    try:
        swarm.start()
        for kind in CHEATERS:
            swarm.add_miner(argv=[sys.executable, CHEATERS_PY, kind])
        yield swarm
    finally:
        stop_and_check(swarm, workdir / "summary.json")


def test_honest_miners_earn_weight_and_cheaters_none(swarm):
    honest = {hotkey_of(swarm, i) for i in range(HONEST)}
    cheaters = {kind: hotkey_of(swarm, HONEST + i) for i, kind in enumerate(CHEATERS)}

    def scored():
        board = validator_get(swarm, "/api/scores")
        if not board or board["rounds"] < ROUNDS:
            return None
        miners = {m["hotkey"]: m for m in board["miners"]}
        # the cheaters start after the validator: on a loaded machine 3 rounds can pass before the first registers,
        # and the inflater's first window on the board can come before its first step
        inflater, lazy = miners.get(cheaters["inflate"]), miners.get(cheaters["lazy"])
        judged = inflater is not None and any(e["claimed_samples"] > 0 for e in inflater["evidence"])
        # and the lazy one's first spot check: a CI run reached 3 rounds with its first answer not judged yet
        checked = lazy is not None and any(r.startswith("spot check") for e in lazy["evidence"] for r in e["reasons"])
        # and a window of the freeloader's whose claims passed their check
        freeloader = miners.get(cheaters["freeload"])
        claimed = freeloader is not None and any(_claims_passed(e) for e in freeloader["evidence"])
        # and an audit of one of the negater's rounds
        negater = miners.get(cheaters["negate"])
        audited = negater is not None and any("audit:" in r for e in negater["evidence"] for r in e["reasons"])
        return board if honest <= set(miners) and judged and checked and claimed and audited else None

    board = wait_until(
        scored,
        timeout=420,
        what=f"{ROUNDS} scoring rounds, one with every honest miner, the inflater's claims and the lazy one checked",
    )
    (swarm.workdir / "board.json").write_text(json.dumps(board, indent=1))  # for a person reading a failure
    miners = {m["hotkey"]: m for m in board["miners"]}
    for hotkey in honest:
        assert miners[hotkey]["weight"] > 0, [e["reasons"] for e in miners[hotkey]["evidence"]]
    for kind, hotkey in cheaters.items():
        weight = miners[hotkey]["weight"] if hotkey in miners else 0.0
        assert weight == 0.0, (kind, miners.get(hotkey))
    assert abs(sum(m["weight"] for m in board["miners"]) - 1.0) < 1e-6

    # every score is explained by the evidence behind it
    inflated = [r for e in miners[cheaters["inflate"]]["evidence"] for r in e["reasons"]]
    assert any("DHT progress records show" in r for r in inflated), inflated
    # the freeloader's claims pass their check, but nobody received a part from it: paid nothing
    freeloaded = [e for e in miners[cheaters["freeload"]]["evidence"] if _claims_passed(e)]
    assert freeloaded and all(e["verified_samples"] == 0 for e in freeloaded), freeloaded
    assert any("the swarm received 0 samples" in r for e in freeloaded for r in e["reasons"]), freeloaded
    for hotkey in honest:
        assert any(e["verified_samples"] > 0 for e in miners[hotkey]["evidence"]), miners[hotkey]["evidence"]
    # the negater sends its gradient negated, at its honest size; its claims and spot checks are honest: an audit of
    # one of its rounds names it (the reducers received the opposite of the gradient its declared blocks give)
    negated = [r for e in miners[cheaters["negate"]]["evidence"] for r in e["reasons"]]
    assert any(re.search(r"audit: .* 0 of \d+ reducers received its gradient", r) for r in negated), negated
    lazy = [r for e in miners[cheaters["lazy"]]["evidence"] for r in e["reasons"]]
    assert any("spot check fail" in r for r in lazy) and not any("spot check pass" in r for r in lazy), lazy
    # the replayer posted copies of other miners' records through the bootstrap: refused there, so none reached the
    # validator
    tally = json.loads(
        (swarm.workdir / f"miner-{HONEST + CHEATERS.index('replay')}" / "replay-refusals.json").read_text()
    )
    assert tally["replay"] > 0 and tally["forgery"] > 0 and tally["stored"] == 0, tally
    assert board["rejected"].get("ReplayedNonce", 0) == 0 and board["rejected"].get("InvalidSignature", 0) == 0, board[
        "rejected"
    ]
    assert all(miners[h]["evidence"][-1]["passes"] >= 1 for h in honest if miners[h]["evidence"][-1]["fails"] == 0)


def _claims_passed(evidence: dict) -> bool:
    """Whether a window's claims passed the claims check (claims within what the DHT progress records showed)."""
    return evidence["claimed_samples"] > 0 and any(
        re.search(r"since first seen \d+s ago: claims \d+ samples, DHT shows \d+", reason)
        for reason in evidence["reasons"]
    )


def test_evaluation_loss_falls_and_api_answers(swarm):
    evals = wait_until(
        lambda: (e := validator_get(swarm, "/api/evals")) and len(e["evals"]) >= 3 and e,
        timeout=120,
        what="3 evaluations",
    )["evals"]
    assert evals[-1]["epoch"] > evals[0]["epoch"]
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.05
    status = validator_get(swarm, "/api/swarm")
    assert status is not None and len([p for p in status["peers"] if p["role"] == "miner"]) >= HONEST
    assert requests.get(f"{swarm.validator_url}/readyz", timeout=10).status_code == 200
