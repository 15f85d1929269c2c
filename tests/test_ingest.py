"""Miners write only through the bootstrap, and their Redis credential only reads.

Attacks from issue 10's list, made with a miner's own credential against a real redis-server run
with the launcher's ACL file, and against the bootstrap's ingest routes (the Flask app on a real
Redis; the last test posts through real HTTP to gunicorn, as a miner does).
"""

from __future__ import annotations

import json
import time

import pytest
import redis
from bound_peers import bound, peer_id

from hivetrain.bootstrap.app import create_app
from hivetrain.chain import make_chain
from hivetrain.identity import Domain, SignedEnvelope, sign
from hivetrain.miner.reporting import BootstrapRegistry, BootstrapSink, TelemetryWriter
from hivetrain.protocol.records import MAX_PEERS_PER_HOTKEY, Departure, Keys, PeerRecord, StepRecord
from hivetrain.runtime.gunicorn import start_gunicorn, stop_gunicorn
from hivetrain.settings import BootstrapSettings
from hivetrain.store import Registry, connect_redis, read_stream, shard_salt
from hivetrain.swarm import procs
from hivetrain.swarm.redis_server import ROLES, acl_file, role_url, start_redis

RUN = "ing"
DOMAIN = Domain(RUN)
KEYS = Keys(RUN)


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory):
    """A redis-server with the launcher's users: yields {"admin": url, role: url, ...}."""
    admin, passwords = "admin-" + "a" * 20, {role: f"{role}-" + "b" * 20 for role in ROLES}
    service, url = start_redis(
        tmp_path_factory.mktemp("acl-redis"), persist=False, password=admin, users=acl_file(admin, passwords, RUN)
    )
    try:
        yield {"admin": url, **{role: role_url(url, role, password) for role, password in passwords.items()}}
    finally:
        service.stop(timeout=5)


