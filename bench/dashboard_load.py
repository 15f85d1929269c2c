"""What one dashboard poll costs with 200 miners, against /api/swarm in the same run.

Starts a real Redis, registers ``--miners`` miners (each its own sr25519 hotkey) with
``--history`` signed steps each, then times through the validator app's test client (no HTTP
stack: the work a worker does per request):

* ``/api/dashboard`` cold: a fresh worker's first poll (reads and verifies the newest steps, rounds, offences);
* ``/api/dashboard`` warm: later polls, each after every miner wrote one more step (a 3 s poll of a busy swarm);
* ``/api/swarm``: reads and verifies its 2,000 newest steps and rounds on every request (the baseline).

Run: ``.venv/bin/python -m bench.dashboard_load`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bittensor import sp_core

from bench.common import table, write_result
from hivetrain.identity import Domain, load_or_create_wallet
from hivetrain.protocol.binding import bind_identity, identity_peer_id, new_ed25519_identity
from hivetrain.protocol.records import Keys, PeerRecord, StepRecord
from hivetrain.settings import ValidatorSettings
from hivetrain.store import Registry, append, connect_redis
from hivetrain.swarm.redis_server import start_redis
from hivetrain.validator.app import create_app

RUN_ID = "bench-dashboard"
DOMAIN = Domain(RUN_ID)  # what ValidatorSettings(run_id=RUN_ID) derives on the local chain


class KeyWallet:
    """A wallet-shaped signer around one keypair (the shape ``hivetrain.identity.sign`` accepts)."""

    def __init__(self, seed: int):
        self.hotkey = self.coldkey = self.coldkeypub = sp_core.Keypair.create_from_seed(seed.to_bytes(4, "big") * 8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--miners", type=int, default=200)
    parser.add_argument("--history", type=int, default=50, help="signed steps per miner before the first poll")
    parser.add_argument("--polls", type=int, default=10, help="warm polls and /api/swarm requests measured")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/dashboard_load.json)")
    return parser.parse_args(argv)


def step(peer: str, k: int, at: float) -> StepRecord:
    return StepRecord(
        peer_id=peer,
        step=k,
        local_epoch=k // 10,
        global_epoch=k // 10,
        loss=6.0 - k / 100,
        samples=8 * k,
        samples_per_s=2.0,
        tokens_per_s=256.0,
        time=at,
    )


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        service, url = start_redis(Path(tmp) / "redis", persist=False)
        try:
            db, keys = connect_redis(url), Keys(RUN_ID)
            wallets = [KeyWallet(i + 1) for i in range(args.miners)]
            identities = [new_ed25519_identity() for _ in range(args.miners)]
            peers = [identity_peer_id(identity) for identity in identities]
            registry = Registry(db, keys, DOMAIN)
            now = time.time()
            for peer, wallet, identity in zip(peers, wallets, identities):
                peer_key, peer_signature = bind_identity(identity, DOMAIN, peer, wallet.hotkey.ss58_address)
                registry.register(
                    PeerRecord(
                        peer_id=peer,
                        role="miner",
                        multiaddrs=["/ip4/127.0.0.1/tcp/1"],
                        started_at=now,
                        peer_key=peer_key,
                        peer_signature=peer_signature,
                    ),
                    wallet,
                )
            for k in range(args.history):  # interleaved, as a swarm writes them
                for peer, wallet in zip(peers, wallets):
                    append(db, keys, DOMAIN, step(peer, k, now - (args.history - k) * 3.0), signer=wallet)
            settings = ValidatorSettings(redis_url=url, run_id=RUN_ID, wallet_dir=f"{tmp}/wallets")
            load_or_create_wallet(settings.wallet_dir, settings.wallet_name, settings.wallet_hotkey)
            client = create_app(settings).test_client()
            cold = timed(lambda: client.get("/api/dashboard"))
            warm = []
            for k in range(args.polls):
                for peer, wallet in zip(peers, wallets):
                    append(db, keys, DOMAIN, step(peer, args.history + k, time.time()), signer=wallet)
                warm.append(timed(lambda: client.get("/api/dashboard")))
            swarm = [timed(lambda: client.get("/api/swarm")) for _ in range(args.polls)]
            size = len(client.get("/api/dashboard").data)
        finally:
            service.stop(timeout=5)
    rows = [
        ["/api/dashboard, first poll of a worker", cold * 1e3, cold / statistics.median(swarm)],
        [
            f"/api/dashboard, later polls ({args.miners} new steps each)",
            statistics.median(warm) * 1e3,
            statistics.median(warm) / statistics.median(swarm),
        ],
        ["/api/swarm (baseline)", statistics.median(swarm) * 1e3, 1.0],
    ]
    print(table(["request", "median ms", "vs /api/swarm"], rows))
    print(f"dashboard document: {size / 1e3:.0f} kB with {args.miners} miners")
    path = write_result(
        "dashboard_load",
        {
            "miners": args.miners,
            "history_per_miner": args.history,
            "polls": args.polls,
            "cold_s": cold,
            "warm_s": warm,
            "swarm_s": swarm,
            "document_bytes": size,
        },
        args.out,
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
