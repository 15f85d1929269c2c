"""What the validator credits from signed telemetry: each record once, for its own signer only."""

from __future__ import annotations

import json
import time

import torch

from hivetrain.identity import Domain, Verifier
from hivetrain.models import build_model
from hivetrain.protocol.records import Keys, PeerRecord, StepRecord
from hivetrain.store import append, connect_redis
from hivetrain.validator.claims import ClaimReader
from hivetrain.validator.evaluate import evaluate


def _step(peer_id: str, samples: int) -> StepRecord:
    return StepRecord(
        peer_id=peer_id,
        step=samples // 4,
        local_epoch=1,
        global_epoch=1,
        loss=5.0,
        samples=samples,
        samples_per_s=4.0,
        tokens_per_s=256.0,
    )


def _registration(peer_id: str, wallet) -> PeerRecord:
    return PeerRecord(
        peer_id=peer_id, role="miner", hotkey=wallet.hotkey.ss58_address, multiaddrs=[], started_at=time.time()
    )


def test_claims_are_windows_of_verified_records(redis_url, wallet, other_wallet):
    client, keys, domain = connect_redis(redis_url), Keys("c"), Domain("c")
    reader = ClaimReader(client, keys, Verifier.in_memory(domain))
    append(client, keys, domain, _step("QmA", 4), wallet)  # written before the validator started: not counted
    reader.start()
    registrations = {wallet.hotkey.ss58_address: _registration("QmA", wallet)}
    for samples in (8, 12, 16):
        append(client, keys, domain, _step("QmA", samples), wallet)
    assert reader.poll(registrations) == 3
    window = reader.close_window()[wallet.hotkey.ss58_address]
    assert window.claimed == 8 and window.claimed_since_seen == 8  # the first record only sets the baseline
    append(client, keys, domain, _step("QmA", 24), wallet)
    reader.poll(registrations)
    window = reader.close_window()[wallet.hotkey.ss58_address]
    assert window.claimed == 8 and window.claimed_since_seen == 16  # the next window starts where the last ended


def test_replays_forgeries_and_strangers_earn_nothing(redis_url, wallet, other_wallet):
    client, keys, domain = connect_redis(redis_url), Keys("c"), Domain("c")
    reader = ClaimReader(client, keys, Verifier.in_memory(domain))
    reader.start()
    registrations = {wallet.hotkey.ss58_address: _registration("QmA", wallet)}
    append(client, keys, domain, _step("QmA", 8), wallet)
    append(client, keys, domain, _step("QmA", 12), wallet)
    original = client.xrange(keys.steps)[-1][1][b"env"]
    client.xadd(keys.steps, {"env": original})  # replayed as it is
    forged = json.loads(original)
    forged["payload"]["samples"] = 10_000
    client.xadd(keys.steps, {"env": json.dumps(forged)})  # inflated under the miner's signature
    append(client, keys, domain, _step("QmA", 500), other_wallet)  # another hotkey claiming QmA's work
    append(client, keys, domain, _step("QmB", 500), other_wallet)  # a hotkey with no live registration
    reader.poll(registrations)
    assert reader.close_window()[wallet.hotkey.ss58_address].claimed == 4
    assert dict(reader.rejected) == {"ReplayedNonce": 1, "InvalidSignature": 1, "unregistered": 2}


def test_records_signed_for_another_run_or_subnet_earn_nothing(redis_url, wallet):
    """A miner of subnet 1 (or of another run) replays its signed records into this validator's stream."""
    client, keys = connect_redis(redis_url), Keys("c")
    reader = ClaimReader(client, keys, Verifier.in_memory(Domain("c", 2)))
    reader.start()
    registrations = {wallet.hotkey.ss58_address: _registration("QmA", wallet)}
    for signed_in in (Domain("c", 1), Domain("c")):  # another subnet; the local chain
        for samples in (8, 1_000):
            append(client, keys, signed_in, _step("QmA", samples), wallet)
    other_run = Keys("other")
    for samples in (8, 1_000):
        append(client, other_run, Domain("other", 2), _step("QmA", samples), wallet)
    for _, fields in client.xrange(other_run.steps):
        client.xadd(keys.steps, fields)  # copied byte for byte
    assert reader.poll(registrations) == 6
    assert reader.close_window() == {} and dict(reader.rejected) == {"InvalidSignature": 6}
    for samples in (8, 12):  # the same miner's records of this subnet count
        append(client, keys, Domain("c", 2), _step("QmA", samples), wallet)
    reader.poll(registrations)
    assert reader.close_window()[wallet.hotkey.ss58_address].claimed == 4


def test_a_burst_of_junk_does_not_starve_honest_records(redis_url, wallet):
    client, keys, domain = connect_redis(redis_url), Keys("c"), Domain("c")
    reader = ClaimReader(client, keys, Verifier.in_memory(domain))
    reader.start()
    registrations = {wallet.hotkey.ss58_address: _registration("QmA", wallet)}
    append(client, keys, domain, _step("QmA", 8), wallet)
    with client.pipeline(transaction=False) as pipe:  # 5,000 junk entries (as after an outage, or from an attacker)
        for i in range(5_000):
            pipe.xadd(keys.steps, {"junk": str(i)})
        pipe.execute()
    for samples in (12, 16):
        append(client, keys, domain, _step("QmA", samples), wallet)
    assert reader.poll(registrations) == 5_003  # one poll reads everything new
    assert reader.close_window()[wallet.hotkey.ss58_address].claimed == 8
    assert reader.rejected["unsigned"] == 5_000


def test_a_poll_stops_at_its_cap_and_the_next_goes_on(redis_url, wallet, caplog):
    client, keys, domain = connect_redis(redis_url), Keys("c"), Domain("c")
    reader = ClaimReader(client, keys, Verifier.in_memory(domain), batch=30, cap=100)
    reader.start()
    for i in range(250):
        client.xadd(keys.steps, {"junk": str(i)})
    with caplog.at_level("WARNING"):
        assert reader.poll({}) == 100
    assert "the cap (HIVE_CLAIM_READ_CAP)" in caplog.text
    assert [reader.poll({}) for _ in range(3)] == [100, 50, 0]


def test_evaluation_is_deterministic_on_fixed_blocks():
    model = build_model("tiny")
    blocks = torch.randint(0, 50257, (5, 16))
    loss, perplexity = evaluate(model, blocks, batch_size=2)
    assert abs(evaluate(model, blocks, batch_size=5)[0] - loss) < 1e-5  # batching does not change the number
    assert 10.0 < loss < 11.5 and abs(perplexity - torch.tensor(loss).exp().item()) / perplexity < 1e-4
    assert model.training  # evaluate restores the mode it found
