"""Registry and telemetry against a real redis-server."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis
from bound_peers import bound
from bound_peers import peer_id as pid
from redis_sink import RedisSink

from hivetrain.discovery import BootstrapUnavailable, wait_for_shard_salt
from hivetrain.identity import Domain, InvalidSignature
from hivetrain.miner.reporting import TelemetryWriter
from hivetrain.protocol.records import BootstrapRecord, Keys, PeerRecord, RoundRecord, StepRecord
from hivetrain.settings import BootstrapSettings, MinerSettings, ValidatorSettings, domain_of
from hivetrain.store import (
    Registry,
    append,
    connect_redis,
    is_shard_salt,
    read_stream,
    redacted,
    shard_salt,
)
from hivetrain.swarm import procs
from hivetrain.swarm.redis_server import start_redis


def _peer(peer_id: str, role: str = "miner") -> PeerRecord:
    return PeerRecord(
        peer_id=peer_id, role=role, multiaddrs=[f"/ip4/127.0.0.1/tcp/1/p2p/{peer_id}"], started_at=time.time()
    )


def _register(registry: Registry, name: str, signer, role: str = "miner") -> None:
    """Register the test peer called ``name`` as a miner does: its own libp2p key vouches for ``signer``'s hotkey."""
    registry.register(bound(_peer(name, role), signer.hotkey.ss58_address, registry.domain), signer)


def _step(peer_id: str, step: int) -> StepRecord:
    return StepRecord(
        peer_id=peer_id,
        step=step,
        local_epoch=0,
        global_epoch=0,
        loss=1.0,
        samples=step,
        samples_per_s=1.0,
        tokens_per_s=1.0,
    )


def test_registry_lists_freshest_first_and_expires(redis_url, wallet):
    registry = Registry(connect_redis(redis_url), Keys("t"), Domain("t"), ttl_s=2)
    for name in ("a", "b", "c"):
        _register(registry, name, wallet)
        time.sleep(0.01)
    assert [p.peer_id for p in registry.live_peers()] == [pid("c"), pid("b"), pid("a")]
    assert [p.peer_id for p in registry.live_peers(limit=2)] == [pid("c"), pid("b")]
    assert registry.live_peer(pid("b")) == registry.live_peers()[1] and registry.live_peer("QmNobody") is None
    registry.deregister(pid("b"))
    assert [p.peer_id for p in registry.live_peers()] == [pid("c"), pid("a")]
    assert registry.live_peer(pid("b")) is None
    assert registry.client.ttl(registry.keys.peer(pid("a"))) > 0
    time.sleep(2.2)
    assert registry.live_peers() == [] and registry.live_peer(pid("a")) is None


def test_registry_filters_role_and_skips_malformed(redis_url, wallet):
    registry = Registry(connect_redis(redis_url), Keys("t"), Domain("t"))
    _register(registry, "m1", wallet)
    _register(registry, "v1", wallet, role="validator")
    registry.client.set(registry.keys.peer("bad"), b'{"peer_id": 3}')
    registry.client.zadd(registry.keys.peer_index, {"bad": time.time()})
    assert [p.peer_id for p in registry.live_peers(role="miner")] == [pid("m1")]
    assert {p.peer_id for p in registry.live_peers()} == {pid("m1"), pid("v1")}


def test_bootstrap_records(redis_url):
    registry = Registry(connect_redis(redis_url), Keys("t"), Domain("t"))
    registry.set_bootstrap(BootstrapRecord(peer_id="boot", multiaddrs=["/ip4/127.0.0.1/tcp/5/p2p/boot"]))
    assert [b.peer_id for b in registry.bootstraps()] == ["boot"]
    registry.remove_bootstrap("boot")
    assert registry.bootstraps() == []


def test_runs_do_not_see_each_other(redis_url, wallet):
    client = connect_redis(redis_url)
    _register(Registry(client, Keys("one"), Domain("one")), "a", wallet)
    assert Registry(client, Keys("two"), Domain("two")).live_peers() == []


