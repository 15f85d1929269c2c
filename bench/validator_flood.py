"""The validator under a flood of stalling miners: does it still set weights on schedule?

Starts a local swarm (``hivetrain.swarm.launcher.Swarm``: Redis, the bootstrap, ``--miners`` tiny miners and
the validator, checks every 8 s, weights every ``--weights-every`` s) on 127.0.0.1 and waits for its first
weights. Then ``--flood`` registrations, each with its own sr25519 hotkey and a bound libp2p key (valid
registrations, as the bootstrap stores them), all naming one local endpoint that accepts a challenge and never
answers (a tarpit), are kept alive for ``--duration`` seconds (re-registered every heartbeat). The validator's
log gives the time of each weight setting: the intervals before the flood are the baseline, those during it
the figure. The last score board gives the honest miners' share of the weights.

Before the check round was bounded (2026-12-07), such a flood of 200 held weights back for the whole 4 minutes.

Run: ``.venv/bin/python -m bench.validator_flood`` (about 6 minutes on 2 shared CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import threading
import time
import types
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bittensor import sp_core

from bench.common import exit_on_sigterm, table, write_result
from hivetrain.log import get_logger
from hivetrain.protocol.binding import bind_identity, identity_peer_id, new_ed25519_identity
from hivetrain.protocol.records import HEARTBEAT_INTERVAL_S, Keys, PeerRecord
from hivetrain.settings import SwarmSettings, domain_of
from hivetrain.store import Registry, connect_redis
from hivetrain.swarm.launcher import Swarm

logger = get_logger("bench.validator_flood")
_WEIGHTS = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) \w+ \[hivetrain\.validator\.service\] weights set", re.M
)


class Tarpit:
    """An HTTP endpoint that reads each request and never answers (until stopped); counts what it was asked."""

    def __init__(self):
        self.asked = 0
        self.stopping = threading.Event()
        tarpit = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                tarpit.asked += 1
                tarpit.stopping.wait(120)

            def log_message(self, *args):
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def flood_members(registry: Registry, count: int, url: str) -> list[tuple[PeerRecord, object]]:
    members = []
    for i in range(count):
        keypair = sp_core.Keypair.create_from_seed(os.urandom(32))
        wallet = types.SimpleNamespace(coldkey=keypair, coldkeypub=keypair, hotkey=keypair)
        identity = new_ed25519_identity()
        peer_id = identity_peer_id(identity)
        peer_key, peer_signature = bind_identity(identity, registry.domain, peer_id, keypair.ss58_address)
        record = PeerRecord(
            peer_id=peer_id,
            role="miner",
            hotkey=keypair.ss58_address,
            challenge_url=url,
            multiaddrs=[f"/ip4/127.0.0.1/tcp/{40000 + i}/p2p/{peer_id}"],
            started_at=time.time(),
            peer_key=peer_key,
            peer_signature=peer_signature,
        )
        members.append((record, wallet))
    return members


def weight_times(log: Path) -> list[float]:
    return [
        datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").timestamp()
        for stamp in _WEIGHTS.findall(log.read_text(errors="replace"))
    ]


def intervals(times: list[float]) -> list[float]:
    return [round(b - a, 1) for a, b in zip(times, times[1:])]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--miners", type=int, default=2)
    parser.add_argument("--flood", type=int, default=200, help="stalling registrations")
    parser.add_argument("--duration", type=float, default=240.0, help="seconds of flood measured")
    parser.add_argument("--weights-every", type=float, default=30.0)
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/validator_flood.json)")
    args = parser.parse_args(argv)
    exit_on_sigterm()
    workdir = Path(tempfile.mkdtemp(prefix="bench-flood-"))
    settings = SwarmSettings(miners=args.miners, workdir=str(workdir), bootstrap_port=0, run_id="bench-flood")
    env = {"HIVE_CHECK_EVERY_S": "8", "HIVE_WEIGHTS_EVERY_S": f"{args.weights_every:g}", "HIVE_SYNC_EVERY_S": "15"}
    swarm, tarpit, stop = Swarm(settings, extra_env=env), Tarpit(), threading.Event()
    try:
        swarm.start()
        log = swarm.validator.log_path
        deadline = time.monotonic() + 600
        while len(weight_times(log)) < 3:  # two intervals of the baseline
            if time.monotonic() > deadline:
                raise TimeoutError(f"the validator set no weights in 600 s; see {log}")
            time.sleep(1)
        registry = Registry(connect_redis(swarm.redis_url), Keys(settings.run_id), domain_of(settings))
        members = flood_members(registry, args.flood, tarpit.url)
        flooded_at = time.time()

        def heartbeats() -> None:
            while not stop.is_set():
                for record, wallet in members:
                    registry.register(record, wallet)
                stop.wait(HEARTBEAT_INTERVAL_S)

        thread = threading.Thread(target=heartbeats, daemon=True)
        thread.start()
        time.sleep(args.duration)
        ended_at = time.time()
        stop.set()
        thread.join(timeout=60)
        times = weight_times(log)
        before = [t for t in times if t < flooded_at]
        during = [t for t in times if flooded_at <= t <= ended_at]
        client = connect_redis(swarm.redis_url)
        boards = [json.loads(client.get(key)) for key in client.scan_iter(Keys(settings.run_id).scores("*"))]
        flood = {record.hotkey for record, _ in members}
        board = boards[0] if boards else {"miners": []}
        honest_share = sum(m["weight"] for m in board["miners"] if m["hotkey"] not in flood)
        longest_gap = max(intervals([before[-1], *during, ended_at])) if before else None
        figures = {
            "miners": args.miners,
            "flood": args.flood,
            "weights_every_s": args.weights_every,
            "intervals_before_s": intervals(before),
            "intervals_during_s": intervals([before[-1], *during]) if before else [],
            "weights_set_during": len(during),
            "longest_gap_s": longest_gap,
            "tarpit_asked": tarpit.asked,
            "honest_weight_share": round(honest_share, 3),
            "miners_on_board": len(board["miners"]),
        }
    finally:
        stop.set()
        tarpit.stop()
        swarm.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        table(
            [
                "flood",
                "weights every s",
                "intervals before",
                "intervals during",
                "longest gap s",
                "tarpit asked",
                "honest weight share",
            ],
            [
                [
                    figures["flood"],
                    args.weights_every,
                    figures["intervals_before_s"],
                    figures["intervals_during_s"],
                    figures["longest_gap_s"],
                    figures["tarpit_asked"],
                    figures["honest_weight_share"],
                ]
            ],
        )
    )
    path = write_result("validator_flood", figures, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
