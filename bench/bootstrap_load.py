"""Bootstrap under load: requests/s and p50/p99 latency of /initial_peers with 1,000 live signed peers.

Starts a real Redis (``hivetrain.swarm.redis_server.start_redis``) and ``python -m hivetrain.bootstrap``
(its DHT peer plus gunicorn) as process groups on 127.0.0.1, registers ``--peers`` miners, each
signed by its own sr25519 hotkey and kept alive by a heartbeat thread (every peer re-registered
every 10 s, as miners do), then fires a fixed number of requests from ``--concurrency`` client
threads over keep-alive connections. ``/healthz`` (no Redis, no signatures) is measured the same
way in the same run as the baseline of the HTTP stack itself. The client shares the CPU with the
server, so on a small machine the numbers are a floor.

Run: ``.venv/bin/python -m bench.bootstrap_load`` (about a minute on 2 shared CPU cores).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

from bittensor import sp_core

from bench.common import exit_on_sigterm, percentile, table, write_result
from hivetrain.identity import Domain
from hivetrain.log import get_logger
from hivetrain.protocol.binding import bind_identity, identity_peer_id, new_ed25519_identity
from hivetrain.protocol.records import HEARTBEAT_INTERVAL_S, Keys, PeerRecord
from hivetrain.store import Registry, connect_redis
from hivetrain.swarm import procs
from hivetrain.swarm.redis_server import start_redis

logger = get_logger("bench.bootstrap_load")
RUN_ID = "bench-bootstrap"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=int, default=1000, help="live signed miner registrations")
    parser.add_argument("--requests", type=int, default=1500, help="requests per measured route")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="client threads (one run each)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers of the bootstrap")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/bootstrap_load.json)")
    return parser.parse_args(argv)


class Peers:
    """``count`` miners with their own hotkeys, re-registered every heartbeat from one thread."""

    def __init__(self, registry: Registry, count: int):
        self.registry = registry
        self.members = []
        now = time.time()
        for i in range(count):
            keypair = sp_core.Keypair.create_from_seed(os.urandom(32))
            wallet = types.SimpleNamespace(coldkey=keypair, coldkeypub=keypair, hotkey=keypair)  # a keyed wallet
            identity = new_ed25519_identity()  # each peer bound to its hotkey, as real miners are
            peer_id = identity_peer_id(identity)
            peer_key, peer_signature = bind_identity(identity, registry.domain, peer_id, keypair.ss58_address)
            record = PeerRecord(
                peer_id=peer_id,
                role="miner",
                hotkey=keypair.ss58_address,
                challenge_url=f"http://127.0.0.1:{20000 + i}",
                multiaddrs=[f"/ip4/127.0.0.1/tcp/{30000 + i}/p2p/{peer_id}"],
                started_at=now,
                peer_key=peer_key,
                peer_signature=peer_signature,
            )
            self.members.append((record, wallet))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-heartbeats", daemon=True)

    def register_all(self) -> float:
        started = time.perf_counter()
        for record, wallet in self.members:
            self.registry.register(record, wallet)
        return time.perf_counter() - started

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_INTERVAL_S):
            self.register_all()

    def start(self) -> "Peers":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def load(port: int, path: str, total: int, concurrency: int) -> dict:
    """``total`` GETs of ``path`` from ``concurrency`` threads on keep-alive connections; latencies in ms."""
    latencies: list[float] = []
    errors: list[str] = []
    sizes: list[int] = []
    counter = iter(range(total))
    lock = threading.Lock()

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                started = time.perf_counter()
                try:
                    conn.request("GET", path)
                    response = conn.getresponse()
                    body = response.read()
                    elapsed = (time.perf_counter() - started) * 1000
                    with lock:
                        if response.status == 200:
                            latencies.append(elapsed)
                            sizes.append(len(body))
                        else:
                            errors.append(f"HTTP {response.status}")
                except (OSError, http.client.HTTPException) as error:
                    with lock:
                        errors.append(repr(error))
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        finally:
            conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {
        "path": path,
        "concurrency": concurrency,
        "requests": total,
        "ok": len(latencies),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:3],
        "wall_s": wall,
        "requests_per_s": len(latencies) / wall,
        "p50_ms": percentile(latencies, 50) if latencies else None,
        "p99_ms": percentile(latencies, 99) if latencies else None,
        "max_ms": max(latencies) if latencies else None,
        "bytes_per_response": sum(sizes) / len(sizes) if sizes else 0,
    }


def start_bootstrap(workdir: Path, redis_url: str, workers: int) -> tuple[procs.Service, int]:
    port = procs.free_port()
    env = dict(os.environ)
    env.update(
        {
            "HIVE_RUN_ID": RUN_ID,
            "HIVE_CHAIN": "local",
            "HIVE_REDIS_URL": redis_url,
            "HIVE_HTTP_HOST": "127.0.0.1",
            "HIVE_HTTP_PORT": str(port),
            "HIVE_HTTP_WORKERS": str(workers),
            "HIVE_LOG_LEVEL": "WARNING",
            "HIVE_HOST_MADDRS": '["/ip4/127.0.0.1/tcp/0"]',
            "HIVE_IDENTITY_PATH": str(workdir / "bootstrap.id"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    service = procs.start(
        "bootstrap",
        [sys.executable, "-m", "hivetrain.bootstrap"],
        env=env,
        log_path=workdir / "bootstrap.log",
        cwd=workdir,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if not service.alive():
            raise RuntimeError(f"bootstrap exited; see {workdir / 'bootstrap.log'}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return service, port
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"bootstrap not ready after 90 s; see {workdir / 'bootstrap.log'}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    exit_on_sigterm()
    workdir = Path(tempfile.mkdtemp(prefix="bench-bootstrap-"))
    redis_service = bootstrap = peers = None
    try:
        redis_service, redis_url = start_redis(workdir / "redis", persist=False)
        bootstrap, port = start_bootstrap(workdir, redis_url, args.workers)
        registry = Registry(
            connect_redis(redis_url), Keys(RUN_ID), Domain(RUN_ID)
        )  # the bootstrap's, on the local chain
        peers = Peers(registry, args.peers)
        register_s = peers.register_all()
        peers.start()
        live = len(registry.live_peers(limit=args.peers))
        runs = []
        for concurrency in args.concurrency:
            for path in ("/healthz", "/initial_peers"):
                load(port, path, min(100, args.requests), concurrency)  # warm-up: connections, imports
                runs.append(load(port, path, args.requests, concurrency))
        sample = json.loads(_get(port, "/initial_peers"))
        rows = [
            [
                r["path"],
                r["concurrency"],
                r["ok"],
                r["errors"],
                r["requests_per_s"],
                r["p50_ms"],
                r["p99_ms"],
                r["max_ms"],
                r["bytes_per_response"],
            ]
            for r in runs
        ]
        print(table(["route", "client threads", "ok", "errors", "req/s", "p50 ms", "p99 ms", "max ms", "bytes"], rows))
        print(
            f"{live} live signed peers (registered in {register_s:.1f}s, re-registered every {HEARTBEAT_INTERVAL_S}s); "
            f"/initial_peers returns {len(sample['initial_peers'])} addresses; gunicorn workers: {args.workers}"
        )
        path = write_result(
            "bootstrap_load",
            {
                "peers": args.peers,
                "live_peers": live,
                "register_all_s": register_s,
                "workers": args.workers,
                "runs": runs,
                "addresses_returned": len(sample["initial_peers"]),
            },
            args.out,
        )
        print(f"wrote {path}")
    finally:
        if peers is not None:
            peers.stop()
        if bootstrap is not None:
            bootstrap.stop(timeout=20)
        if redis_service is not None:
            redis_service.stop(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def _get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        return conn.getresponse().read()
    finally:
        conn.close()


if __name__ == "__main__":
    main()
