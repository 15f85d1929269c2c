"""The validator's Flask app through the test client against a real redis-server, and served by real gunicorn."""

from __future__ import annotations

import json
import math
import time
import urllib.request

import pytest
from bound_peers import bound
from bound_peers import peer_id as pid
from validator_api import local_run

from hivetrain.identity import Domain
from hivetrain.protocol.records import (
    VALIDATOR_TTL_S,
    EvalRecord,
    MinerScore,
    PeerRecord,
    RoundRecord,
    ScoreBoard,
    StepRecord,
)
from hivetrain.runtime.gunicorn import WORKER_CLASS, gunicorn_argv, settings_env, start_gunicorn, stop_gunicorn
from hivetrain.settings import ValidatorSettings
from hivetrain.store import Registry, append, connect_redis
from hivetrain.swarm import procs
from hivetrain.validator.__main__ import APP_SPEC
from hivetrain.validator.app import ROUNDS_SHOWN, create_app

RUN = "vt"
KEYS, DOMAIN, _settings = local_run(RUN)


@pytest.fixture
def client(redis_url, wallet_dir):
    return create_app(_settings(redis_url, wallet_dir)).test_client()


@pytest.fixture
def db(redis_url):
    return connect_redis(redis_url)


def _peer(name: str, role: str = "miner") -> PeerRecord:
    return PeerRecord(
        peer_id=name,
        role=role,
        multiaddrs=[f"/ip4/127.0.0.1/tcp/1/p2p/{name}"],
        device="cpu",
        preset="tiny",
        started_at=time.time(),
    )


def _register(registry: Registry, name: str, signer, role: str = "miner") -> None:
    """Register the test peer called ``name`` as a miner does: its own libp2p key vouches for ``signer``'s hotkey."""
    registry.register(bound(_peer(name, role), signer.hotkey.ss58_address, DOMAIN), signer)


def _step(name: str, step: int, tokens_per_s: float, global_epoch: int = 0, loss: float = 5.0) -> StepRecord:
    return StepRecord(
        peer_id=pid(name),
        step=step,
        local_epoch=global_epoch,
        global_epoch=global_epoch,
        loss=loss,
        samples=8 * (step + 1),
        samples_per_s=1.0,
        tokens_per_s=tokens_per_s,
    )


def _eval(epoch: int, loss: float = 4.0) -> EvalRecord:
    return EvalRecord(
        validator="5Val", epoch=epoch, loss=loss, perplexity=math.exp(loss), blocks=4, tokens=1024, duration_s=0.5
    )


def _board(hotkey: str) -> ScoreBoard:
    evidence = {
        "miner": "5Miner",
        "verified_samples": 64,
        "claimed_samples": 64,
        "share": 1.0,
        "passes": 2,
        "fails": 0,
        "pass_rate": 1.0,
        "round_score": 1.0,
        "alpha": 0.3,
        "previous_ema": 0.0,
        "new_ema": 0.3,
        "reasons": ["claimed samples match hivemind progress", "spot check 1 passed"],
    }
    miner = MinerScore(hotkey="5Miner", uid=1, peer_id=pid("QmA"), score=0.3, weight=1.0, evidence=[evidence])
    return ScoreBoard(validator=hotkey, uid=0, epoch=3, rounds=1, weights_set_at=time.time(), miners=[miner])


