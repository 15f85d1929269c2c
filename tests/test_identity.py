"""Signed envelopes (whole-body signatures, freshness, replay) and offline wallet creation."""

from __future__ import annotations

import json
import os
import time

import pytest
import redis
from bittensor.keyfiles import Keypair

from hivetrain.identity import (
    InvalidSignature,
    MalformedEnvelope,
    ReplayedNonce,
    SignedEnvelope,
    StaleRecord,
    VerificationError,
    Verifier,
    load_or_create_wallet,
    sign,
    signed_message,
)
from hivetrain.protocol.records import Keys

ALICE = Keypair.create_from_uri("//Alice")
BOB = Keypair.create_from_uri("//Bob")
PAYLOAD = {"peer_id": "QmPeer", "loss": 3.25, "samples": 128, "extra": {"b": [1, 2], "a": None}}


def test_round_trip_returns_payload_and_survives_json():
    envelope = sign(ALICE, PAYLOAD)
    assert set(envelope) == {"payload", "hotkey", "timestamp", "nonce", "signature"}
    assert envelope["hotkey"] == ALICE.ss58_address
    assert Verifier.in_memory().verify(json.dumps(envelope)) == PAYLOAD
    # key order on the wire does not matter: what is signed is the canonical form
    reordered = dict(reversed(list(envelope.items())))
    reordered["payload"] = dict(reversed(list(PAYLOAD.items())))
    assert json.dumps(reordered) != json.dumps(envelope)
    assert Verifier.in_memory().verify(json.dumps(reordered)) == PAYLOAD
    args = (ALICE.ss58_address, envelope["timestamp"], envelope["nonce"])
    assert signed_message(reordered["payload"], *args) == signed_message(PAYLOAD, *args)


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
        lambda e: e.__setitem__("signature", "0x" + sign(BOB, PAYLOAD)["signature"][2:]),
    ],
    ids=["loss", "samples", "nested", "added", "removed", "hotkey", "timestamp", "nonce", "other-signer"],
)
def test_tampering_any_field_fails(tamper):
    envelope = json.loads(json.dumps(sign(ALICE, PAYLOAD)))
    tamper(envelope)
    with pytest.raises(InvalidSignature):
        Verifier.in_memory().verify(envelope)


def test_malformed_envelopes_are_rejected():
    good = sign(ALICE, PAYLOAD)
    for bad in (
        {**good, "extra": 1},
        {k: v for k, v in good.items() if k != "nonce"},
        {**good, "timestamp": "1"},
        {**good, "signature": good["signature"][:-2]},
        {**good, "hotkey": "x" * 48},
        "not json",
    ):
        with pytest.raises(MalformedEnvelope):
            Verifier.in_memory().verify(bad)
    with pytest.raises(ValueError):
        sign(ALICE, {"x": float("nan")})


def test_stale_and_future_records_fail():
    verifier = Verifier.in_memory(window_s=60, future_skew_s=5)
    now = time.time()
    assert verifier.verify(sign(ALICE, PAYLOAD, timestamp=now - 59), now=now) == PAYLOAD
    assert verifier.verify(sign(ALICE, PAYLOAD, timestamp=now + 4), now=now) == PAYLOAD
    with pytest.raises(StaleRecord):
        verifier.verify(sign(ALICE, PAYLOAD, timestamp=now - 61), now=now)
    with pytest.raises(StaleRecord):
        verifier.verify(sign(ALICE, PAYLOAD, timestamp=now + 6), now=now)
    assert issubclass(StaleRecord, VerificationError)


def test_replay_within_window_fails_in_memory():
    verifier = Verifier.in_memory()
    envelope = sign(ALICE, PAYLOAD)
    verifier.verify(envelope)
    with pytest.raises(ReplayedNonce):
        verifier.verify(envelope)
    # the same nonce from another hotkey is a different record
    verifier.verify(sign(BOB, PAYLOAD, nonce=envelope["nonce"]))


def test_replay_across_verifiers_sharing_redis(redis_url):
    keys = Keys("idtest")
    first = Verifier.with_redis(redis.Redis.from_url(redis_url), keys, window_s=30)
    second = Verifier.with_redis(redis.Redis.from_url(redis_url), keys, window_s=30)
    envelope = sign(ALICE, PAYLOAD)
    assert first.verify(envelope) == PAYLOAD
    with pytest.raises(ReplayedNonce):
        second.verify(envelope)
    nonce_key = first.nonces.key(ALICE.ss58_address, envelope["nonce"])
    assert 0 < first.nonces.client.ttl(nonce_key) <= 35
    # a forged envelope must not burn the real sender's nonce
    fresh = sign(ALICE, PAYLOAD)
    with pytest.raises(InvalidSignature):
        second.verify({**fresh, "payload": {"loss": 0.0}})
    assert first.verify(fresh) == PAYLOAD


def test_verifier_refuses_a_store_that_forgets_too_early():
    from bittensor.http_auth import InMemoryNonceStore

    with pytest.raises(ValueError, match="retention"):
        Verifier(InMemoryNonceStore(retention=10), window_s=60)


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
    envelope = sign(again, PAYLOAD)  # a Wallet signs with its hotkey
    assert envelope["hotkey"] == ss58
    assert Verifier.in_memory().verify(SignedEnvelope(**envelope)) == PAYLOAD
