"""The validator's saved state in a real Redis: read back as written; a record it did not write is deleted, not
trusted."""

from __future__ import annotations

import collections
import json

import pytest

from hivetrain.identity import Domain, sign
from hivetrain.protocol.records import Keys
from hivetrain.store import connect_redis
from hivetrain.validator.state import history_of, load_state, save_state, state_of
from hivetrain.validator.verdicts import SpotCheckResult

DOMAIN = Domain("st")


def _state(hotkey: str):
    history = {
        "5Miner": collections.deque(
            [SpotCheckResult("pass", "cosine 0.99", 0.99), SpotCheckResult("fail", "no answer", float("nan"))],
            maxlen=10,
        )
    }
    return state_of(
        hotkey,
        rounds=7,
        scores={"5Miner": 0.42},
        history=history,
        unjudged={"5Miner": 2, "5Other": 0},
        caught={"5Operator": (2e9, "peer Qm...: state: served a state we refused")},
    )


def test_a_saved_state_reads_back(redis_url, wallet):
    client, keys, hotkey = connect_redis(redis_url), Keys("st"), wallet.hotkey.ss58_address
    assert load_state(client, keys, DOMAIN, hotkey) is None
    save_state(client, keys, DOMAIN, wallet, _state(hotkey))
    state = load_state(client, keys, DOMAIN, hotkey)
    assert (state.rounds, state.scores, state.unjudged) == (7, {"5Miner": 0.42}, {"5Miner": 2})
    assert {h: (c.until, c.why) for h, c in state.caught.items()} == {
        "5Operator": (2e9, "peer Qm...: state: served a state we refused")
    }  # a restart does not forgive whom it caught
    history = history_of(state, kept=10)["5Miner"]
    assert list(history) == [SpotCheckResult("pass", "cosine 0.99", 0.99), SpotCheckResult("fail", "no answer", None)]
    assert history.maxlen == 10 and client.ttl(keys.validator_state(hotkey)) > 0


@pytest.mark.parametrize(
    "forge",
    [
        "junk",
        "signed by another hotkey",
        "for another validator",
        "out of range",
        "saved in another run",
        "saved in another subnet",
    ],
)
def test_a_record_the_validator_did_not_write_is_deleted(redis_url, wallet, other_wallet, forge):
    client, keys, hotkey = connect_redis(redis_url), Keys("st"), wallet.hotkey.ss58_address
    payload = _state(hotkey).model_dump(mode="json")
    raw = {
        "junk": b"\x00not json",
        "signed by another hotkey": json.dumps(
            sign(other_wallet, DOMAIN, {**payload, "scores": {other_wallet.hotkey.ss58_address: 1.0}})
        ),
        "for another validator": json.dumps(
            sign(wallet, DOMAIN, {**payload, "validator": other_wallet.hotkey.ss58_address})
        ),
        "out of range": json.dumps(sign(wallet, DOMAIN, {**payload, "scores": {"5Miner": 1e9}})),
        # its own hotkey's state, with the scores it had elsewhere: resuming it would carry them over
        "saved in another run": json.dumps(sign(wallet, Domain("other-run"), payload)),
        "saved in another subnet": json.dumps(sign(wallet, Domain("st", 3), payload)),
    }[forge]
    client.set(keys.validator_state(hotkey), raw)
    assert load_state(client, keys, DOMAIN, hotkey) is None
    assert client.exists(keys.validator_state(hotkey)) == 0
