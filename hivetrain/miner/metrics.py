"""The miner's Prometheus metrics, served as ``GET /metrics`` on its spot-check port.

A miner is one process for metrics' sake (its averagers are forked children, but they report rounds
and state loads back to this process through callbacks), so one registry counts everything, unlike
the gunicorn apps, where each worker counts its own requests. The telemetry writer keeps its own
totals; they are read when Prometheus scrapes rather than copied on every put.
"""

from __future__ import annotations

import math
from typing import Iterator, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hivetrain.hivemind_compat import RoundInfo

#: Round kinds and outcomes, created at zero so that rate() has a series before the first round.
ROUND_KINDS = ("gradients", "state")
OUTCOMES = ("success", "failed")
#: What became of a spot-check request (hivetrain.miner.challenge).
CHALLENGE_OUTCOMES = ("answered", "failed", "refused", "invalid", "limited", "expired")
#: Averaging rounds take matchmaking plus all-reduce: seconds to a few minutes.
ROUND_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
#: Downloading the shared state takes from seconds (tiny model, loopback) to minutes.
STATE_LOAD_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class QueueStats(Protocol):
    """What the collector reads of ``hivetrain.miner.reporting.TelemetryWriter``."""

    written: int
    dropped: int

    @property
    def queued(self) -> int: ...


class TelemetryCollector(Collector):
    """The telemetry writer's queue depth and totals, read at scrape time (nothing until a writer is watched)."""

    def __init__(self) -> None:
        self.writer: QueueStats | None = None

    def collect(self) -> Iterator[Metric]:
        writer = self.writer
        if writer is None:
            return
        yield GaugeMetricFamily(
            "hive_miner_telemetry_queue_depth", "telemetry records not yet written to Redis", value=writer.queued
        )
        # the writer's counts only grow, so they are counters: Prometheus applies rate() and resets to them
        yield CounterMetricFamily(
            "hive_miner_telemetry_written", "telemetry records written to Redis", value=writer.written
        )
        yield CounterMetricFamily(
            "hive_miner_telemetry_dropped",
            "telemetry records dropped (queue full while Redis was away, or unserialisable)",
            value=writer.dropped,
        )


class MinerMetrics:
    """Training, averaging, checkpoint, spot-check and telemetry metrics of one miner, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.info = Info("hive_miner", "who this miner is: peer id, hotkey, preset, device", registry=r)
        self.steps = Counter("hive_miner_steps", "local training steps (one batch each)", registry=r)
        self.samples = Counter("hive_miner_samples", "samples (blocks of tokens) trained on", registry=r)
        self.tokens = Counter("hive_miner_tokens", "tokens trained on", registry=r)
        self.tokens_per_s = Gauge(
            "hive_miner_tokens_per_second", "training speed (moving average over steps)", registry=r
        )
        self.loss = Gauge("hive_miner_loss", "training loss of the last step (NaN when it was not finite)", registry=r)
        self.nonfinite_losses = Counter(
            "hive_miner_nonfinite_losses", "steps whose loss was NaN or infinite", registry=r
        )
        self.compute_seconds = Counter(
            "hive_miner_compute_seconds",
            "seconds inside forward, backward and the (inner) optimizer step; not averaging rounds nor state loads",
            registry=r,
        )
        self._compute_counted = 0.0
        self.utilization = Gauge(
            "hive_miner_utilization", "compute seconds over wall seconds since training began (measured)", registry=r
        )
        self.local_epoch = Gauge("hive_miner_local_epoch", "epoch this miner's parameters are at", registry=r)
        self.global_epoch = Gauge("hive_miner_global_epoch", "epoch of the swarm as this miner sees it", registry=r)
        self.rounds = Counter(
            "hive_miner_averaging_rounds",
            "averaging rounds by kind and outcome (failed: failed or ran alone)",
            ["kind", "outcome"],
            registry=r,
        )
        self.round_duration = Histogram(
            "hive_miner_gradient_round_duration_seconds",
            "time from the epoch's end to averaged gradients (state rounds are not timed)",
            registry=r,
            buckets=ROUND_BUCKETS,
        )
        self.state_loads = Counter("hive_miner_state_loads", "downloads of the shared state from peers", registry=r)
        self.state_load_duration = Histogram(
            "hive_miner_state_load_duration_seconds",
            "time to load state from peers",
            registry=r,
            buckets=STATE_LOAD_BUCKETS,
        )
        self.checkpoints = Counter(
            "hive_miner_checkpoints", "checkpoints by outcome (saved or failed)", ["outcome"], registry=r
        )
        self.challenges = Counter(
            "hive_miner_challenges",
            "spot-check requests by outcome: answered, failed (on our side), "
            "refused (not a listed validator, or for another miner), invalid (unsigned, replayed, "
            "malformed, beyond the bounds), limited (rate or queue share), expired (not answered in time)",
            ["outcome"],
            registry=r,
        )
        self.offences = Counter(
            "hive_miner_offences_reported", "peers our averagers caught misbehaving, reported", registry=r
        )
        self.telemetry = TelemetryCollector()
        r.register(self.telemetry)
        for kind in ROUND_KINDS:
            for outcome in OUTCOMES:
                self.rounds.labels(kind=kind, outcome=outcome)
        for outcome in ("saved", "failed"):
            self.checkpoints.labels(outcome=outcome)
        for outcome in CHALLENGE_OUTCOMES:
            self.challenges.labels(outcome=outcome)

    def describe(self, peer_id: str, hotkey: str, preset: str, device: str) -> None:
        self.info.info({"peer_id": peer_id, "hotkey": hotkey, "preset": preset, "device": device})

    def watch_telemetry(self, writer: QueueStats) -> None:
        self.telemetry.writer = writer

    def record_step(
        self, samples: int, tokens: int, tokens_per_s: float, loss: float, local_epoch: int, global_epoch: int
    ) -> None:
        self.steps.inc()
        self.samples.inc(samples)
        self.tokens.inc(tokens)
        self.tokens_per_s.set(tokens_per_s)
        if math.isfinite(loss):
            self.loss.set(loss)
        else:  # NaN, not a made-up number: the panel shows a gap and the counter says why
            self.loss.set(math.nan)
            self.nonfinite_losses.inc()
        self.local_epoch.set(local_epoch)
        self.global_epoch.set(global_epoch)

    def record_compute(self, compute_s: float, wall_s: float) -> None:
        """Seconds of forward, backward and (inner) optimizer steps so far, out of ``wall_s`` of training."""
        self.compute_seconds.inc(max(0.0, compute_s - self._compute_counted))
        self._compute_counted = max(self._compute_counted, compute_s)
        self.utilization.set(compute_s / wall_s if wall_s > 0 else 0.0)

    def record_round(self, info: RoundInfo) -> None:
        self.rounds.labels(kind=info.kind, outcome="success" if info.success else "failed").inc()
        if info.kind == "gradients":  # state rounds come from hivemind's log, which gives no duration
            self.round_duration.observe(info.duration_s)

    def record_state_load(self, duration_s: float) -> None:
        self.state_loads.inc()
        self.state_load_duration.observe(duration_s)
