"""``hivetrain status`` against the validator's API under real gunicorn, over a real Redis: a miner in good
standing, one that is banned and failed its last check, and a hotkey with no live peer."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from bound_peers import KeyWallet, bound
from bound_peers import peer_id as pid
from validator_api import local_run, served

from hivetrain.protocol.records import MinerScore, OffenceRecord, PeerRecord, ScoreBoard, StepRecord
from hivetrain.status import standing
from hivetrain.store import Registry, append, connect_redis

RUN = "status"
KEYS, DOMAIN, _settings = local_run(RUN)


def _populate(redis_url: str, validator: str) -> tuple[str, str]:
    """Two registered miners at the swarm's epoch 5: ``good`` (checks pass, weight) and ``bad`` (banned by
    ``good``'s peer, its last check failed, no weight); their hotkeys."""
    db, now = connect_redis(redis_url), time.time()
    registry = Registry(db, KEYS, DOMAIN)
    wallets = {"good": KeyWallet(1), "bad": KeyWallet(2)}
    for name, wallet in wallets.items():
        record = PeerRecord(
            peer_id=pid(name), role="miner", multiaddrs=["/ip4/127.0.0.1/tcp/4000"], device="cpu", started_at=now
        )
        registry.register(bound(record, wallet.hotkey.ss58_address, DOMAIN, name=name), wallet)
        step = StepRecord(
            peer_id=pid(name),
            step=40,
            local_epoch=5,
            global_epoch=5,
            loss=6.5,
            samples=320,
            samples_per_s=4.0,
            tokens_per_s=200.0,
            time=now,
        )
        append(db, KEYS, DOMAIN, step, signer=wallet)
    offence = OffenceRecord(
        peer_id=pid("good"),
        offender=pid("bad"),
        averager="status_grad_averager",
        role="sender",
        reason="sent a part 40x the typical spread",
        banned_s=600.0,
        time=now,
    )
    append(db, KEYS, DOMAIN, offence, signer=wallets["good"])

    def score(name: str, weight: float, verdicts: list[str], reason: str) -> MinerScore:
        checks = [{"verdict": verdict, "cosine": 0.9 if verdict == "pass" else 0.1} for verdict in verdicts]
        evidence = {"claimed_samples": 320, "verified_samples": 300, "checks": checks, "reasons": [reason]}
        hotkey = wallets[name].hotkey.ss58_address
        return MinerScore(hotkey=hotkey, uid=None, peer_id=pid(name), score=weight, weight=weight, evidence=[evidence])

    miners = [
        score("good", 1.0, ["pass", "pass"], "spot check pass: cosine 0.9"),
        score("bad", 0.0, ["pass", "fail"], "spot check fail: cosine 0.1 below 0.5"),
    ]
    board = ScoreBoard(validator=validator, epoch=5, rounds=3, weights_set_at=now, miners=miners)
    db.set(KEYS.scores(validator), board.to_json())
    return wallets["good"].hotkey.ss58_address, wallets["bad"].hotkey.ss58_address


def _status(url: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hivetrain", "status", "--validator-url", url, *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_status_shows_a_miners_standing_and_exits_1_when_something_is_wrong(redis_url, wallet_dir, hotkey):
    good, bad = _populate(redis_url, hotkey)
    with served(_settings, redis_url, wallet_dir) as url:
        fine = _status(url, "--hotkey", good)
        assert fine.returncode == 0, fine.stdout + fine.stderr[-2000:]
        assert f"peer {pid('good')} on cpu: epoch 5" in fine.stdout and "problems: none" in fine.stdout
        assert "spot checks 2 passed, 0 failed (last: pass)" in fine.stdout and "weight 1.0000" in fine.stdout

        wrong = _status(url, "--hotkey", bad, "--json")
        assert wrong.returncode == 1, wrong.stderr[-2000:]
        report = json.loads(wrong.stdout)
        assert report["swarm_epoch"] == 5 and report["validator"] == hotkey
        [peer] = report["peers"]
        assert peer["banned"] and peer["offences"][0]["reason"] == "sent a part 40x the typical spread"
        problems = "\n".join(report["problems"])
        assert "is banned by 1 peer(s): sent a part 40x" in problems
        assert "last spot check failed: spot check fail: cosine 0.1 below 0.5" in problems
        assert "has no weight yet" in problems

        missing = _status(url, "--hotkey", KeyWallet(3).hotkey.ss58_address)
        assert missing.returncode == 1 and "no live peer is registered with this hotkey" in missing.stdout

    gone = _status(url, "--hotkey", good)  # the API has stopped
    assert gone.returncode == 1 and f"the validator at {url.rstrip('/')} gave no standing" in gone.stderr


def test_status_refuses_what_is_not_a_dashboard_and_a_missing_wallet(tmp_path):
    try:
        standing({"miners": "x"}, "5F")
    except ValueError as error:
        assert "not a dashboard document" in str(error)
    else:
        raise AssertionError("a malformed document was read as a dashboard")
    no_wallet = subprocess.run(
        [sys.executable, "-m", "hivetrain", "status", "--wallet-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert no_wallet.returncode == 2 and "no hotkey at" in no_wallet.stderr
    assert not any(tmp_path.iterdir()), "status created a wallet"
