"""Signed envelopes (whole-body signatures for one run and subnet, freshness, replay) and offline wallet creation."""

from __future__ import annotations

import json
import os
import time

import pytest
import redis
from bittensor.keyfiles import Keypair

from hivetrain.identity import (
    Domain,
    InMemoryNonceStore,
    InvalidSignature,
    MalformedEnvelope,
    ReplayedNonce,
    SignedEnvelope,
    StaleRecord,
    VerificationError,
    Verifier,
    canonical_json,
    load_or_create_wallet,
    sign,
    signed_message,
    verify_signature,
)
from hivetrain.protocol.records import Keys
from hivetrain.settings import SERVICE_SETTINGS, SwarmSettings, domain_of, load_settings
from hivetrain.store import redis_verifier

ALICE = Keypair.create_from_uri("//Alice")
BOB = Keypair.create_from_uri("//Bob")
DOMAIN = Domain("idtest")
PAYLOAD = {"peer_id": "QmPeer", "loss": 3.25, "samples": 128, "extra": {"b": [1, 2], "a": None}}


def test_round_trip_returns_payload_and_survives_json():
    envelope = sign(ALICE, DOMAIN, PAYLOAD)
    assert set(envelope) == {"payload", "hotkey", "timestamp", "nonce", "signature"}
    assert envelope["hotkey"] == ALICE.ss58_address
    assert Verifier.in_memory(DOMAIN).verify(json.dumps(envelope)) == PAYLOAD
    # key order on the wire does not matter: what is signed is the canonical form
    reordered = dict(reversed(list(envelope.items())))
    reordered["payload"] = dict(reversed(list(PAYLOAD.items())))
    assert json.dumps(reordered) != json.dumps(envelope)
    assert Verifier.in_memory(DOMAIN).verify(json.dumps(reordered)) == PAYLOAD
    args = (ALICE.ss58_address, envelope["timestamp"], envelope["nonce"])
    assert signed_message(DOMAIN, reordered["payload"], *args) == signed_message(DOMAIN, PAYLOAD, *args)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda e: e["payload"].__setitem__("loss", 0.5),
        lambda e: e["payload"].__setitem__("samples", 129),
        lambda e: e["payload"]["extra"].__setitem__("a", 1),
        lambda e: e["payload"].__setitem__("new", True),
        lambda e: e["payload"].pop("peer_id"),
        lambda e: e.__setitem__("hotkey", BOB.ss58_address),
        lambda e: e.__setitem__("timestamp", e["timestamp"] - 1.0),
        lambda e: e.__setitem__("nonce", ("0" if e["nonce"][0] != "0" else "1") + e["nonce"][1:]),
        lambda e: e.__setitem__("signature", "0x" + sign(BOB, DOMAIN, PAYLOAD)["signature"][2:]),
    ],
    ids=["loss", "samples", "nested", "added", "removed", "hotkey", "timestamp", "nonce", "other-signer"],
)
def test_tampering_any_field_fails(tamper):
    envelope = json.loads(json.dumps(sign(ALICE, DOMAIN, PAYLOAD)))
    tamper(envelope)
    with pytest.raises(InvalidSignature):
        Verifier.in_memory(DOMAIN).verify(envelope)


def test_malformed_envelopes_are_rejected():
    good = sign(ALICE, DOMAIN, PAYLOAD)
    for bad in (
        {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "nonce"},
        {**good, "timestamp": "1"},
        {**good, "signature": good["signature"][:-2]},
        {**good, "hotkey": "x" * 48},
        "not json",
    ):
        with pytest.raises(MalformedEnvelope):
            Verifier.in_memory(DOMAIN).verify(bad)
    with pytest.raises(ValueError):
        sign(ALICE, DOMAIN, {"x": float("nan")})


def test_stale_and_future_records_fail():
    verifier = Verifier.in_memory(DOMAIN, window_s=60, future_skew_s=5)
    now = time.time()
    assert verifier.verify(sign(ALICE, DOMAIN, PAYLOAD, timestamp=now - 59), now=now) == PAYLOAD
    assert verifier.verify(sign(ALICE, DOMAIN, PAYLOAD, timestamp=now + 4), now=now) == PAYLOAD
    with pytest.raises(StaleRecord):
        verifier.verify(sign(ALICE, DOMAIN, PAYLOAD, timestamp=now - 61), now=now)
    with pytest.raises(StaleRecord):
        verifier.verify(sign(ALICE, DOMAIN, PAYLOAD, timestamp=now + 6), now=now)
    assert issubclass(StaleRecord, VerificationError)


