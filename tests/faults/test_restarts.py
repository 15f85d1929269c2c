"""Restarts mid-run: Redis crashes and comes back, then the bootstrap stops and comes back.

Training goes on through both; every telemetry record a miner wrote is in Redis afterwards (its
counters against the streams, and its step records without a gap); a miner that starts after the
bootstrap returns joins an averaging round.
"""

from __future__ import annotations

import json
import time

import pytest
from swarm_helpers import metrics_at, peer_id_of, stop_and_check, wait_until

from hivetrain.protocol.envelopes import INGEST_STREAMS
from hivetrain.protocol.records import Keys
from hivetrain.settings import SwarmSettings
from hivetrain.store import connect_redis
from hivetrain.swarm.launcher import Swarm

pytestmark = pytest.mark.integration

BASE_ENV = {"HIVE_TORCH_THREADS": "1", "HIVE_AVERAGING_TIMEOUT": "15", "HIVE_SAVE_EVERY": "0"}
REDIS_DOWN_S = 15
BOOTSTRAP_DOWN_S = 15
TELEMETRY_STREAMS = tuple(INGEST_STREAMS)  # every stream a miner writes (steps, rounds, offences, receipts)


def _telemetry(values: dict[str, float]) -> dict[str, int]:
    return {
        name: int(values.get(f"hive_miner_telemetry_{name}_total", values.get(f"hive_miner_telemetry_{name}", 0)))
        for name in ("written", "dropped")
    } | {
        "queued": int(values.get("hive_miner_telemetry_queue_depth", 0)),
        "steps": int(values.get("hive_miner_steps_total", 0)),
    }


def _stored(swarm: Swarm, until: float) -> dict[str, dict]:
    """Per peer: the distinct telemetry records in Redis stored before ``until`` (their payloads: a record re-sent
    after a lost answer counts once), how many entries that took, and the step numbers of its step records."""
    client, keys = connect_redis(swarm.redis_url), Keys(swarm.settings.run_id)
    peers: dict[str, dict] = {}
    for stream in TELEMETRY_STREAMS:
        for entry_id, fields in client.xrange(getattr(keys, stream), max=f"{int(until * 1000)}"):
            payload = json.loads(fields[b"env"])["payload"]
            peer = peers.setdefault(payload["peer_id"], {"records": set(), "entries": 0, "steps": set()})
            peer["records"].add((stream, json.dumps(payload, sort_keys=True)))
            peer["entries"] += 1
            if stream == "steps":
                peer["steps"].add(payload["step"])
    client.close()
    return peers


def _account(swarm: Swarm, urls: dict[str, str]) -> dict:
    """Written (the miners' counters) against stored (Redis's streams), once every queue is empty.

    The counters are read first, then the streams up to that moment: a record counts as written
    only after the bootstrap stored it, so stored >= written unless records were lost.
    """
    wait_until(
        lambda: all(_telemetry(metrics_at(url))["queued"] == 0 for url in urls.values()),
        timeout=120,
        what="every miner's telemetry queue to drain",
    )
    counters = {peer: _telemetry(metrics_at(url)) for peer, url in urls.items()}
    stored = _stored(swarm, until=time.time())
    figures = {"written": 0, "dropped": 0, "stored": 0, "lost": 0, "step_gaps": 0, "duplicates": 0}
    for peer, counted in counters.items():
        found = stored.get(peer, {"records": set(), "entries": 0, "steps": set()})
        figures["written"] += counted["written"]
        figures["dropped"] += counted["dropped"]
        figures["stored"] += len(found["records"])
        figures["duplicates"] += found["entries"] - len(found["records"])
        figures["lost"] += max(0, counted["written"] + counted["dropped"] - len(found["records"]))
        steps = found["steps"]
        figures["step_gaps"] += (max(steps) - min(steps) + 1 - len(steps)) if steps else 0
        # steps count from 1 in a fresh miner: a missing head is lost too
        figures["step_gaps"] += (min(steps) - 1) if steps else counted["steps"]
    return figures


def _gradient_rounds(swarm: Swarm, after: float, with_peer: str | None = None, size: int | None = None) -> list[dict]:
    return [
        r
        for r in swarm.summary()["rounds"]
        if r["kind"] == "gradients"
        and r["time"] >= after
        and (size is None or r["group_size"] == size)
        and (with_peer is None or with_peer in r["peers"])
    ]


def _steps(urls: dict[str, str]) -> dict[str, int]:
    return {peer: _telemetry(metrics_at(url))["steps"] for peer, url in urls.items()}