def test_streams_are_signed_and_typed(redis_url, wallet):
    client, keys, domain = connect_redis(redis_url), Keys("t"), Domain("t")
    for i in range(5):
        append(client, keys, domain, _step("a", i), wallet)
    append(
        client,
        keys,
        domain,
        RoundRecord(peer_id="a", epoch=1, group_size=2, group=["a", "b"], duration_s=0.5, success=True),
        wallet,
    )
    with pytest.raises(ValueError, match="signed"):
        append(client, keys, domain, _step("a", 9))
    assert [r.step for r in read_stream(client, keys, domain, StepRecord)] == [0, 1, 2, 3, 4]
    assert [r.step for r in read_stream(client, keys, domain, StepRecord, count=2)] == [3, 4]
    assert read_stream(client, keys, domain, RoundRecord)[0].group == ["a", "b"]


def test_telemetry_survives_redis_restart(tmp_path, wallet):
    port = procs.free_port()
    server, url = start_redis(tmp_path / "r1", port=port, persist=False)
    writer = TelemetryWriter(
        RedisSink(connect_redis(url, timeout=0.5), Keys("t")), Domain("t"), signer=wallet, max_backoff_s=0.3
    )
    try:
        writer.put(_step("a", 0))
        server.stop(timeout=5)
        started = time.monotonic()
        for i in range(1, 4):
            writer.put(_step("a", i))  # must return at once while Redis is down
        assert time.monotonic() - started < 0.5
        time.sleep(0.5)
        server, url = start_redis(tmp_path / "r2", port=port, persist=False)
        writer.close(timeout=10)
        steps = [r.step for r in read_stream(connect_redis(url), Keys("t"), Domain("t"), StepRecord)]
        assert steps[-3:] == [1, 2, 3]
        assert writer.dropped == 0
    finally:
        server.stop(timeout=5)


def test_telemetry_drops_oldest_when_full(redis_url, wallet):
    client = redis.Redis(host="127.0.0.1", port=procs.free_port(), socket_timeout=0.2, socket_connect_timeout=0.2)
    writer = TelemetryWriter(RedisSink(client, Keys("t")), Domain("t"), wallet, max_queue=3, max_backoff_s=0.2)
    for i in range(10):
        writer.put(_step("a", i))
    assert writer.dropped == 7
    assert [r.step for r in writer._queue] == [7, 8, 9]
    writer.close(timeout=0.2)


def test_record_schemas_are_strict():
    with pytest.raises(ValueError):
        StepRecord(
            peer_id="a", step="1", local_epoch=0, global_epoch=0, loss=1.0, samples=0, samples_per_s=0, tokens_per_s=0
        )
    with pytest.raises(ValueError):
        PeerRecord.from_json('{"peer_id": "a", "role": "miner", "multiaddrs": [], "started_at": 1.0, "extra": 1}')
    with pytest.raises(ValueError):
        Keys("has:colon")


def _tamper(client, key: str, **changes) -> None:
    envelope = json.loads(client.get(key))
    envelope["payload"].update(changes)
    client.set(key, json.dumps(envelope))


def test_registry_drops_forged_and_misfiled_records(redis_url, wallet, other_wallet):
    registry = Registry(connect_redis(redis_url), Keys("t"), Domain("t"))
    _register(registry, "honest", wallet)
    _register(registry, "victim", other_wallet)
    # someone with Redis access edits a record: the signature no longer covers it
    _tamper(registry.client, registry.keys.peer(pid("victim")), multiaddrs=["/ip4/6.6.6.6/tcp/1/p2p/evil"])
    # a valid record copied under another peer's key
    registry.client.set(registry.keys.peer("copy"), registry.client.get(registry.keys.peer(pid("honest"))))
    registry.client.zadd(registry.keys.peer_index, {"copy": time.time()})
    assert [p.peer_id for p in registry.live_peers()] == [pid("honest")]
    assert registry.live_peers()[0].hotkey == wallet.hotkey.ss58_address
    assert registry.live_peer(pid("victim")) is None and registry.live_peer("copy") is None