def test_replay_within_window_fails_in_memory():
    verifier = Verifier.in_memory(DOMAIN)
    envelope = sign(ALICE, DOMAIN, PAYLOAD)
    verifier.verify(envelope)
    with pytest.raises(ReplayedNonce):
        verifier.verify(envelope)
    # the same nonce from another hotkey is a different record
    verifier.verify(sign(BOB, DOMAIN, PAYLOAD, nonce=envelope["nonce"]))


def test_replay_across_verifiers_sharing_redis(redis_url):
    keys = Keys("idtest")
    first = redis_verifier(redis.Redis.from_url(redis_url), keys, DOMAIN, window_s=30)
    second = redis_verifier(redis.Redis.from_url(redis_url), keys, DOMAIN, window_s=30)
    envelope = sign(ALICE, DOMAIN, PAYLOAD)
    assert first.verify(envelope) == PAYLOAD
    with pytest.raises(ReplayedNonce):
        second.verify(envelope)
    nonce_key = first.nonces.key(ALICE.ss58_address, envelope["nonce"])
    assert 0 < first.nonces.client.ttl(nonce_key) <= 35
    # a forged envelope must not burn the real sender's nonce
    fresh = sign(ALICE, DOMAIN, PAYLOAD)
    with pytest.raises(InvalidSignature):
        second.verify({**fresh, "payload": {"loss": 0.0}})
    assert first.verify(fresh) == PAYLOAD


def test_verifier_refuses_a_store_that_forgets_too_early():
    from bittensor.http_auth import InMemoryNonceStore as SdkNonceStore

    for store in (InMemoryNonceStore, SdkNonceStore):
        with pytest.raises(ValueError, match="retention"):
            Verifier(store(retention=10), DOMAIN, window_s=60)
        verifier = Verifier(store(retention=65), DOMAIN, window_s=60)
        envelope = sign(ALICE, DOMAIN, PAYLOAD)
        assert verifier.verify(envelope) == PAYLOAD
        with pytest.raises(ReplayedNonce):
            verifier.verify(envelope)


def test_the_in_memory_nonce_store_forgets_after_its_retention(monkeypatch):
    store, now = InMemoryNonceStore(retention=10), [100.0]
    monkeypatch.setattr("hivetrain.identity.time.monotonic", lambda: now[0])
    assert store.check_and_store("hk", "n1") and not store.check_and_store("hk", "n1")
    assert store.check_and_store("other", "n1")  # nonces are per hotkey
    now[0] += 10.0
    assert store.check_and_store("hk", "n1")  # forgotten: the verifier's window has long refused the record


