"""The miner's spot-check endpoint: signed requests only, one miner's challenges, rate-limited."""

from __future__ import annotations

import queue
import threading

import pytest

from hivetrain.identity import Verifier, sign
from hivetrain.miner.challenge import PendingChallenge, TokenBucket, create_challenge_app


def _challenge(miner_hotkey: str, **overrides) -> dict:
    body = {"miner_hotkey": miner_hotkey, "block_index": 3, "batch_size": 2, "seed": 7, "dim": 64, "epoch": 5}
    return {**body, **overrides}


@pytest.fixture
def endpoint(wallet):
    pending: queue.Queue[PendingChallenge] = queue.Queue()
    app = create_challenge_app(wallet.hotkey.ss58_address, Verifier.in_memory(), TokenBucket(rate=0.001, burst=2),
                               pending, timeout_s=5)
    stop = threading.Event()

    def training_loop():  # what Miner.train does between steps: answer what is queued
        while not stop.is_set():
            try:
                item = pending.get(timeout=0.05)
            except queue.Empty:
                continue
            item.future.set_result(sign(wallet, {"challenge_nonce": item.nonce, "validator": item.validator,
                                                 "epoch": 5, "projection": [0.5] * item.challenge.dim}))

    thread = threading.Thread(target=training_loop, daemon=True)
    thread.start()
    yield app.test_client()
    stop.set()
    thread.join()


def test_signed_challenge_gets_a_signed_answer_bound_to_it(endpoint, wallet, other_wallet):
    request = sign(other_wallet, _challenge(wallet.hotkey.ss58_address))
    response = endpoint.post("/challenge", json=request)
    assert response.status_code == 200
    answer = Verifier.in_memory().verify(response.get_json())
    assert answer["challenge_nonce"] == request["nonce"]
    assert answer["validator"] == other_wallet.hotkey.ss58_address
    assert len(answer["projection"]) == 64


def test_unsigned_forged_and_replayed_requests_are_refused(endpoint, wallet, other_wallet):
    body = _challenge(wallet.hotkey.ss58_address)
    assert endpoint.post("/challenge", json=body).status_code == 401  # not an envelope
    assert endpoint.post("/challenge", data="nonsense").status_code == 400
    forged = sign(other_wallet, body)
    forged["payload"]["block_index"] = 4
    assert endpoint.post("/challenge", json=forged).status_code == 401
    signed = sign(other_wallet, body)
    assert endpoint.post("/challenge", json=signed).status_code == 200
    assert endpoint.post("/challenge", json=signed).status_code == 401  # same nonce again


def test_a_challenge_for_another_miner_is_refused(endpoint, other_wallet):
    response = endpoint.post("/challenge", json=sign(other_wallet, _challenge(other_wallet.hotkey.ss58_address)))
    assert response.status_code == 403


def test_bad_challenge_fields_get_400(endpoint, wallet, other_wallet):
    response = endpoint.post("/challenge", json=sign(other_wallet, _challenge(wallet.hotkey.ss58_address, batch_size=10_000)))
    assert response.status_code == 400 and response.get_json()["error"] == "bad challenge"


def test_rate_limit_per_validator_hotkey(endpoint, wallet, other_wallet):
    codes = [endpoint.post("/challenge", json=sign(other_wallet, _challenge(wallet.hotkey.ss58_address))).status_code
             for _ in range(3)]
    assert codes == [200, 200, 429]


def test_token_bucket_refills():
    bucket = TokenBucket(rate=1.0, burst=1)
    assert bucket.allow("a", now=0.0) and not bucket.allow("a", now=0.5)
    assert bucket.allow("a", now=1.6) and bucket.allow("b", now=1.6)