def test_redis_crash_and_bootstrap_restart_lose_no_telemetry_and_miners_still_join(tmp_path, report):
    settings = SwarmSettings(
        miners=2,
        workdir=str(tmp_path),
        preset="tiny",
        bootstrap_port=0,
        validator=False,
        run_id="restarts",
        stop_timeout=45,
    )
    swarm = Swarm(settings, extra_env=BASE_ENV)
    try:
        swarm.start()
        wait_until(lambda: _gradient_rounds(swarm, 0.0, size=2), timeout=300, what="a gradient round of both miners")
        # the miners' /metrics: read at the URLs they registered, while Redis is there to tell them
        urls = {peer.peer_id: peer.challenge_url for peer in swarm.registry().live_peers(role="miner")}
        assert set(urls) == {peer_id_of(m) for m in swarm.miners}, f"registered miners {sorted(urls)}"

        # 1. Redis crashes (SIGKILL: no chance to save) and is started again on its port, users and data
        before = _steps(urls)
        crashed_at = time.time()
        swarm.stop_redis(crash=True)
        time.sleep(REDIS_DOWN_S)
        during_redis = _steps(urls)
        swarm.restart_redis()
        redis_back_at = time.time()
        assert swarm.bootstrap.alive(), f"the bootstrap exited while Redis was away; see {swarm.bootstrap.log_path}"
        wait_until(
            lambda: _gradient_rounds(swarm, redis_back_at, size=2),
            timeout=240,
            what="a gradient round of both miners after Redis came back",
        )
        after_redis = _account(swarm, urls)

        # 2. the bootstrap stops and comes back (same HTTP port, identity and DHT address); then a new miner joins
        bootstrap_addrs = sorted(a for b in swarm.registry().bootstraps() for a in b.multiaddrs)
        before_bootstrap = _steps(urls)
        stopped_at = time.time()
        swarm.stop_bootstrap()
        time.sleep(max(0.0, stopped_at + BOOTSTRAP_DOWN_S - time.time()))
        during_bootstrap = _steps(urls)
        bootstrap_down_s = time.time() - stopped_at
        swarm.restart_bootstrap()
        bootstrap_back_at = time.time()
        assert sorted(a for b in swarm.registry().bootstraps() for a in b.multiaddrs) == bootstrap_addrs, (
            "the restarted bootstrap's DHT is not where it was (its identity or its address changed)"
        )
        newcomer = swarm.add_miner()
        new_peer = wait_until(lambda: peer_id_of(newcomer), timeout=180, what="the new miner's DHT to come up")
        joined = wait_until(
            lambda: _gradient_rounds(swarm, bootstrap_back_at, with_peer=new_peer),
            timeout=300,
            what="a gradient round with the miner that started after the bootstrap came back",
        )
        urls[new_peer] = wait_until(
            lambda: {p.peer_id: p.challenge_url for p in swarm.registry().live_peers(role="miner")}.get(new_peer),
            timeout=60,
            what="the new miner's registration",
        )
        after_bootstrap = _account(swarm, urls)

        figures = {
            "redis_down_s": round(redis_back_at - crashed_at, 1),
            "steps_during_redis_outage": [during_redis[p] - before[p] for p in sorted(before)],
            "bootstrap_down_s": round(bootstrap_down_s, 1),
            "bootstrap_ready_again_s": round(bootstrap_back_at - stopped_at, 1),  # down, then starting until /readyz
            "steps_during_bootstrap_outage": [
                during_bootstrap[p] - before_bootstrap[p] for p in sorted(before_bootstrap)
            ],
            "new_miner_first_round_s": round(min(r["time"] for r in joined) - bootstrap_back_at, 1),
            **{f"after_redis_{k}": v for k, v in after_redis.items()},
            **{f"end_{k}": v for k, v in after_bootstrap.items()},
        }
        report("restarts (Redis SIGKILL, bootstrap stop; 2 miners + 1 late)", **figures)
        for moment, counted in [("after the Redis crash", after_redis), ("at the end", after_bootstrap)]:
            assert counted["lost"] == 0 and counted["step_gaps"] == 0 and counted["dropped"] == 0, (
                f"telemetry lost {moment}: {counted}"
            )
        # the swarm trained through each outage (one miner may spend a whole outage in an averaging round of up to
        # HIVE_AVERAGING_TIMEOUT), and every miner trained on after it
        for what, start, end in [
            ("Redis", before, during_redis),
            ("the bootstrap", before_bootstrap, during_bootstrap),
        ]:
            assert any(end[p] > start[p] for p in start), f"no miner trained while {what} was away: {start} -> {end}"
        later = _steps(urls)
        assert all(later[p] > during_bootstrap[p] > during_redis[p] for p in before), (
            f"a miner stopped training: {before} -> {during_redis} -> {during_bootstrap} -> {later}"
        )
    finally:
        stop_and_check(swarm)
