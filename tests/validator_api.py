"""The validator's API as its unit tests set it up: a run on the local chain, with the Redis keys and the signature
domain its id gives, and the settings of its validator (whose wallet folder and hotkey come from tests/conftest.py)."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.request
from typing import Callable, Iterator, NamedTuple

from hivetrain.identity import Domain
from hivetrain.protocol.records import Keys
from hivetrain.runtime.gunicorn import start_gunicorn, stop_gunicorn
from hivetrain.settings import ValidatorSettings
from hivetrain.swarm import procs
from hivetrain.validator.__main__ import APP_SPEC


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


@contextlib.contextmanager
def served(
    settings: Callable[..., ValidatorSettings], redis_url: str, wallet_dir: str, workers: int = 1
) -> Iterator[str]:
    """The validator's API under real gunicorn on a free loopback port, healthy; yields its URL (with a trailing /)."""
    port = procs.free_port()
    api = settings(redis_url, wallet_dir, api_host="127.0.0.1", api_port=port, api_workers=workers)
    popen = start_gunicorn(APP_SPEC, api, api.api_host, api.api_port, api.api_workers)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert popen.poll() is None, f"gunicorn exited with {popen.returncode}"
            try:
                with urllib.request.urlopen(url + "healthz", timeout=5) as response:
                    if json.loads(response.read()) == {"status": "ok"}:
                        break
            except OSError:
                time.sleep(0.2)
        yield url
    finally:
        stop_gunicorn(popen)