def test_swarm_lists_live_peers_latest_steps_throughput_and_rounds(client, db, wallet, other_wallet):
    registry = Registry(db, KEYS, DOMAIN)
    _register(registry, "QmA", wallet)
    _register(registry, "QmB", other_wallet)
    _register(registry, "QmV", other_wallet, role="validator")
    for record, signer in [
        (_step("QmA", 0, 100.0, global_epoch=2), wallet),
        (_step("QmA", 1, 120.0, global_epoch=3), wallet),
        (_step("QmB", 0, 80.0, global_epoch=3), other_wallet),
        (_step("QmGone", 0, 999.0, global_epoch=9), wallet),
    ]:  # not registered: not counted
        append(db, KEYS, DOMAIN, record, signer=signer)
    for epoch in range(1, ROUNDS_SHOWN + 3):
        for member in (pid("QmA"), pid("QmB")):
            append(
                db,
                KEYS,
                DOMAIN,
                RoundRecord(
                    peer_id=member,
                    epoch=epoch,
                    group_size=2,
                    group=[pid("QmA"), pid("QmB")],
                    duration_s=0.5,
                    success=True,
                ),
                signer=wallet,
            )
    append(
        db,
        KEYS,
        DOMAIN,
        RoundRecord(peer_id=pid("QmA"), epoch=99, group_size=2, duration_s=1.0, success=False),
        signer=wallet,
    )

    response = client.get("/api/swarm")
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
    body = response.get_json()
    assert set(body) == {"run_id", "validator_time", "peers", "global_epoch", "throughput_tokens_per_s", "rounds"}
    peers = {peer["peer_id"]: peer for peer in body["peers"]}
    assert set(peers) == {pid("QmA"), pid("QmB"), pid("QmV")}
    assert (
        peers[pid("QmA")]["hotkey"] == wallet.hotkey.ss58_address
        and peers[pid("QmB")]["hotkey"] == other_wallet.hotkey.ss58_address
    )
    assert set(peers[pid("QmA")]) == {
        "peer_id",
        "role",
        "hotkey",
        "device",
        "preset",
        "multiaddrs",
        "last_seen",
        "latest_step",
    }
    assert peers[pid("QmA")]["latest_step"] == {
        "step": 1,
        "local_epoch": 3,
        "global_epoch": 3,
        "loss": 5.0,
        "samples": 16,
        "tokens_per_s": 120.0,
        "time": pytest.approx(time.time(), abs=30),
    }
    assert peers[pid("QmV")]["role"] == "validator" and peers[pid("QmV")]["latest_step"] is None
    assert body["throughput_tokens_per_s"] == 200.0 and body["global_epoch"] == 3
    rounds = body["rounds"]
    assert len(rounds) == ROUNDS_SHOWN and [r["epoch"] for r in rounds] == list(range(3, ROUNDS_SHOWN + 3))
    pair = sorted([pid("QmA"), pid("QmB")])
    assert rounds[-1]["peers"] == pair and rounds[-1]["reported_by"] == pair


def test_forged_telemetry_does_not_appear(client, db, wallet, other_wallet):
    _register(Registry(db, KEYS, DOMAIN), "QmA", wallet)
    append(db, KEYS, DOMAIN, _step("QmA", 0, 100.0), signer=wallet)
    append(db, KEYS, DOMAIN, _step("QmA", 1, 100.0), signer=wallet)
    # QmA's own signature on an altered body
    _, fields = db.xrevrange(KEYS.steps, count=1)[0]
    envelope = json.loads(fields[b"env"])
    envelope["payload"].update(step=7, tokens_per_s=1e9)
    db.xadd(KEYS.steps, {"env": json.dumps(envelope)})
    # a valid signature by a hotkey that is not QmA's registration: an impostor speaking for QmA
    append(db, KEYS, DOMAIN, _step("QmA", 8, 1e9, global_epoch=50), signer=other_wallet)

    body = client.get("/api/swarm").get_json()
    (peer,) = body["peers"]
    assert peer["latest_step"]["step"] == 1 and peer["latest_step"]["tokens_per_s"] == 100.0
    assert body["throughput_tokens_per_s"] == 100.0 and body["global_epoch"] == 0


def test_a_validator_of_another_subnet_sees_none_of_this_subnets_records(redis_url, wallet_dir, db, wallet):
    """Two subnets of one run id share a Redis: each validator API counts the records signed for its own netuid only."""
    subnet_1 = Domain(RUN, 1)
    registry = Registry(db, KEYS, subnet_1)
    registry.register(bound(_peer("QmA"), wallet.hotkey.ss58_address, subnet_1), wallet)
    append(db, KEYS, subnet_1, _step("QmA", 0, 100.0, global_epoch=4), signer=wallet)
    append(
        db,
        KEYS,
        subnet_1,
        RoundRecord(peer_id=pid("QmA"), epoch=4, group_size=2, duration_s=0.5, success=True),
        signer=wallet,
    )
    views = {
        netuid: create_app(_settings(redis_url, wallet_dir, chain="bittensor", netuid=netuid))
        .test_client()
        .get("/api/swarm")
        .get_json()
        for netuid in (1, 2)
    }
    assert [(p["peer_id"], p["latest_step"]["step"]) for p in views[1]["peers"]] == [(pid("QmA"), 0)]
    assert views[1]["global_epoch"] == 4 and len(views[1]["rounds"]) == 1
    assert views[2]["peers"] == [] and views[2]["rounds"] == [] and views[2]["global_epoch"] is None
    local = create_app(_settings(redis_url, wallet_dir)).test_client().get("/api/swarm").get_json()
    assert local["peers"] == [] and local["rounds"] == []


