"""The validator's API as its unit tests set it up: a run on the local chain, with the Redis keys and the signature
domain its id gives, and the settings of its validator (whose wallet folder and hotkey come from tests/conftest.py)."""

from __future__ import annotations

from typing import Callable, NamedTuple

from hivetrain.identity import Domain
from hivetrain.protocol.records import Keys
from hivetrain.settings import ValidatorSettings


class LocalRun(NamedTuple):
    keys: Keys
    domain: Domain
    #: ``settings(redis_url, wallet_dir, **overrides)``: the validator's settings for this run
    settings: Callable[..., ValidatorSettings]


def local_run(run_id: str) -> LocalRun:
    """The run ``run_id`` on the local chain: its keys, the domain ValidatorSettings(run_id=run_id) derives there,
    and its validator's settings."""

    def settings(redis_url: str, wallet_dir: str, **overrides) -> ValidatorSettings:
        return ValidatorSettings(redis_url=redis_url, run_id=run_id, wallet_dir=wallet_dir, **overrides)

    return LocalRun(Keys(run_id), Domain(run_id), settings)
