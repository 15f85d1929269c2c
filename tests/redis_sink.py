"""A telemetry sink straight into Redis, for tests that drive a ``TelemetryWriter`` without a bootstrap.

Miners send through the bootstrap (``hivetrain.miner.reporting.BootstrapSink``); only tests, whose
Redis user may write, skip it.
"""

from __future__ import annotations

import redis

from hivetrain.miner.reporting import SinkUnavailable
from hivetrain.protocol.envelopes import INGEST_STREAMS
from hivetrain.protocol.records import Keys
from hivetrain.store import xadd_capped


class RedisSink:
    """XADDs every ``(stream, fields)`` batch to the run's capped streams; Redis errors are ``SinkUnavailable``."""

    max_batch = 10_000

    def __init__(self, client: redis.Redis, keys: Keys):
        self.client, self.keys = client, keys

    def send(self, entries: list[tuple[str, dict]]) -> list[int]:
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for stream, fields in entries:
                    xadd_capped(pipe, self.keys, INGEST_STREAMS[stream], fields)
                pipe.execute()
        except redis.RedisError as error:
            raise SinkUnavailable(repr(error)) from None
        return []
