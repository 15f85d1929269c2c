"""The miner's /metrics: a real ChallengeServer on loopback, scraped over HTTP and parsed as Prometheus does."""

from __future__ import annotations

import math
import socket
import threading
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from redis_sink import RedisSink

from hivetrain.chain import LocalChain
from hivetrain.hivemind_compat import RoundInfo
from hivetrain.identity import Domain, sign
from hivetrain.miner.challenge import ChallengeLimits, ChallengeServer
from hivetrain.miner.metrics import MinerMetrics
from hivetrain.miner.reporting import TelemetryWriter
from hivetrain.miner.validators import ValidatorList
from hivetrain.protocol.records import Keys, StepRecord
from hivetrain.store import connect_redis


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of ``url`` as {(name, sorted labels): value}, parsed by prometheus_client's own parser."""
    response = requests.get(url, timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def types(url: str) -> dict[str, str]:
    return {family.name: family.type for family in text_string_to_metric_families(requests.get(url, timeout=5).text)}


@pytest.fixture
def metrics() -> MinerMetrics:
    return MinerMetrics()


@pytest.fixture
def validators(redis_url, other_wallet):
    chain = LocalChain(connect_redis(redis_url), "metrics")
    chain.register(other_wallet.hotkey.ss58_address, "", "validator")
    validators = ValidatorList(chain).start()
    yield validators
    validators.stop()


@pytest.fixture
def server(wallet, metrics, validators):
    server = ChallengeServer(
        wallet,
        "127.0.0.1",
        0,
        validators,
        ChallengeLimits(rate=100.0, burst=10, timeout_s=5.0),
        domain=Domain("metrics"),
        window_s=60.0,
        metrics=metrics,
    ).start()
    try:
        yield server
    finally:
        server.stop()


def _url(server: ChallengeServer) -> str:
    return f"http://127.0.0.1:{server.port}/metrics"


def _step(index: int) -> StepRecord:
    return StepRecord(
        peer_id="QmMiner",
        step=index,
        local_epoch=0,
        global_epoch=0,
        loss=5.0,
        samples=4 * index,
        samples_per_s=2.0,
        tokens_per_s=128.0,
    )


def test_training_and_averaging_show_up_in_a_scrape(server, metrics):
    metrics.describe("QmMiner", "5Hotkey", "tiny", "cpu")
    metrics.record_step(4, 256, 1000.0, 3.5, local_epoch=2, global_epoch=3)
    metrics.record_step(4, 256, 1200.0, 3.25, local_epoch=2, global_epoch=3)
    metrics.record_round(
        RoundInfo(epoch=2, kind="gradients", group=("a", "b"), group_size=2, duration_s=4.0, success=True)
    )
    metrics.record_round(RoundInfo(epoch=3, kind="gradients", group=(), group_size=0, duration_s=15.0, success=False))
    metrics.record_round(RoundInfo(epoch=3, kind="state", group=(), group_size=3, duration_s=0.0, success=True))
    metrics.record_state_load(12.0)
    metrics.checkpoints.labels(outcome="saved").inc()
    metrics.offences.inc(2)
    metrics.record_compute(3.0, 4.0)  # the miner's own timers: 6 s of compute in 10 s of training
    metrics.record_compute(6.0, 10.0)
    got = scrape(_url(server))
    assert got[("hive_miner_compute_seconds_total", ())] == 6.0 and got[("hive_miner_utilization", ())] == 0.6
    assert got[("hive_miner_steps_total", ())] == 2
    assert got[("hive_miner_samples_total", ())] == 8 and got[("hive_miner_tokens_total", ())] == 512
    assert got[("hive_miner_tokens_per_second", ())] == 1200.0 and got[("hive_miner_loss", ())] == 3.25
    assert (got[("hive_miner_local_epoch", ())], got[("hive_miner_global_epoch", ())]) == (2, 3)
    rounds = {labels: value for (name, labels), value in got.items() if name == "hive_miner_averaging_rounds_total"}
    assert rounds == {
        (("kind", "gradients"), ("outcome", "success")): 1,
        (("kind", "gradients"), ("outcome", "failed")): 1,
        (("kind", "state"), ("outcome", "success")): 1,
        (("kind", "state"), ("outcome", "failed")): 0,
    }
    # only gradient rounds are timed: state rounds come from a log line with no duration
    assert got[("hive_miner_gradient_round_duration_seconds_count", ())] == 2
    assert got[("hive_miner_gradient_round_duration_seconds_sum", ())] == 19.0
    assert got[("hive_miner_gradient_round_duration_seconds_bucket", (("le", "5.0"),))] == 1
    assert (
        got[("hive_miner_state_loads_total", ())] == 1
        and got[("hive_miner_state_load_duration_seconds_sum", ())] == 12.0
    )
    assert got[("hive_miner_checkpoints_total", (("outcome", "saved"),))] == 1
    assert got[("hive_miner_checkpoints_total", (("outcome", "failed"),))] == 0
    assert got[("hive_miner_offences_reported_total", ())] == 2
    assert (
        got[("hive_miner_info", (("device", "cpu"), ("hotkey", "5Hotkey"), ("peer_id", "QmMiner"), ("preset", "tiny")))]
        == 1
    )
    kinds = types(_url(server))
    assert kinds["hive_miner_steps"] == "counter" and kinds["hive_miner_loss"] == "gauge"
    assert kinds["hive_miner_gradient_round_duration_seconds"] == "histogram"


def test_a_nonfinite_loss_is_nan_and_counted(server, metrics):
    metrics.record_step(4, 256, 1000.0, 3.5, local_epoch=0, global_epoch=0)
    metrics.record_step(4, 256, 1000.0, math.inf, local_epoch=0, global_epoch=0)
    got = scrape(_url(server))
    assert math.isnan(got[("hive_miner_loss", ())])
    assert got[("hive_miner_nonfinite_losses_total", ())] == 1 and got[("hive_miner_steps_total", ())] == 2


def test_telemetry_written_is_read_from_the_writer(server, metrics, redis_url, wallet):
    assert not any(name.startswith("hive_miner_telemetry") for name, _ in scrape(_url(server))), "no writer yet"
    writer = TelemetryWriter(RedisSink(connect_redis(redis_url), Keys("metrics")), Domain("metrics"), wallet)
    metrics.watch_telemetry(writer)
    try:
        writer.put_many(_step(i) for i in range(1, 6))
        deadline = time.monotonic() + 10
        while writer.written < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        got = scrape(_url(server))
    finally:
        writer.close()
    assert got[("hive_miner_telemetry_written_total", ())] == 5
    assert got[("hive_miner_telemetry_dropped_total", ())] == 0
    assert got[("hive_miner_telemetry_queue_depth", ())] == 0
    kinds = types(_url(server))
    assert (kinds["hive_miner_telemetry_written"], kinds["hive_miner_telemetry_dropped"]) == ("counter", "counter")
    assert kinds["hive_miner_telemetry_queue_depth"] == "gauge"


def test_telemetry_queue_and_drops_while_redis_is_away(server, metrics, wallet):
    with socket.socket() as probe:  # a port nothing listens on: Redis is down
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    writer = TelemetryWriter(
        RedisSink(connect_redis(f"redis://127.0.0.1:{port}/0"), Keys("metrics")), Domain("metrics"), wallet, max_queue=3
    )
    metrics.watch_telemetry(writer)
    try:
        writer.put_many(_step(i) for i in range(1, 6))
        got = scrape(_url(server))
    finally:
        writer.close(timeout=0.5)
    assert got[("hive_miner_telemetry_queue_depth", ())] == 3
    assert got[("hive_miner_telemetry_dropped_total", ())] == 2
    assert got[("hive_miner_telemetry_written_total", ())] == 0


def test_spot_checks_are_counted_by_outcome(server, wallet, other_wallet):
    body = {
        "miner_hotkey": wallet.hotkey.ss58_address,
        "block_index": 3,
        "batch_size": 2,
        "seed": 7,
        "dim": 8,
        "epoch": 5,
    }
    answers = iter([(5, [0.5] * 8), ValueError("block out of range")])
    stop = threading.Event()

    def compute(challenge, batch):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def training_loop():  # what Miner.train does between steps
        while not stop.is_set():
            server.answer_pending(compute)
            time.sleep(0.02)

    thread = threading.Thread(target=training_loop, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.port}/challenge"
        assert requests.post(url, json=sign(other_wallet, Domain("metrics"), body), timeout=10).status_code == 200
        assert requests.post(url, json=sign(other_wallet, Domain("metrics"), body), timeout=10).status_code == 500
        assert (
            requests.post(url, json=sign(wallet, Domain("metrics"), body), timeout=10).status_code == 403
        )  # not a validator
    finally:
        stop.set()
        thread.join()
    got = scrape(_url(server))
    assert got[("hive_miner_challenges_total", (("outcome", "answered"),))] == 1
    assert got[("hive_miner_challenges_total", (("outcome", "failed"),))] == 1
    assert got[("hive_miner_challenges_total", (("outcome", "refused"),))] == 1


def test_without_metrics_the_endpoint_has_no_metrics_route(wallet, validators):
    server = ChallengeServer(wallet, "127.0.0.1", 0, validators, domain=Domain("metrics"), window_s=60.0).start()
    try:
        assert requests.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5).status_code == 404
        assert requests.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5).status_code == 200
    finally:
        server.stop()
