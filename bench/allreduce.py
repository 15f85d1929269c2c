"""All-reduce vs bound: hivemind's averaging round for the seed model's size, against loopback bandwidth.

``--peers`` DHT peers and one ``hivemind.averaging.DecentralizedAverager`` each (all forked from
this process, 127.0.0.1 only) average one float32 vector of ``--numel`` elements (the seed GPT-2's
32.3M parameters by default). Each round is matched first (``require_trigger=True``), then
triggered on every peer at once, so the timed part is the all-reduce alone: from the trigger to the
last peer's result.

The bound: in hivemind's butterfly all-reduce every peer sends the N-1 parts of its vector that
others reduce and then its own averaged part to the N-1 others, ``2 (N-1)/N x S`` bytes (S = wire
size after compression). ``per-peer bound`` = that / loopback bandwidth, as if each peer had the link
to itself; ``shared bound`` = N times that, since on one machine every peer shares one loopback and
its CPUs. Every round starts from the same random vectors and its result is checked against their
true mean (``error vs mean``): hivemind finishes a round whose parts went missing with a warning only,
so a ``PARTIAL`` row is a round that did not average everything. Loopback bandwidth is measured in the same run with a
plain TCP socket (one sender
thread, one receiver thread, 1 MiB writes).

Run: ``.venv/bin/python -m bench.allreduce`` (about two minutes on 2 shared CPU cores).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time

import hivemind
import torch
from hivemind.averaging.control import AveragingStage
from hivemind.compression import Float16Compression, NoCompression

from bench.common import exit_on_sigterm, spread, table, write_result
from hivetrain.hivemind_compat import Uniform8Bit, install_codecs
from hivetrain.log import get_logger

logger = get_logger("bench.allreduce")
SEED_NUMEL = 32_299_520  # num_parameters(build_model("seed")): the seed GPT-2, tied embeddings counted once
# the miner's codecs: its 8-bit one decodes under NumPy 2 (hivemind's stock one does not)
COMPRESSIONS = {"none": (NoCompression, 4.0), "fp16": (Float16Compression, 2.0), "8bit": (Uniform8Bit, 1.0)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[2, 4], help="group sizes to measure")
    parser.add_argument("--compression", nargs="+", default=list(COMPRESSIONS), choices=list(COMPRESSIONS))
    parser.add_argument("--numel", type=int, default=SEED_NUMEL, help="float32 elements each peer averages")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per configuration")
    parser.add_argument("--bandwidth-mib", type=int, default=1024, help="MiB sent per loopback bandwidth sample")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/allreduce.json)")
    return parser.parse_args(argv)


def loopback_bandwidth(total_bytes: int, chunk: int = 1 << 20) -> float:
    """Bytes/s of one TCP stream over 127.0.0.1 (sender and receiver threads in this process)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    received = [0]

    def receive() -> None:
        conn, _ = server.accept()
        buffer = bytearray(4 << 20)
        with conn:
            while (n := conn.recv_into(buffer)) > 0:
                received[0] += n

    thread = threading.Thread(target=receive)
    thread.start()
    payload = memoryview(bytes(chunk))
    client = socket.create_connection(server.getsockname())
    started = time.perf_counter()
    sent = 0
    while sent < total_bytes:
        client.sendall(payload)
        sent += chunk
    client.shutdown(socket.SHUT_WR)
    thread.join()
    elapsed = time.perf_counter() - started
    client.close()
    server.close()
    return received[0] / elapsed


def make_averagers(dhts: list[hivemind.DHT], prefix: str, numel: int, compression) -> tuple[list, list]:
    """One averager per DHT, each over its own random vector; returns (averagers, the vectors they started from)."""
    averagers, originals = [], []
    generator = torch.Generator().manual_seed(0)
    for dht in dhts:
        tensor = torch.randn(numel, generator=generator)
        originals.append(tensor.clone())
        averagers.append(
            hivemind.averaging.DecentralizedAverager(
                [tensor],
                dht,
                prefix=prefix,
                target_group_size=len(dhts),
                min_group_size=len(dhts),
                min_matchmaking_time=2.0,
                request_timeout=1.0,
                allreduce_timeout=300,
                compression=compression,
                start=True,
            )
        )
    return averagers, originals


def reset(averagers: list, originals: list) -> None:
    for averager, original in zip(averagers, originals):
        with averager.get_tensors() as tensors:
            tensors[0].copy_(original)


def round_error(averagers: list, expected: torch.Tensor) -> float:
    """Worst relative L2 error of a peer's result against the true mean: about 1 where a round silently
    kept local values (hivemind only logs parts it did not receive), quantization error otherwise."""
    errors = []
    for averager in averagers:
        with averager.get_tensors() as tensors:
            errors.append(float((tensors[0] - expected).norm() / expected.norm()))
    return max(errors)