def test_empty_swarm(client):
    body = client.get("/api/swarm").get_json()
    assert body["peers"] == [] and body["rounds"] == [] and body["global_epoch"] is None
    assert body["throughput_tokens_per_s"] == 0


def test_scores_404_before_the_first_board_then_the_board_with_evidence(client, db, hotkey, other_wallet):
    missing = client.get("/api/scores")
    assert missing.status_code == 404 and missing.is_json
    assert "has not scored yet" in missing.get_json()["message"] and hotkey in missing.get_json()["message"]

    db.set(KEYS.scores(hotkey), _board(hotkey).to_json())
    body = client.get("/api/scores").get_json()
    assert body["validator"] == hotkey and body["rounds"] == 1 and body["epoch"] == 3
    (miner,) = body["miners"]
    assert {k: miner[k] for k in ("hotkey", "uid", "score", "weight")} == {
        "hotkey": "5Miner",
        "uid": 1,
        "score": 0.3,
        "weight": 1.0,
    }
    assert miner["evidence"][0]["round_score"] == 1.0 and miner["evidence"][0]["reasons"]

    other = other_wallet.hotkey.ss58_address
    assert client.get("/api/scores", query_string={"validator": other}).status_code == 404
    db.set(KEYS.scores(other), _board(other).to_json())
    assert client.get("/api/scores", query_string={"validator": other}).get_json()["validator"] == other


@pytest.mark.parametrize(
    "bad", ["", "short", "5" * 61, "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQ!", "../../etc/passwd" * 3]
)
def test_scores_reject_implausible_hotkeys(client, bad):
    response = client.get("/api/scores", query_string={"validator": bad})
    assert response.status_code == 400 and "ss58 hotkey" in response.get_json()["message"]


def test_malformed_board_is_a_503_not_a_500(client, db, hotkey):
    db.set(KEYS.scores(hotkey), '{"validator": 1}')
    response = client.get("/api/scores")
    assert response.status_code == 503 and response.get_json()["error"] == "score board unreadable"


def test_evals_oldest_first_with_limit_and_latest(client, db):
    assert client.get("/api/evals").get_json() == {"evals": [], "latest": None, "count": 0}
    for epoch in range(5):
        append(db, KEYS, DOMAIN, _eval(epoch, loss=5.0 - epoch))
    body = client.get("/api/evals").get_json()
    assert [e["epoch"] for e in body["evals"]] == [0, 1, 2, 3, 4] and body["count"] == 5
    body = client.get("/api/evals?limit=2").get_json()
    assert (
        [e["epoch"] for e in body["evals"]] == [3, 4] and body["latest"]["epoch"] == 4 and body["latest"]["loss"] == 1.0
    )


def test_non_finite_floats_are_null_so_the_answer_stays_json(client):
    # a diverged loss or an overflowed perplexity must not produce NaN/Infinity, which JSON parsers reject
    assert json.loads(client.application.json.dumps({"loss": math.nan, "ppl": [math.inf], "ok": 1.5})) == {
        "loss": None,
        "ppl": [None],
        "ok": 1.5,
    }


@pytest.mark.parametrize("bad", ["0", "10001", "-1", "x", "", "1.5", " 3", "9999999"])
def test_evals_bad_limit_is_a_json_400(client, bad):
    response = client.get("/api/evals", query_string={"limit": bad})
    assert response.status_code == 400 and "limit must be an integer from 1 to 10000" in response.get_json()["message"]


def test_readyz_follows_the_alive_key(client, db, hotkey):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    response = client.get("/readyz")
    assert response.status_code == 503 and "not running" in response.get_json()["reason"]
    db.set(KEYS.validator_alive(hotkey), "1", ex=VALIDATOR_TTL_S)
    assert client.get("/readyz").get_json() == {"status": "ok", "validator": hotkey}


def test_redis_down_is_503_json_never_500(wallet_dir):
    client = create_app(_settings(f"redis://127.0.0.1:{procs.free_port()}/0", wallet_dir)).test_client()
    for path in ("/api/swarm", "/api/scores", "/api/evals", "/readyz"):
        response = client.get(path)
        assert response.status_code == 503 and response.is_json, path
    assert client.get("/healthz").status_code == 200
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "hive_validator_redis_errors_total 5.0" in metrics.text