def test_registry_drops_records_whose_heartbeat_stopped(redis_url, wallet):
    registry = Registry(connect_redis(redis_url), Keys("t"), Domain("t"), ttl_s=60)
    _register(registry, "a", wallet)
    registry.verifier.window_s = 0.2  # the key lives on, but the signed timestamp is old
    time.sleep(0.3)
    assert registry.live_peers() == []


def test_stream_history_drops_tampered_records(redis_url, wallet):
    client, keys, domain = connect_redis(redis_url), Keys("t"), Domain("t")
    append(client, keys, domain, _step("a", 0), wallet)
    append(client, keys, domain, _step("a", 1), wallet)
    entry_id, fields = client.xrange(keys.steps)[0]
    envelope = json.loads(fields[b"env"])
    envelope["payload"]["samples"] = 10**9  # an inflated claim under someone else's signature
    client.xadd(keys.steps, {"env": json.dumps(envelope)})
    assert [r.step for r in read_stream(client, keys, domain, StepRecord)] == [0, 1]


def test_a_password_protected_redis_refuses_anonymous_clients(tmp_path):
    server, url = start_redis(tmp_path / "r", persist=False, password="s3cret-for-this-test")
    try:
        assert url.startswith("redis://:s3cret-for-this-test@127.0.0.1:")
        assert connect_redis(url).ping()
        anonymous = redis.Redis.from_url(url.replace(":s3cret-for-this-test@", ""), socket_timeout=2)
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        config = tmp_path / "r" / "auth.conf"  # given to redis-server as a file, not as a command-line argument
        assert (
            "s3cret-for-this-test" in config.read_text() and config.stat().st_mode & 0o077 == 0
        )  # only we can read it
    finally:
        server.stop(timeout=5)


