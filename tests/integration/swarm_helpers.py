"""Helpers the integration tests share: bounded waiting and reading a miner's identity from its log."""

from __future__ import annotations

import re
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from hivetrain.identity import load_or_create_wallet
from hivetrain.swarm import procs


def wait_until(predicate, timeout: float, what: str, interval: float = 2.0):
    """Poll ``predicate`` until it returns a truthy value (returned); fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def peer_id_in(log: str) -> str:
    """The peer id a miner logs once its DHT is up ('' before that)."""
    match = re.search(r"DHT up: peer (\w+)", log)
    return match.group(1) if match else ""


def peer_id_of(service: procs.Service) -> str:
    return peer_id_in(service.log_path.read_text(errors="replace"))


def miner_metrics(swarm, peer_id: str) -> dict[str, float]:
    """A live miner's /metrics, at the challenge URL it registered: {sample name: value summed over its labels}."""
    (record,) = [peer for peer in swarm.registry().live_peers(role="miner") if peer.peer_id == peer_id]
    return metrics_at(record.challenge_url)


def metrics_at(url: str) -> dict[str, float]:
    """The /metrics served at ``url``: {sample name: value summed over its labels}."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(requests.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def hotkey_of(swarm, index: int) -> str:
    """The hotkey of miner ``index``: the wallet the launcher gave it (created on its first start)."""
    return load_or_create_wallet(str(swarm.workdir / f"miner-{index}" / "wallets"), "miner").hotkey.ss58_address


def validator_get(swarm, path: str):
    """The validator API's JSON at ``path``, or None while it does not answer 200."""
    try:
        response = requests.get(f"{swarm.validator_url}{path}", timeout=10)
    except requests.RequestException:
        return None
    return response.json() if response.status_code == 200 else None


def stop_and_check(swarm, summary_path=None) -> None:
    """Stop the swarm, then fail if any process group it started is still alive (and kill it)."""
    services = [s for s in [swarm.redis, swarm.bootstrap, swarm.validator, *swarm.miners] if s is not None]
    swarm.stop(summary_path=summary_path)
    leftovers = [s.name for s in services if s.group_alive()]
    for service in services:
        procs.kill_group(service.pid)
    assert not leftovers, f"processes left running after stop: {leftovers}"