def test_metrics_gauges_and_request_counts(client, db, hotkey, wallet, other_wallet):
    assert "hive_validator_latest_eval_loss NaN" in client.get("/metrics").text
    registry = Registry(db, KEYS, DOMAIN)
    _register(registry, "QmA", wallet)
    _register(registry, "QmB", other_wallet)
    _register(registry, "QmV", other_wallet, role="validator")
    append(db, KEYS, DOMAIN, _eval(0, loss=4.5))
    append(db, KEYS, DOMAIN, _eval(1, loss=3.25))
    db.set(KEYS.scores(hotkey), _board(hotkey).to_json())
    client.get("/api/evals")
    client.get("/api/evals?limit=x")
    client.get("/nope")
    text = client.get("/metrics").text
    assert "hive_validator_latest_eval_loss 3.25" in text
    assert "hive_validator_scored_miners 1.0" in text and "hive_validator_live_miners 2.0" in text
    assert 'hive_validator_http_requests_total{route="/api/evals",status="200"} 1.0' in text
    assert 'hive_validator_http_requests_total{route="/api/evals",status="400"} 1.0' in text
    assert 'hive_validator_http_requests_total{route="<unmatched>",status="404"} 1.0' in text
    assert 'hive_validator_http_request_duration_seconds_count{route="/api/evals"} 2.0' in text


def test_unknown_route_and_wrong_method_are_json(client):
    missing = client.get("/api/nope")
    assert missing.status_code == 404 and missing.get_json()["error"] == "Not Found"
    wrong = client.post("/api/scores")
    assert wrong.status_code == 405 and wrong.is_json and "GET" in wrong.headers["Allow"]


def test_settings_from_env(redis_url, wallet_dir, hotkey, monkeypatch):
    monkeypatch.setenv("HIVE_REDIS_URL", redis_url)
    monkeypatch.setenv("HIVE_RUN_ID", RUN)
    monkeypatch.setenv("HIVE_WALLET_DIR", wallet_dir)
    assert hotkey in create_app().test_client().get("/api/scores").get_json()["message"]
    monkeypatch.setenv("HIVE_API_PORT", "0")
    with pytest.raises(SystemExit, match="HIVE_API_PORT"):
        create_app()


def test_gunicorn_argv_and_env(redis_url, wallet_dir, monkeypatch):
    monkeypatch.setenv("HIVE_STRAY", "x")
    settings = _settings(redis_url, wallet_dir, api_host="127.0.0.1", api_port=8123, api_workers=3)
    argv = gunicorn_argv(APP_SPEC, settings.api_host, settings.api_port, settings.api_workers, settings.log_level)
    assert argv[-1] == APP_SPEC == "hivetrain.validator.app:create_app()"
    assert "--no-control-socket" in argv and argv[argv.index("--bind") + 1] == "127.0.0.1:8123"
    assert argv[argv.index("--workers") + 1] == "3" and argv[argv.index("--worker-class") + 1] == WORKER_CLASS
    env = settings_env(settings)
    assert env["HIVE_API_PORT"] == "8123" and env["HIVE_WALLET_DIR"] == wallet_dir and "HIVE_STRAY" not in env
    monkeypatch.delenv("HIVE_STRAY")
    for name, value in env.items():
        if name.startswith("HIVE_"):
            monkeypatch.setenv(name, value)
    assert ValidatorSettings() == settings  # what the workers rebuild is what the service holds


@pytest.mark.integration
def test_served_by_gunicorn(redis_url, wallet_dir):
    port = procs.free_port()
    settings = _settings(redis_url, wallet_dir, api_host="127.0.0.1", api_port=port, api_workers=1)
    popen = start_gunicorn(APP_SPEC, settings, settings.api_host, settings.api_port, settings.api_workers)
    try:
        deadline, answer = time.monotonic() + 60, None
        while answer is None and time.monotonic() < deadline:
            assert popen.poll() is None, f"gunicorn exited with {popen.returncode}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
                    answer = (response.status, json.loads(response.read()))
            except OSError:  # not listening yet
                time.sleep(0.2)
        assert answer == (200, {"status": "ok"})
        workers = procs.children(popen.pid)
        assert workers
    finally:
        stop_gunicorn(popen)
    assert popen.returncode is not None
    deadline = time.monotonic() + 10
    while any(procs.is_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(procs.is_running(pid) for pid in workers)
