"""The validator's memory across restarts: EMA scores, recent spot checks, unjudged streaks and the hotkeys it
caught, kept in Redis.

A ``ValidatorState`` (``hivetrain.protocol.records``) is saved under ``Keys.validator_state`` each
time the validator sets weights, signed by its own hotkey, and read back when it starts. Anything
else found under that key (junk, a record signed by another hotkey or for another run or subnet,
one for another validator or that fails the schema) is logged and deleted: the validator starts afresh rather than
resume from
a record it did not write.
"""

from __future__ import annotations

import collections
import json
import math
from typing import Iterable, Mapping

import redis

from hivetrain.identity import Domain, VerificationError, sign, verify_signature
from hivetrain.log import get_logger
from hivetrain.protocol.records import (
    VALIDATOR_STATE_TTL_S,
    Keys,
    SavedCatch,
    SavedCheck,
    SavedCredit,
    ValidatorState,
)
from hivetrain.validator.verdicts import SpotCheckResult

logger = get_logger(__name__)


def state_of(
    hotkey: str,
    rounds: int,
    scores: Mapping[str, float],
    history: Mapping[str, Iterable[SpotCheckResult]],
    unjudged: Mapping[str, int],
    caught: Mapping[str, tuple[float, str]] | None = None,
    credit: Mapping[str, tuple[float, float]] | None = None,
) -> ValidatorState:
    """The record of what a validator holds now; ``caught``: hotkey -> (its ban's end, why); ``credit``: hotkey ->
    (samples owed, samples banked) its ledger carries."""
    checks = {
        miner: [
            SavedCheck(
                verdict=c.verdict,
                reason=c.reason[:1000],
                cosine=c.cosine if c.cosine is not None and math.isfinite(c.cosine) else None,
            )
            for c in results
        ]
        for miner, results in history.items()
    }
    return ValidatorState(
        validator=hotkey,
        rounds=rounds,
        scores=dict(scores),
        checks=checks,
        unjudged={miner: count for miner, count in unjudged.items() if count > 0},
        caught={hotkey: SavedCatch(until=until, why=why[:500]) for hotkey, (until, why) in (caught or {}).items()},
        credit={hotkey: SavedCredit(owed=owed, banked=banked) for hotkey, (owed, banked) in (credit or {}).items()},
    )


def history_of(state: ValidatorState, kept: int) -> dict[str, collections.deque]:
    """Each miner's saved spot checks as the validator keeps them: its last ``kept``, oldest first."""
    return {
        miner: collections.deque((SpotCheckResult(c.verdict, c.reason, c.cosine) for c in checks), maxlen=kept)
        for miner, checks in state.checks.items()
    }


def save_state(client: redis.Redis, keys: Keys, domain: Domain, wallet, state: ValidatorState) -> None:
    """Write ``state`` signed by ``wallet`` (the validator's) for ``domain``; Redis errors are the caller's to
    handle."""
    envelope = sign(wallet, domain, state.model_dump(mode="json"))
    client.set(keys.validator_state(state.validator), json.dumps(envelope), ex=VALIDATOR_STATE_TTL_S)


def load_state(client: redis.Redis, keys: Keys, domain: Domain, hotkey: str) -> ValidatorState | None:
    """The state ``hotkey`` saved last in ``domain``, None when there is none; a record it did not write there is
    deleted."""
    key = keys.validator_state(hotkey)
    raw = client.get(key)
    if raw is None:
        return None
    try:
        envelope = verify_signature(raw, domain)  # a state is read once, however old
        if envelope.hotkey != hotkey:
            raise VerificationError(f"signed by {envelope.hotkey}, not by this validator")
        state = ValidatorState.model_validate(envelope.payload)
        if state.validator != hotkey:
            raise VerificationError(f"saved for validator {state.validator}")
    except (VerificationError, ValueError) as error:
        logger.warning(
            f"ignoring the saved validator state under {key} ({type(error).__name__}: {str(error)[:200]}); "
            "deleted it, starting afresh"
        )
        client.delete(key)
        return None
    return state