def test_wallet_created_offline_and_reloaded(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.stdin.isatty", lambda: False, raising=False)
    wallet = load_or_create_wallet(str(tmp_path / "wallets"), "miner", "hk1")
    ss58 = wallet.hotkey.ss58_address
    hotkey_path = tmp_path / "wallets" / "miner" / "hotkeys" / "hk1"
    assert hotkey_path.exists() and not wallet.hotkey_file.is_encrypted() and not wallet.coldkey_file.is_encrypted()
    assert os.stat(hotkey_path).st_mode & 0o077 == 0
    again = load_or_create_wallet(str(tmp_path / "wallets"), "miner", "hk1")
    assert again.hotkey.ss58_address == ss58
    assert again.coldkeypub.ss58_address == wallet.coldkeypub.ss58_address
    other = load_or_create_wallet(str(tmp_path / "wallets"), "miner", "hk2")
    assert other.hotkey.ss58_address != ss58
    assert other.coldkeypub.ss58_address == wallet.coldkeypub.ss58_address  # same coldkey, new hotkey
    envelope = sign(again, DOMAIN, PAYLOAD)  # a Wallet signs with its hotkey
    assert envelope["hotkey"] == ss58
    assert Verifier.in_memory(DOMAIN).verify(SignedEnvelope(**envelope)) == PAYLOAD


# --- the signature domain ---------------------------------------------------------------------
CROSS_DOMAIN = {
    "another run": (Domain("run-a"), Domain("run-b")),
    "another subnet": (Domain("run-a", 1), Domain("run-a", 2)),
    "subnet 0 is not the local chain": (Domain("run-a", 0), Domain("run-a")),
    "the local chain is not a subnet": (Domain("run-a"), Domain("run-a", 1)),
}


@pytest.mark.parametrize("signed_in, read_in", CROSS_DOMAIN.values(), ids=CROSS_DOMAIN)
def test_an_envelope_signed_in_one_domain_verifies_in_no_other(signed_in, read_in):
    envelope = sign(ALICE, signed_in, PAYLOAD)
    with pytest.raises(InvalidSignature, match=str(read_in)):
        Verifier.in_memory(read_in).verify(envelope)
    with pytest.raises(InvalidSignature):
        verify_signature(envelope, read_in)
    assert Verifier.in_memory(signed_in).verify(envelope) == PAYLOAD


def test_a_wrong_domain_uses_up_no_nonce(redis_url):
    keys = Keys("run-a")
    envelope = sign(ALICE, Domain("run-a", 1), PAYLOAD)
    with pytest.raises(InvalidSignature):  # replayed at a validator of subnet 2 sharing the nonce store
        redis_verifier(redis.Redis.from_url(redis_url), keys, Domain("run-a", 2)).verify(envelope)
    assert redis_verifier(redis.Redis.from_url(redis_url), keys, Domain("run-a", 1)).verify(envelope) == PAYLOAD


def test_the_signed_message_opens_with_the_run_and_subnet():
    body = (ALICE.ss58_address, 1.0, "ab" * 8)
    assert signed_message(Domain("run-a"), PAYLOAD, *body).startswith(b"hivetrain-envelope/2\nrun-a\nlocal\n{")
    assert signed_message(Domain("run-a", 7), PAYLOAD, *body).startswith(b"hivetrain-envelope/2\nrun-a\n7\n{")


def test_a_version_1_envelope_without_run_or_subnet_is_refused():
    """What the envelopes were before the domain: a record still in Redis from then is a forgery now."""
    timestamp, nonce = time.time(), "cd" * 16
    body = canonical_json({"hotkey": ALICE.ss58_address, "nonce": nonce, "payload": PAYLOAD, "timestamp": timestamp})
    signature = ALICE.sign(b"hivetrain-envelope/1\n" + body)
    old = {
        "payload": PAYLOAD,
        "hotkey": ALICE.ss58_address,
        "timestamp": timestamp,
        "nonce": nonce,
        "signature": "0x" + signature.hex(),
    }
    with pytest.raises(InvalidSignature):
        Verifier.in_memory(DOMAIN).verify(old)


@pytest.mark.parametrize(
    "run_id, netuid",
    [("", None), ("run\nlocal", None), ("a b", None), (5, None), ("r", -1), ("r", True), ("r", "1"), ("r", 1.0)],
)
def test_a_domain_is_one_run_and_at_most_one_subnet(run_id, netuid):
    with pytest.raises(ValueError):
        Domain(run_id, netuid)


def test_signing_and_verifying_need_a_domain():
    with pytest.raises(TypeError):
        sign(ALICE, PAYLOAD)  # the call as it was: no default means "any run"
    with pytest.raises(TypeError):
        Verifier.in_memory()
    for not_a_domain in ("run-a", Keys("run-a"), None):
        with pytest.raises(ValueError, match="Domain"):
            sign(ALICE, not_a_domain, PAYLOAD)
        with pytest.raises(ValueError, match="Domain"):
            Verifier.in_memory(not_a_domain)
        with pytest.raises(ValueError, match="Domain"):
            verify_signature(sign(ALICE, DOMAIN, PAYLOAD), not_a_domain)


@pytest.mark.parametrize(
    "chain, netuid, expected",
    [("local", 7, Domain("swarm")), ("bittensor", 7, Domain("swarm", 7)), ("bittensor", 0, Domain("swarm", 0))],
)
def test_every_service_derives_the_same_domain_from_the_same_environment(monkeypatch, chain, netuid, expected):
    for key in list(os.environ):
        if key.startswith("HIVE_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HIVE_RUN_ID", "swarm")
    monkeypatch.setenv("HIVE_CHAIN", chain)
    monkeypatch.setenv("HIVE_NETUID", str(netuid))
    for model in (*SERVICE_SETTINGS.values(), SwarmSettings):  # the bootstrap and the swarm launcher read records too
        assert domain_of(load_settings(model, [])) == expected, model.__name__