def timed_round(averagers: list, timeout: float = 120.0) -> float:
    """Match a group, trigger every peer at once, return seconds until the last peer has its result."""
    controls = [a.step(wait=False, require_trigger=True, timeout=timeout, allow_retries=False) for a in averagers]
    deadline = time.monotonic() + timeout
    while any(c.stage != AveragingStage.AWAITING_TRIGGER for c in controls):
        if time.monotonic() > deadline or any(c.done() for c in controls):
            for c in controls:
                c.cancel()
            raise RuntimeError(f"matchmaking failed: stages {[c.stage for c in controls]}")
        time.sleep(0.01)
    started = time.perf_counter()
    for control in controls:
        control.allow_allreduce()
    for control in controls:
        gathered = control.result(timeout=timeout)
        if len(gathered) != len(averagers):
            raise RuntimeError(f"round ran with {len(gathered)} of {len(averagers)} peers")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    exit_on_sigterm()
    install_codecs()  # before the averagers fork: they decode what peers send
    bandwidths = [loopback_bandwidth(args.bandwidth_mib << 20) for _ in range(3)]
    dhts = [hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])]
    results = []
    try:
        for _ in range(max(args.peers) - 1):
            dhts.append(
                hivemind.DHT(
                    start=True,
                    host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                    initial_peers=[str(a) for a in dhts[0].get_visible_maddrs()],
                )
            )
        for n in args.peers:
            for name in args.compression:
                make, bytes_per_value = COMPRESSIONS[name]
                averagers, originals = make_averagers(dhts[:n], f"bench-ar-{n}-{name}", args.numel, make())
                expected = torch.stack(originals).mean(0)
                times, errors = [], []
                try:
                    for i in range(args.rounds + 1):  # the first round warms up connections and buffers
                        reset(averagers, originals)
                        elapsed = timed_round(averagers)
                        if i:
                            times.append(elapsed)
                            errors.append(round_error(averagers, expected))
                finally:
                    for averager in averagers:
                        averager.shutdown()
                bandwidths.append(loopback_bandwidth(args.bandwidth_mib << 20))  # interleaved with the rounds
                results.append(
                    {
                        "peers": n,
                        "compression": name,
                        "round_s": spread(times),
                        "rel_error": max(errors),
                        "complete": max(errors) < 0.1,
                        "bytes_per_peer": 2 * (n - 1) / n * args.numel * bytes_per_value,
                    }
                )
                logger.info(f"{n} peers, {name}: {statistics.median(times):.2f}s per round")
    finally:
        for dht in dhts:
            dht.shutdown()
    bandwidth = statistics.median(bandwidths)
    rows = []
    for r in results:
        per_peer = r["bytes_per_peer"] / bandwidth
        shared = per_peer * r["peers"]
        r.update(
            per_peer_bound_s=per_peer,
            shared_bound_s=shared,
            ratio_per_peer=r["round_s"]["median"] / per_peer,
            ratio_shared=r["round_s"]["median"] / shared,
            effective_mib_s_per_peer=r["bytes_per_peer"] / r["round_s"]["median"] / 2**20,
        )
        rows.append(
            [
                r["peers"],
                r["compression"],
                r["bytes_per_peer"] / 2**20,
                r["round_s"]["median"],
                f"[{r['round_s']['min']:.2f}, {r['round_s']['max']:.2f}]",
                per_peer,
                r["ratio_per_peer"],
                shared,
                r["ratio_shared"],
                r["effective_mib_s_per_peer"],
                f"{r['rel_error']:.1e}" + ("" if r["complete"] else " PARTIAL"),
            ]
        )
    print(
        table(
            [
                "peers",
                "compression",
                "MiB sent/peer",
                "round s (median)",
                "round s [min, max]",
                "per-peer bound s",
                "x per-peer bound",
                "shared bound s",
                "x shared bound",
                "MiB/s/peer",
                "error vs mean",
            ],
            rows,
        )
    )
    print(
        f"loopback TCP: {bandwidth / 2**20:,.0f} MiB/s (median of {len(bandwidths)}, "
        f"range {min(bandwidths) / 2**20:,.0f}-{max(bandwidths) / 2**20:,.0f}); {args.numel:,} float32 per peer"
    )
    path = write_result(
        "allreduce",
        {
            "numel": args.numel,
            "loopback_bytes_per_s": bandwidth,
            "loopback_samples_bytes_per_s": bandwidths,
            "rounds": args.rounds,
            "results": results,
        },
        args.out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