def test_a_miners_credential_reads_its_run_and_cannot_write_or_administer(acl_redis):
    admin = connect_redis(acl_redis["admin"])
    admin.flushall()
    admin.set(f"{KEYS.prefix}:chain:probe", "x")
    admin.xadd(KEYS.steps, {"env": "{}"})
    admin.set(KEYS.shard_salt, "0" * 32)
    miner = connect_redis(acl_redis["miner"])
    assert miner.get(f"{KEYS.prefix}:chain:probe") == b"x" and miner.xlen(KEYS.steps) == 1
    # what a miner reads: the shard salt at start, the chain's validators (in a MULTI/EXEC) all along
    assert shard_salt(miner, KEYS, create=False) == "0" * 32
    validator_chain = make_chain("local", redis_client=connect_redis(acl_redis["validator"]), run_id=RUN)
    validator_chain.register("5" * 48, "http://validator", "validator")
    assert [n.role for n in make_chain("local", redis_client=miner, run_id=RUN).metagraph()] == ["validator"]
    attacks = {
        "junk in the live-peer index": lambda: miner.zadd(KEYS.peer_index, {f"junk{i}": 1e12 for i in range(100)}),
        "a stream pinned by the largest explicit id": lambda: miner.xadd(
            KEYS.steps, {"env": "{}"}, id="18446744073709551615-18446744073709551615"
        ),
        "registering as a validator in the local chain": lambda: miner.hset(f"{KEYS.prefix}:chain:neurons", "0", "{}"),
        "a forged bootstrap record": lambda: miner.set(KEYS.bootstrap("QmEvil"), "{}"),
        "deleting a peer": lambda: miner.delete(KEYS.peer("QmVictim")),
        "flushing everything": lambda: miner.flushall(),
        "reading the config": lambda: miner.config_get("*"),
        "changing the ACL": lambda: miner.acl_setuser("miner", enabled=True, commands=["+@all"]),
        "a Lua script that writes": lambda: miner.eval("return redis.call('SET', KEYS[1], 'x')", 1, KEYS.peer("x")),
        "listing every key": lambda: miner.keys("*"),
        "another run's keys": lambda: miner.get("hive:other:chain:neurons"),
    }
    for name, attack in attacks.items():
        with pytest.raises(redis.exceptions.NoPermissionError):
            attack()
            pytest.fail(f"a miner's credential could do this: {name}")
    assert admin.xlen(KEYS.steps) == 1 and admin.zcard(KEYS.peer_index) == 0
    # the swarm's own services write their run's keys but cannot administer Redis
    for role in ("bootstrap", "validator"):
        service = connect_redis(acl_redis[role])
        service.set(KEYS.peer("ok"), "1")
        for forbidden in (service.flushall, lambda s=service: s.config_get("*"), lambda s=service: s.keys("*")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                forbidden()


def test_weak_or_odd_passwords_are_refused_when_the_acl_file_is_written():
    with pytest.raises(ValueError, match="16 to 128"):
        acl_file("short", {"miner": "m" * 20}, RUN)
    with pytest.raises(ValueError, match="of miner"):
        acl_file("a" * 20, {"miner": "has space " * 3}, RUN)


# --- the bootstrap's ingest ---------------------------------------------------------------------


@pytest.fixture
def app(redis_url):
    return create_app(BootstrapSettings(redis_url=redis_url, run_id=RUN, ingest_per_minute=50), cache_s=0).test_client()


def _registration(name: str, signer, domain: Domain = DOMAIN, role: str = "miner", hotkey: str | None = None) -> bytes:
    record = PeerRecord(
        peer_id=name, role=role, multiaddrs=[f"/ip4/127.0.0.1/tcp/1/p2p/{name}"], started_at=time.time()
    )
    record = bound(record, hotkey or signer.hotkey.ss58_address, domain, name=name)
    envelope = sign(
        signer,
        domain,
        record.model_copy(update={"hotkey": hotkey or signer.hotkey.ss58_address}).model_dump(mode="json"),
    )
    return SignedEnvelope.model_validate(envelope).model_dump_json().encode()


def _entry(signer, name: str, step: int, domain: Domain = DOMAIN, when: float | None = None) -> dict:
    record = StepRecord(
        peer_id=peer_id(name),
        step=step,
        local_epoch=0,
        global_epoch=0,
        loss=5.0,
        samples=step * 8,
        samples_per_s=1.0,
        tokens_per_s=100.0,
        time=when or time.time(),
    )
    envelope = sign(signer, domain, record.model_dump(mode="json"), timestamp=record.time)
    return {"stream": "steps", "env": SignedEnvelope.model_validate(envelope).model_dump_json()}


def test_registrations_through_the_bootstrap_are_checked_before_they_are_stored(app, redis_url, wallet, other_wallet):
    registry = Registry(connect_redis(redis_url), KEYS, DOMAIN)
    answer = app.post("/v1/peers", data=_registration("honest", wallet))
    assert answer.status_code == 200, answer.get_json()
    assert [p.peer_id for p in registry.live_peers()] == [peer_id("honest")]
    refused = {
        "a victim's peer id under the thief's hotkey": (
            _registration("honest", other_wallet, hotkey=wallet.hotkey.ss58_address),
            401,
        ),
        "signed for another run": (_registration("elsewhere", wallet, domain=Domain("other-run")), 401),
        "a validator registering through the miners' door": (_registration("validator", wallet, role="validator"), 403),
        "junk": (b'{"payload": {}}', 401),
        "an oversized body": (b"x" * 20_000, 413),
    }
    for name, (body, status) in refused.items():
        answer = app.post("/v1/peers", data=body)
        assert answer.status_code == status, (name, answer.get_json())
        assert answer.get_json()["error"] == "refused" and answer.get_json()["message"], name
    # one hotkey cannot fill the live-peer index with minted peer ids
    for i in range(MAX_PEERS_PER_HOTKEY - 1):
        assert app.post("/v1/peers", data=_registration(f"mint{i}", wallet)).status_code == 200
    over = app.post("/v1/peers", data=_registration("one-too-many", wallet))
    assert over.status_code == 429 and "live peers" in over.get_json()["message"]
    assert len(registry.live_peers()) == MAX_PEERS_PER_HOTKEY
    # a departure only counts from the hotkey that registered the peer
    leave = sign(other_wallet, DOMAIN, Departure(peer_id=peer_id("honest")).model_dump(mode="json"))
    assert app.post("/v1/peers/leave", data=json.dumps(leave)).status_code == 403
    assert peer_id("honest") in {p.peer_id for p in registry.live_peers(limit=50)}
    leave = sign(wallet, DOMAIN, Departure(peer_id=peer_id("honest")).model_dump(mode="json"))
    assert app.post("/v1/peers/leave", data=json.dumps(leave)).status_code == 200
    assert peer_id("honest") not in {p.peer_id for p in registry.live_peers(limit=50)}


def test_telemetry_is_stored_as_signed_under_redis_ids_and_forgeries_replays_and_floods_are_refused(
    app, redis_url, wallet, other_wallet
):
    client = connect_redis(redis_url)
    assert app.post("/v1/peers", data=_registration("writer", wallet)).status_code == 200
    # a peer that is not registered (yet) waits: nothing is lost, nothing is stored
    early = app.post("/v1/telemetry", json={"entries": [_entry(other_wallet, "stranger", 1)]})
    assert early.status_code == 409 and "not registered" in early.get_json()["message"]
    good = [_entry(wallet, "writer", step) for step in range(1, 4)]
    forged = dict(good[0], env=good[0]["env"].replace('"loss":5.0', '"loss":0.1'))
    answer = app.post(
        "/v1/telemetry", json={"entries": [*good, forged, _entry(wallet, "writer", 9, domain=Domain("x"))]}
    )
    assert answer.status_code == 200
    assert answer.get_json()["stored"] == 3
    assert [r["index"] for r in answer.get_json()["refused"]] == [3, 4]
    assert all("not a valid signed StepRecord" in r["reason"] for r in answer.get_json()["refused"])
    stored = read_stream(client, KEYS, DOMAIN, StepRecord)
    assert [r.step for r in stored] == [1, 2, 3]
    # ids are Redis's own (milliseconds of now): no writer can pin the stream with an explicit id
    newest_id = client.xrevrange(KEYS.steps, count=1)[0][0].decode()
    assert abs(int(newest_id.split("-")[0]) / 1000 - time.time()) < 60
    # a replay, by anyone, is refused and named
    replay = app.post("/v1/telemetry", json={"entries": good})
    assert replay.get_json()["stored"] == 0 and all("replay" in r["reason"] for r in replay.get_json()["refused"])
    # a flood over the hotkey's quota (50 a minute here) is 429, and takes nothing
    flood = [_entry(wallet, "writer", 100 + i) for i in range(60)]
    assert app.post("/v1/telemetry", json={"entries": flood}).status_code == 429
    assert client.xlen(KEYS.steps) == 3
    for body, status in [
        ({"entries": []}, 400),
        ({"entries": [{"stream": "evals", "env": "{}"}]}, 200),
        ({"entries": [good[0]] * 501}, 413),
        ([1, 2], 400),
    ]:
        assert app.post("/v1/telemetry", json=body).status_code == status, body
    assert app.post("/v1/telemetry", data=b"[" * 50_000, content_type="application/json").status_code == 400


def test_a_registration_carries_where_it_came_from_and_a_replay_from_elsewhere_cannot_move_it(app, redis_url, wallet):
    registry = Registry(connect_redis(redis_url), KEYS, DOMAIN)
    earlier = _registration("sourced", wallet)  # signed first, sent last: what a replayer might hold
    time.sleep(0.01)
    stored = _registration("sourced", wallet)
    assert app.post("/v1/peers", data=stored, environ_base={"REMOTE_ADDR": "10.0.0.7"}).status_code == 200
    assert [p.registered_from for p in registry.live_peers()] == ["10.0.0.7"]
    # the attacker reads registrations with its miner's Redis credential and sends them from its own address:
    # the stored one again is answered as stored, an older one is refused; neither moves the address
    again = app.post("/v1/peers", data=stored, environ_base={"REMOTE_ADDR": "10.6.6.6"})
    assert again.status_code == 200, again.get_json()
    replay = app.post("/v1/peers", data=earlier, environ_base={"REMOTE_ADDR": "10.6.6.6"})
    assert replay.status_code == 409 and "no later than the one stored" in replay.get_json()["message"]
    assert [p.registered_from for p in registry.live_peers()] == ["10.0.0.7"]
    # the miner's own next heartbeat, from wherever it now is, moves it
    moved = app.post(
        "/v1/peers", data=_registration("sourced", wallet), environ_base={"REMOTE_ADDR": "::ffff:10.0.0.8"}
    )
    assert moved.status_code == 200
    assert [p.registered_from for p in registry.live_peers()] == ["10.0.0.8"]
    # no payload can say where it came from: the field does not exist on the wire
    record = PeerRecord(peer_id="liar", role="miner", multiaddrs=["/ip4/127.0.0.1/tcp/1"], started_at=time.time())
    payload = {
        **bound(record, wallet.hotkey.ss58_address, DOMAIN, name="liar").model_dump(mode="json"),
        "registered_from": "10.0.0.5",
    }
    lie = SignedEnvelope.model_validate(sign(wallet, DOMAIN, payload)).model_dump_json().encode()
    assert app.post("/v1/peers", data=lie).status_code == 401


def test_a_miner_registers_writes_and_leaves_through_real_http(redis_url, wallet):
    port = procs.free_port()
    settings = BootstrapSettings(redis_url=redis_url, run_id=RUN, http_host="127.0.0.1", http_port=port)
    popen = start_gunicorn("hivetrain.bootstrap.app:create_app()", settings, "127.0.0.1", port, 1)
    url = f"http://127.0.0.1:{port}"
    writer = None
    try:
        registrar = BootstrapRegistry(url, DOMAIN)
        record = bound(
            PeerRecord(peer_id="http", role="miner", multiaddrs=["/ip4/127.0.0.1/tcp/1"], started_at=time.time()),
            wallet.hotkey.ss58_address,
            DOMAIN,
        )
        deadline = time.monotonic() + 120
        while True:  # gunicorn starts slowly on a busy machine
            try:
                registrar.register(record, wallet)
                break
            except Exception:
                assert popen.poll() is None and time.monotonic() < deadline, "the bootstrap did not come up"
                time.sleep(0.3)
        writer = TelemetryWriter(BootstrapSink(url), DOMAIN, wallet)
        writer.put_many(
            StepRecord(
                peer_id=record.peer_id,
                step=i,
                local_epoch=0,
                global_epoch=0,
                loss=4.0,
                samples=i,
                samples_per_s=1.0,
                tokens_per_s=1.0,
            )
            for i in range(1, 701)
        )  # two posts' worth
        writer.close(timeout=60)
        assert writer.written == 700 and writer.dropped == 0
        client = connect_redis(redis_url)
        assert [r.step for r in read_stream(client, KEYS, DOMAIN, StepRecord)] == list(range(1, 701))
        registry = Registry(client, KEYS, DOMAIN)
        assert [(p.peer_id, p.registered_from) for p in registry.live_peers()] == [(record.peer_id, "127.0.0.1")]
        registrar.deregister(record.peer_id)
        assert registry.live_peers() == []
    finally:
        if writer is not None:
            writer.close(timeout=1)
        stop_gunicorn(popen)


def test_a_post_sent_again_after_its_answer_was_lost_is_known_as_stored_not_as_a_replay(app, redis_url, wallet):
    client = connect_redis(redis_url)
    assert app.post("/v1/peers", data=_registration("writer", wallet)).status_code == 200
    now = time.time()
    first = [_entry(wallet, "writer", step, when=now + step) for step in range(1, 4)]
    assert app.post("/v1/telemetry", json={"entries": first}).get_json()["stored"] == 3
    # the answer was lost: the writer signs the same records again (same times, new nonces), with one more behind them
    again = [_entry(wallet, "writer", step, when=now + step) for step in range(1, 5)]
    answer = app.post("/v1/telemetry", json={"entries": again}).get_json()
    assert answer == {"stored": 1, "refused": [], "duplicates": [0, 1, 2]}
    # and once more (that answer lost too): all four were in the last post
    assert app.post("/v1/telemetry", json={"entries": again}).get_json() == {
        "stored": 0,
        "refused": [],
        "duplicates": [0, 1, 2, 3],
    }
    # a new post, then the first one replayed: it was not the last post any more, so it is a replay
    assert (
        app.post("/v1/telemetry", json={"entries": [_entry(wallet, "writer", 5, when=now + 5)]}).get_json()["stored"]
        == 1
    )
    replay = app.post("/v1/telemetry", json={"entries": first}).get_json()
    assert replay["stored"] == 0 and replay["duplicates"] == [] and [r["index"] for r in replay["refused"]] == [0, 1, 2]
    assert [r.step for r in read_stream(client, KEYS, DOMAIN, StepRecord)] == [1, 2, 3, 4, 5]
