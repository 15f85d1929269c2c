"""Credit from receipts: a miner is paid for what the other members of its rounds signed they received from it."""

from __future__ import annotations

import json
import time

import pytest

from hivetrain.hivemind_compat.receipts import Receipt
from hivetrain.identity import Domain, load_or_create_wallet
from hivetrain.protocol.envelopes import stream_fields
from hivetrain.protocol.records import (
    AUDIT_COORDINATES,
    MAX_INGEST_ENTRY_BYTES,
    MAX_RECEIPT_SENDERS,
    MAX_SAMPLED_SENDERS,
    Keys,
    PeerRecord,
    ReceiptRecord,
)
from hivetrain.store import append, connect_redis
from hivetrain.validator.receipts import CreditLedger, ReceiptReader, Received, credit_round


def test_a_sender_is_credited_the_median_of_what_the_others_received_never_its_own_word():
    hotkey_of = {"pa": "A", "pb": "B", "pc": "C", "pd": "D"}
    reports = {
        "A": {"pb": 8.0, "pc": 8.0, "pd": 8.0},
        "B": {"pa": 8.0, "pc": 8.0, "pd": 8.0},
        "C": {"pa": 8.0, "pb": 8.0, "pd": 1e6},  # C vouches for its friend D far above what the others saw
        "D": {"pa": 8.0, "pb": 8.0, "pc": 1e6, "pd": 1e6},  # D vouches for C, and for itself
    }
    credited = credit_round(reports, hotkey_of)
    assert credited == {"A": 8.0, "B": 8.0, "C": 8.0, "D": 8.0}, credited


def test_one_reducer_that_leaves_a_sender_out_cannot_erase_it():
    hotkey_of = {"pa": "A", "pb": "B", "pc": "C"}
    reports = {"A": {"pb": 8.0, "pc": 8.0}, "B": {"pa": 8.0, "pc": 8.0}, "C": {"pb": 8.0}}  # C leaves A out
    assert credit_round(reports, hotkey_of) == {"A": 8.0, "B": 8.0, "C": 8.0}


def test_a_sender_nobody_else_received_from_earns_nothing():
    hotkey_of = {"pa": "A", "pb": "B", "pc": "C", "px": "X"}
    reports = {
        "A": {"pb": 8.0, "pc": 8.0},
        "B": {"pa": 8.0, "pc": 8.0},
        "C": {"pa": 8.0, "pb": 8.0, "px": 8.0},  # C vouches for X, which sent nothing: outvoted
        "X": {"px": 8.0, "pa": 8.0, "pb": 8.0, "pc": 8.0},  # X says it received its own parts
    }
    credited = credit_round(reports, hotkey_of)
    assert credited == {"A": 8.0, "B": 8.0, "C": 8.0}, credited
    assert credit_round({"X": {"px": 8.0}}, hotkey_of) == {}  # a round of its own


def test_a_declared_weight_is_credited_at_most_at_the_rounds_median():
    hotkey_of = {"pa": "A", "pb": "B", "pc": "C"}
    reports = {"A": {"pb": 8.0, "pc": 1e9}, "B": {"pa": 8.0, "pc": 1e9}, "C": {"pa": 8.0, "pb": 8.0}}
    assert credit_round(reports, hotkey_of) == {"A": 8.0, "B": 8.0, "C": 8.0}


def test_the_ledger_pays_what_was_both_claimed_and_received_carrying_the_rest():
    ledger = CreditLedger(carry=1000)
    assert ledger.pay("A", verified=100, received=0) == 0  # steps, no round yet (DiLoCo between outer rounds)
    assert ledger.pay("A", verified=100, received=200) == 200  # the round lands: both windows paid
    assert ledger.pay("A", verified=0, received=500) == 0  # received more than claimed: never paid above the claim
    assert ledger.pay("B", verified=10_000, received=0) == 0  # claims alone earn nothing
    assert ledger.pay("B", verified=10_000, received=0) == 0
    ledger.forget({"A"})
    assert ledger.pay("B", verified=0, received=50) == 0


def _wallets(tmp_path, names):
    return {name: load_or_create_wallet(str(tmp_path / name), name) for name in names}


def _registration(peer_id: str, wallet) -> PeerRecord:
    return PeerRecord(
        peer_id=peer_id, role="miner", hotkey=wallet.hotkey.ss58_address, multiaddrs=[], started_at=time.time()
    )


def _receipt(reducer: str, senders: dict[str, float], group: str = "ab12", **extra) -> ReceiptRecord:
    return ReceiptRecord(peer_id=reducer, averager="run_grad_averager", group=group, senders=senders, **extra)


