"""The embedded Redis keeps what it acknowledged through a crash (SIGKILL), with its users, when started again
on the same data directory; the bootstrap's ingest then carries on where it was (registry, replay marks)."""

from __future__ import annotations

import time

import pytest
from bound_peers import bound, peer_id

from hivetrain.bootstrap.app import create_app
from hivetrain.identity import Domain, SignedEnvelope, sign
from hivetrain.protocol.records import Keys, PeerRecord, StepRecord
from hivetrain.settings import BootstrapSettings
from hivetrain.store import connect_redis, read_stream
from hivetrain.swarm import procs
from hivetrain.swarm.redis_server import ROLES, acl_file, role_url, start_redis

RUN = "crash"
DOMAIN, KEYS = Domain(RUN), Keys(RUN)
ADMIN, PASSWORDS = "admin-" + "c" * 20, {role: f"{role}-" + "d" * 20 for role in ROLES}


@pytest.fixture
def persisted(tmp_path):
    """``start()`` (re)starts a persisted redis-server with the launcher's users on one port and data directory."""
    port, started = procs.free_port(), []

    def start():
        service, url = start_redis(tmp_path / "data", port=port, password=ADMIN, users=acl_file(ADMIN, PASSWORDS, RUN))
        started.append(service)
        return service, url

    yield start
    for service in started:
        service.stop(timeout=5)


def _crash(service: procs.Service) -> None:
    service.kill()  # SIGKILL: no shutdown save
    service.stop(timeout=5)


def test_every_acknowledged_write_and_every_user_survive_a_crash(persisted):
    server, url = persisted()
    client = connect_redis(url)
    for i in range(500):
        client.xadd(KEYS.steps, {"env": str(i)})
    client.set(KEYS.peer("p"), "registered", ex=300)
    client.hset(KEYS.ingest_marks("hotkey"), mapping={"p|steps": 123.5})
    _crash(server)  # well within the RDB's 60 s: only the append-only file has these
    server, again = persisted()
    assert again == url
    client = connect_redis(url)
    assert [fields[b"env"] for _, fields in client.xrange(KEYS.steps)] == [str(i).encode() for i in range(500)]
    assert client.get(KEYS.peer("p")) == b"registered" and 0 < client.ttl(KEYS.peer("p")) <= 300
    assert client.hget(KEYS.ingest_marks("hotkey"), "p|steps") == b"123.5"
    miner = connect_redis(role_url(url, "miner", PASSWORDS["miner"]))
    assert miner.xlen(KEYS.steps) == 500  # the users are back with their rules


def _entry(signer, step: int) -> dict:
    record = StepRecord(
        peer_id=peer_id("crash-writer"),
        step=step,
        local_epoch=0,
        global_epoch=0,
        loss=5.0,
        samples=step,
        samples_per_s=1.0,
        tokens_per_s=1.0,
    )
    envelope = sign(signer, DOMAIN, record.model_dump(mode="json"), timestamp=record.time)
    return {"stream": "steps", "env": SignedEnvelope.model_validate(envelope).model_dump_json()}


def test_the_ingest_answers_503_while_redis_is_down_and_then_keeps_registry_telemetry_and_replay_marks(
    persisted, wallet
):
    server, url = persisted()
    bootstrap_url = role_url(url, "bootstrap", PASSWORDS["bootstrap"])
    app = create_app(BootstrapSettings(redis_url=bootstrap_url, run_id=RUN), cache_s=0).test_client()
    record = bound(
        PeerRecord(peer_id="crash-writer", role="miner", multiaddrs=["/ip4/127.0.0.1/tcp/1"], started_at=time.time()),
        wallet.hotkey.ss58_address,
        DOMAIN,
    )
    envelope = sign(
        wallet, DOMAIN, record.model_copy(update={"hotkey": wallet.hotkey.ss58_address}).model_dump(mode="json")
    )
    assert app.post("/v1/peers", data=SignedEnvelope.model_validate(envelope).model_dump_json()).status_code == 200
    taken = [_entry(wallet, step) for step in range(1, 4)]
    assert app.post("/v1/telemetry", json={"entries": taken[:2]}).get_json()["stored"] == 2
    assert app.post("/v1/telemetry", json={"entries": taken[2:]}).get_json()["stored"] == 1
    _crash(server)
    # the miner's BootstrapSink retries a 5xx: nothing is refused for good while Redis is away
    assert app.post("/v1/telemetry", json={"entries": [_entry(wallet, 4)]}).status_code == 503
    server, _ = persisted()
    # still registered (no 409 until the next heartbeat); what was taken before the crash is still known: the
    # last post as stored already (its answer may have been lost), the one before as a replay
    answer = app.post("/v1/telemetry", json={"entries": [*taken, _entry(wallet, 4)]}).get_json()
    assert answer["stored"] == 1 and answer["duplicates"] == [2] and [r["index"] for r in answer["refused"]] == [0, 1]
    assert [r.step for r in read_stream(connect_redis(url), KEYS, DOMAIN, StepRecord)] == [1, 2, 3, 4]