def test_redacted_urls_keep_everything_but_the_password():
    assert redacted("redis://:pw@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redacted("rediss://user:p%40w@[::1]:7000/2") == "rediss://user:***@[::1]:7000/2"
    assert redacted("redis://r:6379/0") == "redis://r:6379/0"


def test_a_hotkey_cannot_register_a_peer_id_whose_key_it_does_not_hold(redis_url, wallet, other_wallet):
    """The reward theft: a thief registers a victim's peer id under its own hotkey, to be credited with
    the victim's work and sent its spot checks. Each way of trying it is dropped by every reader."""
    registry = Registry(connect_redis(redis_url), Keys("t"), Domain("t"))
    _register(registry, "victim", wallet)
    (victim,) = registry.live_peers()
    attempts = {
        "the victim's binding copied": victim,
        "no binding": victim.model_copy(update={"peer_key": "", "peer_signature": ""}),
        "the thief's own key": bound(_peer("thief"), other_wallet.hotkey.ss58_address, Domain("t")).model_copy(
            update={"peer_id": victim.peer_id}
        ),
    }
    for attempt, record in attempts.items():
        registry.register(record, other_wallet)  # signed by the thief: its hotkey goes into the record
        assert registry.live_peers() == [], attempt
    _register(registry, "victim", wallet)  # the victim's next heartbeat
    assert [(p.peer_id, p.hotkey) for p in registry.live_peers()] == [(pid("victim"), wallet.hotkey.ss58_address)]


# --- the signature domain: records of one run or subnet are forgeries in any other ------------------
#: (signed in, read in). Runs have their own Redis namespaces, so the attacker copies the record across;
#: subnets of one run id share the namespace, so the other subnet's reader finds it where it is.
CROSS_DOMAIN = {
    "another run": (Domain("run-a"), Domain("run-b")),
    "another subnet": (Domain("run-a", 1), Domain("run-a", 2)),
    "a bittensor record on the local chain": (Domain("run-a", 1), Domain("run-a")),
}


def _copy_registration(client, source: Keys, target: Keys, peer_id: str) -> bytes:
    raw = client.get(source.peer(peer_id))
    client.set(target.peer(peer_id), raw, ex=60)
    client.zadd(target.peer_index, {peer_id: time.time()})
    return raw


@pytest.mark.parametrize("signed_in, read_in", CROSS_DOMAIN.values(), ids=CROSS_DOMAIN)
def test_a_registration_replayed_into_another_run_or_subnet_is_refused(redis_url, wallet, signed_in, read_in):
    client = connect_redis(redis_url)
    home = Registry(client, Keys(signed_in.run_id), signed_in)
    _register(home, "miner", wallet)
    raw = _copy_registration(client, home.keys, Keys(read_in.run_id), pid("miner"))
    elsewhere = Registry(client, Keys(read_in.run_id), read_in)
    assert elsewhere.live_peers() == []
    with pytest.raises(InvalidSignature, match=str(read_in)):  # refused as a forgery: the domain is signed
        elsewhere.verifier.authenticate(raw)
    assert [p.peer_id for p in home.live_peers()] == [pid("miner")]  # in its own run and subnet it holds


@pytest.mark.parametrize("signed_in, read_in", CROSS_DOMAIN.values(), ids=CROSS_DOMAIN)
def test_step_records_replayed_into_another_run_or_subnet_are_refused(redis_url, wallet, signed_in, read_in):
    client, home, there = connect_redis(redis_url), Keys(signed_in.run_id), Keys(read_in.run_id)
    for i in range(3):
        append(client, home, signed_in, _step(pid("miner"), i), wallet)
    if there.steps != home.steps:
        for _, fields in client.xrange(home.steps):
            client.xadd(there.steps, fields)  # replayed byte for byte
    assert read_stream(client, there, read_in, StepRecord) == []
    assert [r.step for r in read_stream(client, home, signed_in, StepRecord)] == [0, 1, 2]


def test_the_netuid_comes_from_the_bittensor_setting_alone(redis_url, wallet):
    """Without touching the network: two subnets of one run id, their services configured as in production."""
    client, keys = connect_redis(redis_url), Keys("run-a")
    miner_1 = domain_of(MinerSettings(run_id="run-a", chain="bittensor", netuid=1))
    bootstrap_1 = domain_of(BootstrapSettings(run_id="run-a", chain="bittensor", netuid=1))
    validator_2 = domain_of(ValidatorSettings(run_id="run-a", chain="bittensor", netuid=2))
    _register(Registry(client, keys, miner_1), "miner", wallet)
    append(client, keys, miner_1, _step(pid("miner"), 0), wallet)
    assert [p.peer_id for p in Registry(client, keys, bootstrap_1).live_peers()] == [pid("miner")]
    assert Registry(client, keys, validator_2).live_peers() == []
    assert read_stream(client, keys, validator_2, StepRecord) == []
    local = domain_of(ValidatorSettings(run_id="run-a", chain="local", netuid=1))  # the local chain has no subnet
    assert local == Domain("run-a") and Registry(client, keys, local).live_peers() == []


def test_keys_and_domain_of_different_runs_are_a_wiring_error(redis_url, wallet):
    client = connect_redis(redis_url)
    with pytest.raises(ValueError, match="same settings"):
        Registry(client, Keys("run-a"), Domain("run-b"))
    with pytest.raises(ValueError, match="same settings"):
        append(client, Keys("run-a"), Domain("run-b"), _step("a", 0), wallet)
    with pytest.raises(ValueError, match="Domain"):
        read_stream(client, Keys("run-a"), "run-a", StepRecord)


# --- the run's shard salt -----------------------------------------------------------------


def test_the_shard_salt_is_created_once_and_kept(redis_url):
    client, keys = connect_redis(redis_url), Keys("salted")
    assert shard_salt(client, keys, create=False) is None  # a miner never creates it
    assert client.get(keys.shard_salt) is None
    first = shard_salt(client, keys, create=True)
    assert is_shard_salt(first)
    assert shard_salt(client, keys, create=True) == first  # the validator after the bootstrap: the same salt
    assert shard_salt(client, keys, create=True, new_salt="e" * 32) == first  # a valid salt is never overwritten
    assert shard_salt(client, keys, create=False) == first
    assert client.ttl(keys.shard_salt) == -1  # no TTL: it lasts as long as the run's Redis
    assert shard_salt(client, Keys("other-run"), create=True) != first  # each run draws its own


JUNK = {
    "empty": b"",
    "short": b"0123456789abcdef",
    "one too many": b"0123456789abcdef0123456789abcdef0",
    "upper case": b"0123456789ABCDEF0123456789ABCDEF",
    "not hex": b"0123456789abcdef0123456789abcdeg",
    "a newline": b"0123456789abcdef\n123456789abcdef",
    "not text": bytes(range(224, 256)),
    "4 MB": b"a" * (4 << 20),
}


@pytest.mark.parametrize("junk", JUNK.values(), ids=JUNK.keys())
def test_a_junk_shard_salt_is_refused_and_replaced_by_the_trusted_services(redis_url, junk, caplog):
    """Anyone holding the Redis credential can write the salt's key: what is there is hostile until checked.
    Readers treat junk as absent; the bootstrap and validators overwrite it, so it never stays in effect."""
    client, keys = connect_redis(redis_url), Keys("salted")
    client.set(keys.shard_salt, junk)
    with caplog.at_level("WARNING"):
        assert shard_salt(client, keys, create=False) is None
    assert f"ignoring the shard salt at {keys.shard_salt}" in caplog.text
    salt = shard_salt(client, keys, create=True)
    assert is_shard_salt(salt) and client.get(keys.shard_salt) == salt.encode()
    assert shard_salt(client, keys, create=False) == salt


def test_a_shard_salt_key_of_another_type_is_junk_too(redis_url, caplog):
    client, keys = connect_redis(redis_url), Keys("salted")
    client.rpush(keys.shard_salt, "0123456789abcdef0123456789abcdef")
    with caplog.at_level("WARNING"):
        assert shard_salt(client, keys, create=False) is None
    assert "a key of another type" in caplog.text
    assert shard_salt(client, keys, create=True, new_salt="a" * 32) == "a" * 32
    with pytest.raises(ValueError, match="32 lowercase hex"):
        shard_salt(client, keys, create=True, new_salt="A" * 32)


def test_a_miner_waits_for_the_shard_salt_then_gives_up_saying_why(redis_url, caplog):
    client, keys = connect_redis(redis_url), Keys("salted")
    publish = threading.Timer(1.5, lambda: shard_salt(connect_redis(redis_url), keys, create=True, new_salt="b" * 32))
    publish.start()
    started = time.monotonic()
    with caplog.at_level("INFO"):
        assert wait_for_shard_salt(client, keys, wait_s=30, poll_s=0.2) == "b" * 32
    assert 1.4 < time.monotonic() - started < 10
    assert (
        caplog.text.count("waiting for the bootstrap to publish the run's shard salt") == 1
    )  # said once, not per poll
    with pytest.raises(
        BootstrapUnavailable, match=r"no shard salt at hive:late:shard_salt after 1s .*HIVE_BOOTSTRAP_WAIT_S"
    ):
        wait_for_shard_salt(client, Keys("late"), wait_s=1.0, poll_s=0.2)
    stop = threading.Event()
    stop.set()
    with pytest.raises(BootstrapUnavailable):  # a stop signal ends the wait at once
        wait_for_shard_salt(client, Keys("late"), wait_s=3600, stop=stop)
    nowhere = connect_redis(f"redis://127.0.0.1:{procs.free_port()}/0", timeout=0.2)
    with pytest.raises(
        BootstrapUnavailable, match="Redis: ConnectionError: .*refused"
    ):  # unreachable Redis: still waiting, then this
        wait_for_shard_salt(nowhere, keys, wait_s=1.0, poll_s=0.2)