def test_the_reader_credits_signed_receipts_of_registered_reducers_once(redis_url, tmp_path):
    client, keys, domain = connect_redis(redis_url), Keys("r"), Domain("r")
    wallets = _wallets(tmp_path, ["a", "b", "c", "x"])
    peers = {"a": "QmA", "b": "QmB", "c": "QmC", "x": "QmX"}
    registrations = {w.hotkey.ss58_address: _registration(peers[n], w) for n, w in wallets.items() if n != "x"}
    hotkey = {n: w.hotkey.ss58_address for n, w in wallets.items()}
    reader = ReceiptReader(client, keys, domain, settle_s=0.0).start()
    append(client, keys, domain, _receipt("QmA", {"QmB": 8.0, "QmC": 8.0}), wallets["a"])
    append(client, keys, domain, _receipt("QmB", {"QmA": 8.0, "QmC": 8.0}), wallets["b"])
    append(client, keys, domain, _receipt("QmC", {"QmA": 8.0, "QmB": 8.0}), wallets["c"])
    append(client, keys, domain, _receipt("QmX", {"QmA": 1e3}), wallets["x"])  # not registered: not counted
    append(client, keys, domain, _receipt("QmA", {"QmC": 1e3}), wallets["b"])  # b signs for a's peer id
    original = client.xrange(keys.receipts)[0][1][b"env"]
    forged = json.loads(original)
    forged["payload"]["senders"]["QmB"] = 1e6
    client.xadd(keys.receipts, {"env": json.dumps(forged)})  # edited under a's signature
    assert reader.poll(registrations) == 6
    received = reader.close_window()
    assert received == {hotkey[n]: Received(8.0, 1) for n in "abc"}, received
    assert reader.rejected["unregistered"] == 2 and reader.rejected["not authentic"] == 1, reader.rejected
    client.xadd(keys.receipts, {"env": original})  # the same receipt again: its round is settled
    append(client, keys, domain, _receipt("QmB", {"QmA": 8.0}, time=time.time() - 3600, group="cd34"), wallets["b"])
    reader.poll(registrations)
    assert reader.close_window() == {}
    assert reader.rejected["round already settled"] == 1 and reader.rejected["stale"] == 1, reader.rejected


def test_a_round_is_settled_once_its_receipts_had_time_to_arrive(redis_url, tmp_path):
    client, keys, domain = connect_redis(redis_url), Keys("r"), Domain("r")
    wallets = _wallets(tmp_path, ["a", "b"])
    registrations = {w.hotkey.ss58_address: _registration(f"Qm{n}", w) for n, w in wallets.items()}
    reader = ReceiptReader(client, keys, domain, settle_s=30.0).start()
    now = time.time()
    append(client, keys, domain, _receipt("Qma", {"Qmb": 8.0}), wallets["a"])
    reader.poll(registrations, now=now)
    append(client, keys, domain, _receipt("Qmb", {"Qma": 8.0}), wallets["b"])  # comes a flush later
    reader.poll(registrations, now=now + 10)
    assert reader.close_window() == {}
    reader.poll(registrations, now=now + 31)
    assert set(reader.close_window()) == {w.hotkey.ss58_address for w in wallets.values()}


@pytest.mark.parametrize("field, value", [("group", "not-hex"), ("senders", {"QmB": float("nan")})])
def test_a_malformed_receipt_is_refused_by_its_schema(field, value):
    fields = dict(peer_id="QmA", averager="run_grad_averager", group="ab12", senders={"QmB": 8.0})
    fields[field] = value
    with pytest.raises(ValueError):
        ReceiptRecord(**fields)


def test_the_ledger_saves_what_it_carries_and_restores_it_within_its_bound():
    ledger = CreditLedger(carry=1000)
    ledger.pay("A", verified=100, received=0)
    ledger.pay("B", verified=0, received=30)
    ledger.pay("C", verified=5, received=5)  # paid in full: nothing carried
    assert ledger.saved() == {"A": (100.0, 0.0), "B": (0.0, 30.0)}
    restored = CreditLedger(carry=50)
    restored.restore({**ledger.saved(), "D": (1e12, -5.0)})
    assert restored.saved() == {"A": (50.0, 0.0), "B": (0.0, 30.0), "D": (50.0, 0.0)}
    assert restored.pay("A", verified=0, received=80) == 50


def test_the_largest_receipt_a_reducer_writes_fits_in_one_telemetry_entry(tmp_path):
    """64 senders, 16 of them sampled at 16 coordinates, the longest numbers: signed, it is still one entry the
    bootstrap's ingest takes (a larger one would be refused whole, and the round's credit lost with it)."""
    peer = lambda i: f"12D3KooW{'A' * 42}{i:03d}"  # noqa: E731  (53 characters, as libp2p's Ed25519/RSA ids)
    senders = {peer(i): 123456.123456789 + i for i in range(MAX_RECEIPT_SENDERS)}
    sample = dict(
        epoch=10**9,
        first_block=2**40,
        indices=[2**40 - k for k in range(AUDIT_COORDINATES)],
        values=[-1.2345678901234567e-05 * (k + 1) for k in range(AUDIT_COORDINATES)],
    )
    samples = {peer(i): sample for i in range(MAX_SAMPLED_SENDERS + 4)}
    record = Receipt("x" * 64 + "_grad_averager", "ab" * 32, senders, samples).record(peer(999))
    assert len(record.samples) == MAX_SAMPLED_SENDERS
    wallet = load_or_create_wallet(str(tmp_path / "w"), "w")
    entry = stream_fields(record, Domain("a-run-id-of-some-length", 12345), signer=wallet)["env"]
    assert len(entry) <= MAX_INGEST_ENTRY_BYTES, len(entry)
    assert ReceiptRecord.model_validate(json.loads(entry)["payload"]).samples[peer(0)].values[0] == -1.234568e-05
