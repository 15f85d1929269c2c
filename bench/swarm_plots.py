"""Loss vs time and tokens/s per miner from one local swarm run, as PNGs (and the series as JSON).

Runs ``--miners`` tiny miners and a validator with the local launcher for ``--duration`` seconds,
reads every miner's signed step records and the validator's evaluations from Redis before the
swarm stops, and plots them with matplotlib.

Run: ``.venv/bin/python -m bench.swarm_plots [--miners 4] [--duration 120]`` (about 3 minutes).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hivetrain.protocol.records import EvalRecord, Keys, StepRecord  # noqa: E402
from hivetrain.settings import SwarmSettings, domain_of  # noqa: E402
from hivetrain.store import connect_redis, read_stream  # noqa: E402
from hivetrain.swarm.launcher import Swarm  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--miners", type=int, default=4)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of training to record")
    parser.add_argument(
        "--out", default=str(RESULTS), help="folder for swarm-loss.png, swarm-tokens.png, swarm_plots.json"
    )
    return parser.parse_args(argv)


def record(miners: int, duration: float) -> dict:
    """Run the swarm; return per-miner (time, loss, tokens/s) series and the validator's evaluations."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-plots-"))
    settings = SwarmSettings(
        miners=miners,
        workdir=str(workdir),
        preset="tiny",
        bootstrap_port=0,
        validator_port=0,
        run_id="plots",
        stop_timeout=45,
    )
    swarm = Swarm(settings, extra_env={"HIVE_SYNC_EVERY_S": "10", "HIVE_EVAL_BLOCKS": "16"})
    try:
        swarm.start()
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline and not swarm.failed_services():
            time.sleep(2)
        client, keys, domain = connect_redis(swarm.redis_url), Keys(settings.run_id), domain_of(settings)
        steps = read_stream(client, keys, domain, StepRecord)
        evals = read_stream(client, keys, domain, EvalRecord)
    finally:
        swarm.stop()
    start = min(s.time for s in steps)
    series: dict[str, dict[str, list[float]]] = {}
    for step in steps:
        entry = series.setdefault(step.peer_id, {"t": [], "loss": [], "tokens_per_s": []})
        entry["t"].append(step.time - start)
        entry["loss"].append(step.loss)
        entry["tokens_per_s"].append(step.tokens_per_s)
    return {
        "miners": series,
        "evals": [{"t": e.time - start, "loss": e.loss, "epoch": e.epoch} for e in evals],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "duration_s": duration,
    }


def plot(data: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    names = {peer: f"miner {i} ({peer[:6]})" for i, peer in enumerate(sorted(data["miners"]))}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for peer, s in sorted(data["miners"].items()):
        ax.plot(s["t"], s["loss"], lw=0.8, alpha=0.8, label=names[peer])
    if data["evals"]:
        ax.plot(
            [e["t"] for e in data["evals"]],
            [e["loss"] for e in data["evals"]],
            "k.-",
            lw=1.5,
            label="validator: held-out loss (shared model)",
        )
    ax.set(
        xlabel="seconds since the first step",
        ylabel="loss (nats/token)",
        title=f"{len(names)} tiny miners on 2 CPU cores: training loss and held-out loss",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    loss_png = out / "swarm-loss.png"
    fig.tight_layout()
    fig.savefig(loss_png, dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for peer, s in sorted(data["miners"].items()):
        ax.plot(s["t"], s["tokens_per_s"], lw=0.8, label=names[peer])
    ax.set(
        xlabel="seconds since the first step",
        ylabel="tokens/s (miner's EMA)",
        title="throughput per miner (dips are epoch steps: averaging and the optimizer)",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    tokens_png = out / "swarm-tokens.png"
    fig.tight_layout()
    fig.savefig(tokens_png, dpi=110)
    plt.close(fig)
    return [loss_png, tokens_png]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data = record(args.miners, args.duration)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "swarm_plots.json").write_text(json.dumps(data))
    for path in plot(data, out):
        print(f"wrote {path}")
    for peer, s in sorted(data["miners"].items()):
        print(f"| {peer[:8]} | {len(s['t'])} steps | loss {s['loss'][0]:.3f} -> {s['loss'][-1]:.3f} |")
    if data["evals"]:
        print(f"validator held-out loss {data['evals'][0]['loss']:.3f} -> {data['evals'][-1]['loss']:.3f}")


if __name__ == "__main__":
    main()
