"""How a miner sends its records: ``TelemetryWriter`` queues them and a thread writes them to a sink.

A miner's sinks are the bootstrap (``BootstrapSink`` for telemetry, ``BootstrapRegistry`` for its
registration): its own Redis user only reads. Training must never wait for Redis or the bootstrap:
while a sink is away the thread retries with backoff, and once the bounded queue is full the oldest
records go first.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from typing import Iterable, Protocol

from hivetrain.identity import Domain
from hivetrain.log import get_logger
from hivetrain.protocol.envelopes import STREAMS, signed_departure, signed_registration, stream_fields
from hivetrain.protocol.records import (
    MAX_INGEST_ENTRIES,
    OffenceRecord,
    PeerRecord,
    ReceiptRecord,
    RoundRecord,
    StepRecord,
)

logger = get_logger(__name__)


class TelemetrySink(Protocol):
    """Where a ``TelemetryWriter`` sends ``(stream, fields)`` batches of at most ``max_batch``."""

    max_batch: int

    def send(self, entries: list[tuple[str, dict]]) -> list[int]:
        """Store the entries; the indices refused for good. Raise ``SinkUnavailable`` to be retried."""


class SinkUnavailable(Exception):
    """The sink could not take a batch now (Redis or the bootstrap away, a quota, a peer not yet registered): retry."""


class BootstrapSink:
    """Telemetry posted to the bootstrap's ``POST /v1/telemetry``: how a miner writes (``TelemetryIngest``)."""

    max_batch = MAX_INGEST_ENTRIES

    def __init__(self, bootstrap_url: str, timeout: float = 10.0):
        import requests  # only miners post

        self.url, self.timeout = f"{bootstrap_url.rstrip('/')}/v1/telemetry", timeout
        self.session, self._errors = requests.Session(), requests.RequestException

    def send(self, entries: list[tuple[str, dict]]) -> list[int]:
        body = {"entries": [{"stream": stream, "env": fields["env"]} for stream, fields in entries]}
        try:
            response = self.session.post(self.url, json=body, timeout=self.timeout, allow_redirects=False)
        except self._errors as error:
            raise SinkUnavailable(f"bootstrap unreachable: {error!r}") from None
        if response.status_code == 200:
            # "duplicates" (stored by an earlier post whose answer we lost) are not refused: they count as written
            refused = response.json().get("refused", [])
            for item in refused[:3]:
                logger.warning(f"telemetry entry refused by the bootstrap: {item.get('reason')}")
            return [int(item["index"]) for item in refused]
        if response.status_code in (408, 409, 429) or response.status_code >= 500:
            raise SinkUnavailable(f"bootstrap answered {response.status_code}: {response.text[:200]}")
        # our own entries refused as a whole: a bug or a misconfigured run; retrying would not help
        logger.error(
            f"the bootstrap refused {len(entries)} telemetry entries ({response.status_code}): {response.text[:300]}"
        )
        return list(range(len(entries)))


class BootstrapRegistry:
    """A miner's registration, sent to the bootstrap's ``POST /v1/peers`` (``Registry.store_signed`` checks it there).

    Same calls as ``Registry``'s ``register`` and ``deregister``, for the miner's heartbeat; errors
    raise (the heartbeat logs them and tries again).
    """

    def __init__(self, bootstrap_url: str, domain: Domain, timeout: float = 10.0):
        import requests  # only miners post

        self.base, self.domain, self.timeout = bootstrap_url.rstrip("/"), domain, timeout
        self.session = requests.Session()
        self._signer = None

    def _post(self, path: str, body: bytes) -> None:
        response = self.session.post(
            f"{self.base}{path}",
            data=body,
            timeout=self.timeout,
            allow_redirects=False,
            headers={"Content-Type": "application/json"},
        )
        if response.status_code != 200:
            raise RuntimeError(f"the bootstrap refused {path} ({response.status_code}): {response.text[:300]}")

    def register(self, record: PeerRecord, signer) -> None:
        self._signer = signer
        self._post("/v1/peers", signed_registration(record, signer, self.domain)[0])

    def deregister(self, peer_id: str) -> None:
        if self._signer is None:
            return  # never registered
        self._post("/v1/peers/leave", signed_departure(peer_id, self._signer, self.domain))


class TelemetryWriter:
    """Writes telemetry from a background thread so training never blocks on Redis or the bootstrap.

    ``put`` only appends to a bounded deque. While the sink is unavailable the thread retries with
    exponential backoff (up to ``max_backoff_s``); when the deque is full the oldest records go
    first and are counted in ``dropped``, as are records the sink refuses.
    """

    def __init__(
        self, sink: TelemetrySink, domain: Domain, signer, max_queue: int = 10_000, max_backoff_s: float = 5.0
    ):
        self.sink, self.signer, self.max_backoff_s = sink, signer, max_backoff_s
        self.domain = domain
        self._queue: collections.deque = collections.deque(maxlen=max_queue)
        self._wake = threading.Condition()
        self._stopping = False
        self.written = self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="telemetry-writer", daemon=True)
        self._thread.start()

    def put(self, record: StepRecord | RoundRecord | OffenceRecord | ReceiptRecord) -> None:
        with self._wake:
            if len(self._queue) == self._queue.maxlen:
                self.dropped += 1
            self._queue.append(record)
            self._wake.notify()

    def put_many(self, records: Iterable[StepRecord | RoundRecord | OffenceRecord | ReceiptRecord]) -> None:
        for record in records:
            self.put(record)

    @property
    def queued(self) -> int:
        """Records not yet written to Redis, including a batch in flight (the miner's /metrics shows it)."""
        return len(self._queue)

    def _run(self) -> None:
        backoff = 0.1
        while True:
            with self._wake:
                while not self._queue and not self._stopping:
                    self._wake.wait()
                if not self._queue and self._stopping:
                    return
                batch = list(itertools.islice(self._queue, self.sink.max_batch))
            entries, unserialisable = [], 0
            for record in batch:
                try:
                    entries.append((STREAMS[type(record)][0], stream_fields(record, self.domain, self.signer)))
                except ValueError:  # not JSON-able (a NaN): drop it, keep the writer alive
                    logger.warning(f"dropping an unserialisable {type(record).__name__}", exc_info=True)
                    unserialisable += 1
            try:
                refused = self.sink.send(entries) if entries else []
            except SinkUnavailable as error:
                if self._stopping:
                    return
                logger.warning(
                    f"telemetry write failed ({error}); {len(batch)} records wait, retrying in {backoff:.1f}s"
                )
                with self._wake:
                    self._wake.wait(timeout=backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            backoff = 0.1
            sent = {id(record) for record in batch}
            with self._wake:
                # records dropped for space while we wrote are already gone from the left
                while self._queue and id(self._queue[0]) in sent:
                    self._queue.popleft()
                self.dropped += unserialisable + len(refused)
                self.written += len(entries) - len(refused)

    def close(self, timeout: float = 5.0) -> None:
        """Flush what is queued (for up to ``timeout`` seconds), then stop the thread."""
        deadline = time.monotonic() + timeout
        while self._queue and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.05)
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
        if self._queue:
            logger.warning(f"telemetry: {len(self._queue)} records not written at shutdown")
